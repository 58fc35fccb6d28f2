"""The star_edge.kernels against the naive way and the independent libraries, side by side.

1. Pairwise IoU of 64 masks at 1024x1024 (ellipses of varied size and overlap): the bit-packed
   kernel, with and without the packing, against numpy boolean operations (logical_and /
   logical_or counts, each unordered pair once). (A float32 BLAS matmul of the flattened masks
   was tried as a stronger numpy baseline: 1.7 s at best here, slower than the boolean loop.)
2. 512 assignment problems of random sizes (1..8 x 1..8), and 16 problems of 120x120: one
   linear_sum_assignment_batch call against a Python loop of scipy.optimize.linear_sum_assignment.
   A row shows the compiled solve alone (input already flattened), so the table separates solving
   from turning the list of matrices into one buffer and the answers back into arrays.
3. COCO RLE of the same 64 masks: rle_encode / rle_decode against pycocotools, which needs the masks
   as one Fortran-ordered (H, W, M) uint8 array: timed with that conversion from (M, H, W) bool, and
   without it (pycocotools's best case).

The IoU kernels are timed with 1 Numba thread and with all of them (the others are serial).
Repeats are interleaved across the variants so background load hits them alike; the table shows
medians. JIT compilation is excluded from the medians and measured on its own, in fresh
interpreters: once with an empty Numba cache (compile) and once with the cache warm (load). The
first kernel called in a process (pack_masks here) also pays Numba's one-time runtime start,
about 0.3 s on this machine, whether or not its code comes from the cache.

Usage: python benchmarks/kernels.py [--repeats 7] [--naive-repeats 3] [--threads 1 2]
Writes benchmarks/results/kernels.json.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numba
import numpy as np
import scipy
from pycocotools import mask as coco_mask
from scipy.optimize import linear_sum_assignment

from star_edge.kernels import (
    PackedMasks,
    linear_sum_assignment_batch,
    pack_masks,
    pairwise_iou,
    rle_decode,
    rle_encode,
)
from star_edge.kernels.hungarian import _flatten_batch, _solve_batch
from star_edge.kernels.reference import pairwise_iou_reference

N_MASKS = 64
SIZE = 1024
N_SMALL_PROBLEMS = 512
MAX_SMALL_SIZE = 8
N_LARGE_PROBLEMS = 16
LARGE_SIZE = 120
RESULTS = Path(__file__).parent / "results" / "kernels.json"

COLD_START = """
import json, time, numpy as np
t0 = time.perf_counter()
from star_edge.kernels import (linear_sum_assignment_batch, pack_masks, pairwise_iou, rle_decode,
                               rle_encode)
seconds = {"import_s": time.perf_counter() - t0}

def timed(name, call):
    start = time.perf_counter()
    result = call()
    seconds[name] = time.perf_counter() - start
    return result

masks = np.zeros((3, 16, 16), dtype=bool); masks[:, 4:9, 2:12] = True
packed = timed("pack_masks_s", lambda: pack_masks(masks))
timed("pairwise_iou_symmetric_s", lambda: pairwise_iou(packed))
timed("pairwise_iou_cross_s", lambda: pairwise_iou(packed, packed))
rles = timed("rle_encode_s", lambda: rle_encode(masks))
timed("rle_decode_s", lambda: rle_decode(rles))
timed("linear_sum_assignment_batch_s", lambda: linear_sum_assignment_batch([np.eye(3)]))
print(json.dumps(seconds))
"""


def make_masks(seed: int = 0) -> np.ndarray:
    """(N_MASKS, SIZE, SIZE) bool: ellipses, a third of them near-copies of others."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    masks = np.empty((N_MASKS, SIZE, SIZE), dtype=bool)
    params = rng.uniform([100, 100, 20, 20], [900, 900, 300, 300], size=(N_MASKS, 4))
    for i in range(N_MASKS):
        if i % 3 == 2:  # a near-copy of the previous ellipse, as N samples of one object give
            params[i] = params[i - 1] + rng.normal(0, 4, size=4)
        cx, cy, rx, ry = params[i]
        masks[i] = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
    return masks


