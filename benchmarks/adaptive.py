"""Adaptive test-time scaling against fixed N, side by side: samples used, time, and the outcome.

`segment(samples=N, adaptive=True)` decodes the N samples in one batch, votes on answers as they
finish, and stops the batch once the answers still decoding cannot change the vote; `margin=2`
stops once 2 more could not. Both are compared with `segment(samples=N)` on the same seeds (the same
sample rows), N in {8, 16}.

Bundles: the default bundle (results/adaptive.json was measured with the untrained default that
shipped before the trained demo model: its answers never ended early and did not parse, so no vote
settled; the key still says so), and scripted tiny Qwen3-VL bundles whose reasoner answers one of a few texts with equal
probability (a genuine model run with crafted weights, see export/tiny_reasoner.py), standing in for
a trained model whose reasoning varies in length, at three levels of agreement:
- agree: the red disc, thought about briefly, at some length, and at length;
- majority: the red disc (brief, medium), the blue square (long), a malformed answer;
- split: the red disc, the blue square, "nothing", a malformed answer (lengths vary).
SAM is the bundles' tiny random model, so masks are not meaningful; the quality measures are the
vote's: whether the final labels are the intended target ("red circle"), and the IoU of the final
mask with the fixed-N result (1.0 = the same answer as the full budget).

Usage: python benchmarks/adaptive.py [--seeds 10]
Writes benchmarks/results/adaptive.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from star_edge.bench import bench_image
from star_edge.defaults import default_bundle_path
from star_edge.export.tiny import make_tiny_bundle
from star_edge.segmenter import Segmenter

RESULTS = Path(__file__).parent / "results" / "adaptive.json"
QUERY = "the red circle"
TARGET = "red circle"
SAMPLE_COUNTS = (8, 16)


def _answer(box: tuple[int, int, int, int], point: tuple[int, int], label: str, thought: str) -> str:
    objects = [{"bbox_2d": list(box), "point_2d": list(point), "label": label}]
    return f"<think>{thought}</think><answer>{json.dumps(objects)}</answer>"


# On bench_image() (640 x 480) in the 0-1000 grid: the red disc and the blue square.
LONG_THOUGHT = "I compare every shape in turn: its colour, its outline and where it sits. " * 4
DISC = [_answer((165, 370, 435, 730), (300, 550), TARGET, "The red shape is the circle."),
        _answer((170, 375, 430, 725), (300, 560), TARGET, "A red circle sits on the left, below the middle, "
                "next to a green triangle and a blue square."),
        _answer((160, 365, 440, 735), (305, 545), TARGET, LONG_THOUGHT + "Red and round: the disc.")]
SQUARE = _answer((550, 150, 800, 450), (675, 300), "blue square", LONG_THOUGHT + "The square looks reddish.")
BROKEN = '<think>Hmm, maybe the circle or the square.</think><answer>[{"bbox_2d": [1, 2'
NOTHING = "<think>No red circle here; the round shape is orange.</think><answer>[]</answer>"
SCRIPTS = {
    "agree": DISC,
    "majority": DISC[:2] + [SQUARE, BROKEN],
    "split": [DISC[0], SQUARE, NOTHING, BROKEN],
}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def measure(segmenter: Segmenter, image: np.ndarray, n: int, seeds: int) -> dict:
    """Fixed N, adaptive and adaptive with margin 2 on seeds 0..seeds-1 (interleaved)."""
    modes = {"fixed": {}, "adaptive": {"adaptive": True}, "margin2": {"adaptive": True, "margin": 2}}
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for seed in range(seeds):
        fixed_mask = None
        for mode, options in modes.items():
            start = time.perf_counter()
            result = segmenter.segment(image, QUERY, samples=n, seed=seed, **options)
            elapsed = (time.perf_counter() - start) * 1e3
            fixed_mask = result.mask if mode == "fixed" else fixed_mask
            runs[mode].append({
                "ms": elapsed,
                "drawn": len(result.samples),
                "decode_ms": result.timings["decode"],
                "correct": [obj.label for obj in result.objects] == [TARGET],
                "iou_with_fixed": _iou(result.mask, fixed_mask),
            })
    fixed_ms = statistics.median(run["ms"] for run in runs["fixed"])
    return {mode: {
        "samples_used": round(statistics.mean(run["drawn"] for run in rows), 2),
        "median_ms": round(statistics.median(run["ms"] for run in rows), 1),
        "median_decode_ms": round(statistics.median(run["decode_ms"] for run in rows), 1),
        "speedup_vs_fixed": round(fixed_ms / statistics.median(run["ms"] for run in rows), 2),
        "target_rate": round(statistics.mean(run["correct"] for run in rows), 2),
        "mean_iou_with_fixed": round(statistics.mean(run["iou_with_fixed"] for run in rows), 3),
        "same_as_fixed_rate": round(statistics.mean(run["iou_with_fixed"] == 1.0 for run in rows), 2),
    } for mode, rows in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    image = bench_image()
    report: dict = {"query": QUERY, "seeds": args.seeds, "bundles": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        paths = {"default (untrained)": default_bundle_path()}
        for name, answers in SCRIPTS.items():
            paths[name] = Path(folder) / name
            make_tiny_bundle(paths[name], seed=0, family="qwen3_vl", scripted_answers=answers)
        for name, path in paths.items():
            with Segmenter.from_pretrained(path) as segmenter:
                segmenter.segment(image, QUERY, samples=2, seed=0)  # warm-up
                report["bundles"][name] = {str(n): measure(segmenter, image, n, args.seeds) for n in SAMPLE_COUNTS}
            print(f"{name}: done", flush=True)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    print(f"\n{'bundle':<22}{'N':>3} {'mode':<10}{'used':>6}{'median ms':>11}{'decode ms':>11}{'speedup':>9}"
          f"{'target':>8}{'IoU vs fixed':>14}{'same':>6}")
    for name, by_n in report["bundles"].items():
        for n, modes in by_n.items():
            for mode, row in modes.items():
                print(f"{name:<22}{n:>3} {mode:<10}{row['samples_used']:>6.1f}{row['median_ms']:>11.0f}"
                      f"{row['median_decode_ms']:>11.0f}{row['speedup_vs_fixed']:>9.2f}{row['target_rate']:>8.2f}"
                      f"{row['mean_iou_with_fixed']:>14.3f}{row['same_as_fixed_rate']:>6.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS} ({report['wall_s']} s)")


if __name__ == "__main__":
    main()
