"""Majority voting at a realistic size: star_edge.vote.majority_vote against the naive way, side by side.

32 samples x 3 objects at 1024x1024: noisy copies of 3 base shapes, with 8 of the 96 objects
missed and 3 samples hallucinating one more. The naive way computes the IoU of every pair with
numpy boolean operations, then runs the same algorithm (greedy clustering on the first members,
votes, ranking, "best" masks). A middle row uses numpy boolean IoU on candidate-vs-head pairs only,
so the table separates what comes from computing fewer pairs and what comes from bit-packing.

The kernels are timed with 1 Numba thread and with all of them: on a machine shared with other
work, a parallel kernel waits for its slowest thread at every call. Repeats are interleaved across
the variants, so background load hits them alike. JIT compilation is excluded from the medians and
measured on its own, in fresh interpreters: once with an empty Numba cache (compile) and once with
the cache warm (load).

Usage: python benchmarks/vote.py [--repeats 9] [--naive-repeats 3] [--threads 1 2]
Writes benchmarks/results/vote.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numba
import numpy as np

from star_edge.kernels.iou import pack_masks
from star_edge.vote import VoteConfig, VotedObject, majority_vote

SIZE = 1024
N_SAMPLES = 32
N_OBJECTS = 3
N_MISSES = 8  # (sample, object) pairs that a sample leaves out
N_HALLUCINATING = 3  # samples that add an object that is not there
RESULTS = Path(__file__).parent / "results" / "vote.json"

COLD_START = """
import time, numpy as np
t0 = time.perf_counter()
from star_edge.vote import majority_vote
t1 = time.perf_counter()
masks = np.zeros((3, 32, 32), dtype=bool); masks[:, 4:20, 4:20] = True
majority_vote(masks, [0.9, 0.8, 0.7], [0, 1, 2], ["a", "a", "a"], 3, [1, 1, 1])
t2 = time.perf_counter()
majority_vote(masks, [0.9, 0.8, 0.7], [0, 1, 2], ["a", "a", "a"], 3, [1, 1, 1])
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""


