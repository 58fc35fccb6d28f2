"""Per-stage timings of `Segmenter.segment` on any bundle (`star-edge bench`).

For each sample count, `run_bench` calls `segment` `repeat` times (seeds 0..repeat-1, after one
untimed warm-up call per count) and reports the median (p50) and 95th percentile (p95, linear
interpolation between order statistics; with fewer than 20 calls it lies close to the slowest call)
of every stage in `Result.timings`, plus "other": what `total` holds outside the stages (image
checks, answer parsing, the union of the masks). SAM's embedding cache is emptied before every
timed call, so "sam_encode" times the image encoder, as for a new camera frame, not a cache lookup.
Runtime code: the scripts in benchmarks/ may call it, it never imports them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from star_edge.errors import InvalidInputError
from star_edge.segmenter import Segmenter, check_samples

#: The stages of `Result.timings` reported, in pipeline order (DESIGN section 2); they do not overlap.
PIPELINE_STAGES = ("preprocess", "vision", "prefill", "decode", "sam_encode", "sam_decode", "vote")
#: Every row of the report: the stages, "other" (total minus the stages) and "total".
STAGES = (*PIPELINE_STAGES, "other", "total")
WARMUP_CALLS = 1
DEFAULT_QUERY = "the red circle"


@dataclass(frozen=True)
class BenchRow:
    """The timings of one sample count.

    Attributes:
        samples: N passed to `segment`.
        repeat: timed calls.
        p50: stage -> median ms.
        p95: stage -> 95th percentile ms.
        samples_used: mean number of samples drawn (below N only with adaptive=True).
        parsed: mean number of samples that parsed.
    """

    samples: int
    repeat: int
    p50: dict[str, float]
    p95: dict[str, float]
    samples_used: float
    parsed: float

    def to_json(self) -> dict:
        return {"samples": self.samples, "repeat": self.repeat, "p50_ms": self.p50, "p95_ms": self.p95,
                "samples_used": self.samples_used, "parsed": self.parsed}


def bench_image(width: int = 640, height: int = 480) -> np.ndarray:
    """A fixed test scene: (height, width, 3) uint8, light background with a red disc, a blue
    square and a green triangle."""
    rows, cols = np.mgrid[0:height, 0:width]
    image = np.full((height, width, 3), 235, dtype=np.uint8)
    disc = (rows - 0.55 * height) ** 2 + (cols - 0.3 * width) ** 2 <= (0.18 * height) ** 2
    image[disc] = (210, 40, 40)
    image[int(0.15 * height):int(0.45 * height), int(0.55 * width):int(0.8 * width)] = (40, 70, 200)
    triangle = (rows > 0.6 * height) & (rows < 0.9 * height) & (np.abs(cols - 0.72 * width) < (rows - 0.6 * height))
    image[triangle] = (40, 160, 60)
    return image


def run_bench(
    segmenter: Segmenter,
    image: np.ndarray,
    query: str = DEFAULT_QUERY,
    samples: Sequence[int] = (1, 2, 4, 8),
    repeat: int = 5,
    adaptive: bool = False,
) -> list[BenchRow]:
    """Time `segmenter.segment` per sample count.

    Args:
        segmenter: a loaded Segmenter.
        image: (H, W, 3) uint8 RGB (or anything `segment` takes).
        query: the query of every call.
        samples: the sample counts to time.
        repeat: timed calls per count (>= 1), seeded 0..repeat-1.
        adaptive: pass adaptive=True to `segment`.

    Returns:
        One BenchRow per sample count, in the order given.

    Raises:
        InvalidInputError: a bad sample count or repeat.
    """
    check_repeat(repeat)
    counts = [check_samples(n) for n in samples]
    if not counts:
        raise InvalidInputError("give at least one sample count")
    rows = []
    for n in counts:
        for _ in range(WARMUP_CALLS):
            segmenter.segment(image, query, samples=n, seed=0, adaptive=adaptive)
        results = []
        for seed in range(repeat):
            segmenter.mask_decoder.cache.clear()
            results.append(segmenter.segment(image, query, samples=n, seed=seed, adaptive=adaptive))
        table = {stage: np.array([_stage_ms(result.timings, stage) for result in results]) for stage in STAGES}
        rows.append(BenchRow(
            samples=n,
            repeat=repeat,
            p50={stage: float(np.percentile(values, 50)) for stage, values in table.items()},
            p95={stage: float(np.percentile(values, 95)) for stage, values in table.items()},
            samples_used=float(np.mean([len(result.samples) for result in results])),
            parsed=float(np.mean([sum(sample.ok for sample in result.samples) for result in results])),
        ))
    return rows


def _stage_ms(timings: dict[str, float], stage: str) -> float:
    """One row's value of a call: a stage's ms (0 when the call has no such stage), "other" =
    total minus the stages, or "total"."""
    if stage == "other":
        return timings["total"] - sum(timings.get(name, 0.0) for name in PIPELINE_STAGES)
    return timings.get(stage, 0.0)


def check_repeat(repeat: object) -> int:
    """`repeat` as a positive int, or InvalidInputError."""
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise InvalidInputError(f"repeat must be a positive integer, got {repeat!r}")
    return repeat


def parse_sample_counts(text: str) -> list[int]:
    """"1,2,4,8" -> [1, 2, 4, 8].

    Raises:
        InvalidInputError: not a comma-separated list of integers in [1, MAX_SAMPLES].
    """
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise InvalidInputError(f"--samples must be comma-separated integers such as 1,2,4,8, got {text!r}") from None
    if not counts:
        raise InvalidInputError(f"--samples must name at least one sample count, got {text!r}")
    return [check_samples(n) for n in counts]
