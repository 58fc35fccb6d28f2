"""Write held-out synthetic scenes for `make demo`: PNG images and a tab-separated list of
(image, query) lines, from the test split (a seed the demo model never trained on).

Usage: python examples/demo_scenes.py OUT_DIR [--count-per-phase 3]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from star_edge.train.data.synthetic import sample, split_seed
from star_edge.train.demo import demo_curriculum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--count-per-phase", type=int, default=3)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lines = []
    # the first two curriculum phases: named shapes, then shapes and everyday items
    for phase, name in ((0, "shapes"), (1, "items")):
        config = demo_curriculum()[phase].config
        for index in range(args.count_per_phase):
            scene = sample(split_seed(0, "test"), index, config)
            path = args.out / f"{name}-{index}.png"
            Image.fromarray(scene.image).save(path)
            lines.append(f"{path}\t{scene.query}")
    (args.out / "queries.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