def make_candidates(seed: int = 0) -> dict[str, object]:
    """The benchmark's input: (M, 1024, 1024) bool masks and their scores, sample ids, labels and
    per-sample object counts, as majority_vote takes them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)

    def ellipse(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0

    def jitter(scale: float = 1.0) -> float:
        return float(rng.normal(0.0, 3.0 * scale))

    def shape(kind: int) -> np.ndarray:
        if kind == 0:  # a mug: an ellipse
            scale = 1 + jitter(0.004)
            return ellipse(300 + jitter(), 320 + jitter(), 120 * scale, 90 * scale)
        if kind == 1:  # a book: a rectangle
            x0, y0, x1, y1 = (int(v + jitter()) for v in (560, 180, 900, 420))
            mask = np.zeros((SIZE, SIZE), dtype=bool)
            mask[y0:y1, x0:x1] = True
            return mask
        # a plant: a blob of three overlapping disks
        return (
            ellipse(420 + jitter(), 720 + jitter(), 110, 110)
            | ellipse(540 + jitter(), 680 + jitter(), 90, 90)
            | ellipse(480 + jitter(), 820 + jitter(), 80, 80)
        )

    masks, scores, sample_ids, labels, counts = [], [], [], [], []
    names = ("mug", "book", "plant")
    misses = set(rng.choice(N_SAMPLES * N_OBJECTS, size=N_MISSES, replace=False).tolist())
    hallucinating = set(rng.choice(N_SAMPLES, size=N_HALLUCINATING, replace=False).tolist())
    for sample in range(N_SAMPLES):
        for kind in range(N_OBJECTS):
            if sample * N_OBJECTS + kind in misses:
                continue
            masks.append(shape(kind))
            labels.append(names[kind] if rng.random() > 0.1 else "thing")
        if sample in hallucinating:  # an object somewhere else
            masks.append(ellipse(rng.uniform(100, 900), rng.uniform(100, 900), 60, 40))
            labels.append("lamp")
        n = len(masks) - len(sample_ids)
        sample_ids.extend([sample] * n)
        scores.extend(rng.uniform(0.75, 0.98, size=n).tolist())
        counts.append(n)
    return dict(
        masks=np.stack(masks),
        scores=np.array(scores),
        sample_ids=np.array(sample_ids),
        labels=labels,
        n_valid=N_SAMPLES,
        object_counts=counts,
    )


def naive_majority_vote(
    masks: np.ndarray,
    scores: np.ndarray,
    sample_ids: np.ndarray,
    labels: list[str],
    n_valid: int,
    object_counts: list[int],
    heads_only: bool = False,
) -> list[VotedObject]:
    """The same algorithm with numpy boolean IoU: every pair first (heads_only=False), or only
    candidate-vs-head pairs; default VoteConfig, "best" aggregation."""
    config = VoteConfig()
    m = len(masks)
    if object_counts.count(0) / n_valid >= config.no_target_ratio:
        return []
    nonzero = Counter(c for c in object_counts if c)
    k = max(nonzero, key=nonzero.__getitem__)
    areas = masks.reshape(m, -1).sum(axis=1)

    def iou(i: int, j: int) -> float:
        union = np.count_nonzero(masks[i] | masks[j])
        return np.count_nonzero(masks[i] & masks[j]) / union if union else 0.0

    if not heads_only:
        matrix = np.eye(m)
        for i in range(m):
            for j in range(i + 1, m):
                matrix[i, j] = matrix[j, i] = iou(i, j)
    clusters: list[list[int]] = []
    for i in range(m):
        head_iou = (iou(i, c[0]) if heads_only else matrix[i, c[0]] for c in clusters)
        home = next((c for c, value in zip(clusters, head_iou) if value >= config.iou_threshold), None)
        if home is None:
            clusters.append([i])
        else:
            home.append(i)
    votes = [len(set(sample_ids[c].tolist())) for c in clusters]
    means = [float(np.mean(scores[c])) for c in clusters]
    everything = list(range(len(clusters)))
    kept = [x for x in everything if votes[x] / n_valid >= config.min_vote_ratio] or everything
    ranked = sorted(kept, key=lambda x: (votes[x], means[x]), reverse=True)[:k]
    objects = []
    for x in ranked:
        best = max(clusters[x], key=lambda j: (scores[j], areas[j]))
        label_counts = Counter(labels[j] for j in clusters[x])
        label = max(label_counts, key=label_counts.__getitem__)
        objects.append(VotedObject(masks[best].copy(), means[x], label, votes[x], tuple(clusters[x]), best))
    return objects


def same_objects(a: list[VotedObject], b: list[VotedObject]) -> bool:
    same_members = [o.members for o in a] == [o.members for o in b]
    return same_members and all(np.array_equal(x.mask, y.mask) for x, y in zip(a, b))


@dataclass
class Variant:
    """One timed row: a call, the Numba threads it runs with (None: numpy only) and its times."""

    name: str
    call: Callable[[], object]
    repeats: int
    threads: int | None = None
    same_as_naive: bool = False
    times: list[float] = field(default_factory=list)


def cold_start(cache_dir: str) -> dict[str, float]:
    """Import, first-call and second-call seconds of majority_vote on a tiny input in a fresh
    interpreter whose Numba cache lives in cache_dir."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    command = [sys.executable, "-c", COLD_START]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    import_s, first_s, second_s = (float(v) for v in out.stdout.split())
    return {"import_s": import_s, "first_call_s": first_s, "second_call_s": second_s}


