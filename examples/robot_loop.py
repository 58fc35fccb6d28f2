"""A Segmenter inside a control loop: load once, segment each frame, act on the mask.

Run: python examples/robot_loop.py [--bundle DIR] [--frames 5]

The camera here is simulated (a shipped photo, shifted a little each frame); swap `frames()` for
your camera driver. The loop keeps one Segmenter for its whole life (loading is the expensive part),
uses a fixed seed per frame for reproducible behaviour, and reads `result.timings` to watch latency.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

import star_edge

PHOTO = Path(__file__).with_name("coffee.jpg")


def frames(count: int) -> Iterator[np.ndarray]:
    """Simulated camera: (H, W, 3) uint8 RGB frames."""
    base = np.asarray(Image.open(PHOTO).convert("RGB"))
    for index in range(count):
        yield np.roll(base, shift=4 * index, axis=1)


def target_centre(mask: np.ndarray) -> tuple[float, float] | None:
    """Centroid (x, y) of a (H, W) bool mask, or None if it is empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return float(xs.mean()), float(ys.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None, help="bundle folder (default model if omitted)")
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--query", default="what could I drink from?")
    args = parser.parse_args()

    with star_edge.Segmenter.from_pretrained(args.bundle) as segmenter:
        for index, frame in enumerate(frames(args.frames)):
            result = segmenter.segment(frame, args.query, samples=args.samples, seed=index)
            centre = target_centre(result.mask)
            action = "hold still" if centre is None else f"move towards x={centre[0]:.0f}, y={centre[1]:.0f}"
            print(f"frame {index}: {len(result.objects)} object(s), "
                  f"{result.timings['total']:.0f} ms -> {action}")


if __name__ == "__main__":
    main()