def make_cost_batches(seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(N_SMALL_PROBLEMS float64 matrices of random shapes up to MAX_SMALL_SIZE, N_LARGE_PROBLEMS of
    LARGE_SIZE x LARGE_SIZE)."""
    rng = np.random.default_rng(seed)
    shapes = rng.integers(1, MAX_SMALL_SIZE + 1, size=(N_SMALL_PROBLEMS, 2))
    small = [rng.random(tuple(shape)) for shape in shapes]
    large = [rng.random((LARGE_SIZE, LARGE_SIZE)) for _ in range(N_LARGE_PROBLEMS)]
    return small, large


def scipy_loop(costs: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [linear_sum_assignment(cost) for cost in costs]


def coco_encode_from_bool(masks: np.ndarray) -> list[dict]:
    return coco_mask.encode(np.asfortranarray(masks.transpose(1, 2, 0), dtype=np.uint8))


@dataclass
class Variant:
    """One timed row: its group, a call, the Numba threads it runs with (None: not a threaded
    kernel), whether it is the group's baseline, and its times."""

    group: str
    name: str
    call: Callable[[], object]
    repeats: int
    threads: int | None = None
    baseline: bool = False
    times: list[float] = field(default_factory=list)


def build_variants(args: argparse.Namespace) -> list[Variant]:
    masks = make_masks()
    packed = pack_masks(masks)
    small, large = make_cost_batches()
    small_flat, small_shapes = _flatten_batch(small)
    fortran = np.asfortranarray(masks.transpose(1, 2, 0), dtype=np.uint8)
    ours_rles = rle_encode(masks)
    coco_rles = coco_mask.encode(fortran)
    check_answers(masks, packed, small, large, ours_rles, coco_rles)

    iou = f"pairwise IoU, {N_MASKS} masks {SIZE}x{SIZE}"
    variants = [
        Variant(iou, "numpy bool and/or, each pair once", lambda: pairwise_iou_reference(masks),
                args.naive_repeats, baseline=True),
    ]
    for threads in args.threads:
        variants += [
            Variant(iou, "packed kernel, packing excluded", lambda: pairwise_iou(packed), args.repeats, threads),
            Variant(iou, "packed kernel, packing included", lambda: pairwise_iou(pack_masks(masks)),
                    args.repeats, threads),
        ]
    small_group = f"assignment, {N_SMALL_PROBLEMS} problems up to {MAX_SMALL_SIZE}x{MAX_SMALL_SIZE}"
    large_group = f"assignment, {N_LARGE_PROBLEMS} problems {LARGE_SIZE}x{LARGE_SIZE}"
    encode = f"RLE encode, {N_MASKS} masks {SIZE}x{SIZE}"
    decode = f"RLE decode, {N_MASKS} masks {SIZE}x{SIZE}"
    variants += [
        Variant(small_group, "scipy loop", lambda: scipy_loop(small), args.repeats, baseline=True),
        Variant(small_group, "linear_sum_assignment_batch", lambda: linear_sum_assignment_batch(small),
                args.repeats),
        Variant(small_group, "  of which the compiled solve", lambda: _solve_batch(small_flat, small_shapes),
                args.repeats),
        Variant(large_group, "scipy loop", lambda: scipy_loop(large), args.repeats, baseline=True),
        Variant(large_group, "linear_sum_assignment_batch", lambda: linear_sum_assignment_batch(large),
                args.repeats),
        Variant(encode, "pycocotools, from (M, H, W) bool", lambda: coco_encode_from_bool(masks), args.repeats,
                baseline=True),
        Variant(encode, "pycocotools, Fortran uint8 given", lambda: coco_mask.encode(fortran), args.repeats),
        Variant(encode, "rle_encode, from (M, H, W) bool", lambda: rle_encode(masks), args.repeats),
        Variant(decode, "pycocotools, to (H, W, M) uint8", lambda: coco_mask.decode(coco_rles), args.repeats,
                baseline=True),
        Variant(decode, "rle_decode, to (M, H, W) bool", lambda: rle_decode(ours_rles), args.repeats),
    ]
    return variants


def check_answers(
    masks: np.ndarray, packed: PackedMasks, small: list[np.ndarray], large: list[np.ndarray], ours_rles: list[dict],
    coco_rles: list[dict],
) -> None:
    """Exits unless every kernel agrees with its baseline on the benchmark's inputs."""
    if not np.allclose(pairwise_iou(packed), pairwise_iou_reference(masks), rtol=0, atol=1e-12):
        raise SystemExit("pairwise_iou disagrees with numpy")
    for costs in (small, large):
        ours = [c[r, k].sum() for c, (r, k) in zip(costs, linear_sum_assignment_batch(costs))]
        theirs = [c[r, k].sum() for c, (r, k) in zip(costs, scipy_loop(costs))]
        if not np.allclose(ours, theirs, rtol=1e-12, atol=1e-12):
            raise SystemExit("linear_sum_assignment_batch disagrees with scipy")
    if [r["counts"] for r in ours_rles] != [r["counts"].decode() for r in coco_rles]:
        raise SystemExit("rle_encode disagrees with pycocotools")
    if not np.array_equal(rle_decode(ours_rles), masks):
        raise SystemExit("rle_decode does not give the masks back")


def cold_start(cache_dir: str) -> dict[str, float]:
    """Import and first-call seconds of each kernel on a tiny input in a fresh interpreter whose
    Numba cache lives in cache_dir."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, "-c", COLD_START], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def machine() -> dict[str, object]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "numba_threads": numba.config.NUMBA_NUM_THREADS,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "scipy": scipy.__version__,
        "pycocotools": metadata.version("pycocotools"),
        "load_average_1m": os.getloadavg()[0],
    }


def run(variants: list[Variant]) -> None:
    """Warms every variant up once, then times them with interleaved repeats."""
    for variant in variants:
        if variant.threads:
            numba.set_num_threads(variant.threads)
        variant.call()
    for repeat in range(max(v.repeats for v in variants)):
        for variant in variants:
            if repeat < variant.repeats:
                if variant.threads:
                    numba.set_num_threads(variant.threads)
                start = time.perf_counter()
                variant.call()
                variant.times.append((time.perf_counter() - start) * 1e3)


def table(variants: list[Variant]) -> list[dict[str, object]]:
    baselines = {v.group: statistics.median(v.times) for v in variants if v.baseline}
    return [
        {
            "group": v.group,
            "variant": v.name,
            "numba_threads": v.threads,
            "median_ms": statistics.median(v.times),
            "min_ms": min(v.times),
            "speedup_vs_baseline": baselines[v.group] / statistics.median(v.times),
            "times_ms": v.times,
        }
        for v in variants
    ]


def print_table(rows: list[dict[str, object]], jit: dict[str, dict[str, float]]) -> None:
    group = None
    print(f"{'variant':<40} {'threads':>7} {'median ms':>10} {'min ms':>9} {'baseline / this':>16}")
    for row in rows:
        if row["group"] != group:
            group = row["group"]
            print(f"-- {group} (baseline: first row)")
        threads = "-" if row["numba_threads"] is None else row["numba_threads"]
        print(
            f"{row['variant']:<40} {threads:>7} {row['median_ms']:>10.2f} {row['min_ms']:>9.2f}"
            f" {row['speedup_vs_baseline']:>15.1f}x"
        )
    compiled, cached = jit["empty_cache"], jit["warm_cache"]
    print("JIT, first call in a fresh interpreter (empty Numba cache -> warm cache), excluded from the medians:")
    for key in compiled:
        print(f"  {key:<28} {compiled[key]:>7.2f} s -> {cached[key]:.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each kernel and library variant")
    parser.add_argument("--naive-repeats", type=int, default=3, help="timed runs of each numpy IoU variant")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=sorted({1, numba.config.NUMBA_NUM_THREADS}),
        help="Numba thread counts to time the IoU kernels with (default: 1 and all)",
    )
    args = parser.parse_args()
    host = machine()  # before the run, so the load average is the other processes'

    with tempfile.TemporaryDirectory() as cache_dir:
        jit = {"empty_cache": cold_start(cache_dir), "warm_cache": cold_start(cache_dir)}

    variants = build_variants(args)
    run(variants)
    rows = table(variants)
    host["numba_threading_layer"] = numba.threading_layer()  # known once a parallel kernel has run
    print_table(rows, jit)

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "kernels",
        "input": {
            "masks": N_MASKS, "size": SIZE, "small_problems": N_SMALL_PROBLEMS, "max_small_size": MAX_SMALL_SIZE,
            "large_problems": N_LARGE_PROBLEMS, "large_size": LARGE_SIZE,
        },
        "rows": rows,
        "jit": jit,
        "machine": host,
    }
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