def machine() -> dict[str, object]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "numba_threads": numba.config.NUMBA_NUM_THREADS,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "load_average_1m": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="timed runs of each majority_vote variant")
    parser.add_argument("--naive-repeats", type=int, default=3, help="timed runs of each naive variant")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=sorted({1, numba.config.NUMBA_NUM_THREADS}),
        help="Numba thread counts to time the kernels with (default: 1 and all)",
    )
    args = parser.parse_args()
    host = machine()  # before the run, so the load average is the other processes'

    with tempfile.TemporaryDirectory() as cache_dir:
        compile_run = cold_start(cache_dir)
        cached_run = cold_start(cache_dir)

    inputs = make_candidates()
    m = len(inputs["masks"])
    consensus, components = VoteConfig(aggregation="consensus"), VoteConfig(clustering="components")
    variants = [
        Variant(
            "naive: numpy bool IoU, all pairs",
            lambda: naive_majority_vote(**inputs), args.naive_repeats, same_as_naive=True,
        ),
        Variant(
            "numpy bool IoU, candidate vs heads",
            lambda: naive_majority_vote(**inputs, heads_only=True), args.naive_repeats, same_as_naive=True,
        ),
    ]
    for threads in args.threads:
        variants += [
            Variant(
                "majority_vote greedy best (packed, vs heads)",
                lambda: majority_vote(**inputs), args.repeats, threads, same_as_naive=True,
            ),
            Variant(
                "majority_vote greedy consensus",
                lambda: majority_vote(**inputs, config=consensus), args.repeats, threads,
            ),
            Variant(
                "majority_vote components best (all pairs)",
                lambda: majority_vote(**inputs, config=components), args.repeats, threads,
            ),
            Variant("  of which pack_masks", lambda: pack_masks(inputs["masks"]), args.repeats, threads),
        ]
    reference = variants[0].call()
    for variant in variants[1:]:  # warm-up: compiles or loads the kernels, and checks the answers
        if variant.threads:
            numba.set_num_threads(variant.threads)
        result = variant.call()
        if variant.same_as_naive and not same_objects(result, reference):
            raise SystemExit(f"{variant.name!r} disagrees with the naive way")

    # Interleaved repeats: load from other processes on this machine hits every variant alike.
    for repeat in range(max(args.repeats, args.naive_repeats)):
        for variant in variants:
            if repeat < variant.repeats:
                if variant.threads:
                    numba.set_num_threads(variant.threads)
                start = time.perf_counter()
                variant.call()
                variant.times.append((time.perf_counter() - start) * 1e3)

    naive_ms = statistics.median(variants[0].times)
    rows = [
        {
            "variant": v.name,
            "numba_threads": v.threads,
            "median_ms": statistics.median(v.times),
            "min_ms": min(v.times),
            "speedup_vs_naive": naive_ms / statistics.median(v.times),
            "times_ms": v.times,
        }
        for v in variants
    ]
    objects = majority_vote(**inputs)
    print(f"majority voting: {N_SAMPLES} samples, {m} candidates at {SIZE}x{SIZE}; "
          f"kept {len(objects)} objects with votes {[o.votes for o in objects]}")
    print(f"{'variant':<46} {'threads':>7} {'median ms':>10} {'min ms':>8} {'naive / this':>13}")
    for row in rows:
        threads = "-" if row["numba_threads"] is None else row["numba_threads"]
        print(
            f"{row['variant']:<46} {threads:>7} {row['median_ms']:>10.1f} {row['min_ms']:>8.1f}"
            f" {row['speedup_vs_naive']:>12.1f}x"
        )
    print(
        f"JIT (fresh interpreter, tiny input): first call {compile_run['first_call_s']:.2f} s with an empty"
        f" Numba cache, {cached_run['first_call_s']:.2f} s with the cache warm; excluded from the medians"
    )

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "vote",
                "input": {
                    "samples": N_SAMPLES, "objects_per_sample": N_OBJECTS, "candidates": m, "size": SIZE,
                },
                "result": {"votes": [o.votes for o in objects], "labels": [o.label for o in objects]},
                "rows": rows,
                "jit": {"empty_cache": compile_run, "warm_cache": cached_run},
                "machine": host,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
