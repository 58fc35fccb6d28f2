"""Soak: many `segment` calls on one Segmenter, resident memory (RSS) over time, and cache sizes.

A long-running robot calls `segment` in a loop for hours; memory must level off once the caches
are full. This runs --calls calls (default 1,000) from --threads threads sharing one Segmenter,
cycling through 16 images of different sizes (twice the SAM embedding cache), sample counts 1, 4 and
8, fresh seeds, and adaptive stopping on every third call. RSS (VmRSS from /proc/self/status) is
sampled every --every calls; the growth from the end of the warm-up (--warmup calls) to the last
call must stay under --limit-mib (64 MiB), and every cache must stay within its bound: the SAM
embedding cache, the bundle hash cache, and every functools.lru_cache in star_edge's modules.

Model: a tiny scripted Qwen2.5-VL bundle (a genuine model run with crafted weights answering one of
a few texts: one object, two objects, a malformed answer, "nothing"; see export/tiny_reasoner.py)
and the tiny random SAM, built into a temporary folder; or --bundle DIR.

Usage: python benchmarks/soak.py [--calls 1000] [--threads 1] [--warmup 100] [--every 25]
Writes benchmarks/results/soak.json; exits 1 when memory grows past the limit or a cache past its bound.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import star_edge.bundle
from star_edge.export.tiny import make_tiny_bundle
from star_edge.segmenter import Segmenter

RESULTS = Path(__file__).parent / "results" / "soak.json"
QUERY = "what could I drink from?"
SAMPLE_COUNTS = (1, 4, 8)
IMAGES = 16
ANSWERS = [
    '<think>A mug holds drinks.</think><answer>[{"bbox_2d": [40, 60, 150, 180], "point_2d": [95, 120], '
    '"label": "mug"}]</answer>',
    '<think>Both cups hold drinks.</think><answer>[{"bbox_2d": [40, 60, 150, 180], "point_2d": [95, 120], '
    '"label": "mug"}, {"bbox_2d": [160, 20, 220, 90], "point_2d": [190, 55], "label": "cup"}]</answer>',
    '<think>Hmm.</think><answer>[{"bbox_2d": [1, 2',
    "<think>Nothing here holds a drink.</think><answer>[]</answer>",
]


def rss_mib() -> float:
    """Resident set size of this process in MiB (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (this benchmark needs Linux)")


def make_images(count: int = IMAGES) -> list[np.ndarray]:
    """`count` (H, W, 3) uint8 scenes of different sizes (96..330 px) and content."""
    rng = np.random.default_rng(0)
    images = []
    for index in range(count):
        height, width = 96 + 13 * index, 330 - 11 * index
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        pixels[height // 3: height - 8, width // 5: width // 2] = rng.integers(0, 256, 3)
        images.append(pixels)
    return images


def lru_caches() -> dict[str, dict[str, int | None]]:
    """Every functools.lru_cache found at module level in the loaded star_edge modules."""
    caches = {}
    for name, module in sorted(sys.modules.items()):
        if not name.startswith("star_edge") or module is None:
            continue
        for attribute, value in vars(module).items():
            if callable(value) and hasattr(value, "cache_info") and getattr(value, "__module__", None) == name:
                info = value.cache_info()
                caches[f"{name}.{attribute}"] = {"size": info.currsize, "bound": info.maxsize}
    return caches


def cache_report(segmenter: Segmenter) -> dict[str, dict[str, int | None]]:
    """Size and bound of every cache the runtime keeps (bound None: unbounded)."""
    embeddings = segmenter.mask_decoder.cache
    return {
        "sam embeddings": {"size": len(embeddings), "bound": embeddings.capacity},
        # one entry per distinct (file, size, mtime): bounded by the bundle files read
        "bundle hashes": {"size": len(star_edge.bundle._hash_cache), "bound": len(segmenter.bundle.files)},
        **lru_caches(),
    }


@dataclass
class Soak:
    """The shared state of the calling threads: the next call index and the RSS samples."""

    calls: int
    every: int
    started: float = field(default_factory=time.perf_counter)
    samples: list[dict[str, float]] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=lambda: {"samples_ok": 0, "samples_failed": 0, "objects": 0})
    errors: list[BaseException] = field(default_factory=list)
    _next: itertools.count = field(default_factory=itertools.count)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self) -> int | None:
        """The next call index, or None when all calls are taken."""
        with self._lock:
            index = next(self._next)
        return index if index < self.calls else None

    def record(self, index: int, ok: int, failed: int, objects: int) -> None:
        with self._lock:
            self.outcomes["samples_ok"] += ok
            self.outcomes["samples_failed"] += failed
            self.outcomes["objects"] += objects
            if (index + 1) % self.every == 0 or index + 1 == self.calls:
                self.samples.append({"call": index + 1, "seconds": time.perf_counter() - self.started,
                                     "rss_mib": rss_mib()})


def worker(segmenter: Segmenter, images: list[np.ndarray], soak: Soak) -> None:
    """Take calls until none are left; an exception ends this thread and is kept for the report."""
    try:
        while (index := soak.take()) is not None:
            samples = SAMPLE_COUNTS[index % len(SAMPLE_COUNTS)]
            result = segmenter.segment(images[index % len(images)], QUERY, samples=samples, seed=index,
                                       adaptive=index % 3 == 2)
            ok = sum(sample.ok for sample in result.samples)
            soak.record(index, ok, len(result.samples) - ok, len(result.objects))
    except Exception as exc:  # reported by main, which then fails
        soak.errors.append(exc)


def growth_per_100_calls(samples: list[dict[str, float]], after: int) -> float:
    """Least-squares slope of RSS (MiB per 100 calls) over the samples after call `after`."""
    points = [(s["call"], s["rss_mib"]) for s in samples if s["call"] > after]
    if len(points) < 2:
        return 0.0
    calls, rss = np.array(points).T
    return float(np.polyfit(calls, rss, 1)[0] * 100)


def machine() -> dict[str, object]:
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "load_average_1m": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="segment calls in all")
    parser.add_argument("--threads", type=int, default=1, help="threads sharing the Segmenter")
    parser.add_argument("--warmup", type=int, default=100, help="calls before the baseline RSS")
    parser.add_argument("--every", type=int, default=25, help="sample RSS every this many calls")
    parser.add_argument("--limit-mib", type=float, default=64.0, help="allowed RSS growth after warm-up")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: a scripted tiny one)")
    args = parser.parse_args()
    if not 0 < args.warmup < args.calls or args.every < 1 or args.threads < 1:
        parser.error("need 0 < --warmup < --calls, --every >= 1 and --threads >= 1")
    if args.warmup % args.every:
        parser.error("--warmup must be a multiple of --every (the baseline is an RSS sample)")
    host = machine()  # before the run, so the load average is the other processes'
    torch.set_num_threads(args.torch_threads)

    with tempfile.TemporaryDirectory() as folder:
        bundle = args.bundle
        if bundle is None:
            bundle = Path(folder) / "bundle"
            make_tiny_bundle(bundle, seed=1, family="qwen2_5_vl", scripted_answers=ANSWERS)
        images = make_images()
        start_rss = rss_mib()
        with Segmenter.from_pretrained(bundle) as segmenter:
            loaded_rss = rss_mib()
            soak = Soak(calls=args.calls, every=args.every)
            threads = [threading.Thread(target=worker, args=(segmenter, images, soak))
                       for _ in range(args.threads)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            caches = cache_report(segmenter)
            name = segmenter.bundle.name
    if soak.errors:
        raise SystemExit(f"{len(soak.errors)} thread(s) failed; the first: {soak.errors[0]!r}")
    seconds = soak.samples[-1]["seconds"]

    baseline = next(s["rss_mib"] for s in soak.samples if s["call"] == args.warmup)
    after_warmup = [s for s in soak.samples if s["call"] >= args.warmup]
    end = soak.samples[-1]["rss_mib"]
    growth, peak = end - baseline, max(s["rss_mib"] for s in after_warmup)
    slope = growth_per_100_calls(soak.samples, args.warmup)
    unbounded = [key for key, cache in caches.items() if cache["bound"] is None or cache["size"] > cache["bound"]]
    passed = growth < args.limit_mib and peak - baseline < args.limit_mib and not unbounded

    print(f"soak: {args.calls} segment calls on {args.threads} thread(s), bundle {name}, "
          f"{seconds:.1f} s ({args.calls / seconds:.1f} calls/s), torch threads {args.torch_threads}")
    print(f"samples parsed {soak.outcomes['samples_ok']}, failed {soak.outcomes['samples_failed']}; "
          f"objects {soak.outcomes['objects']}")
    print(f"{'call':>6} {'seconds':>8} {'RSS MiB':>8}")
    shown = soak.samples[:: max(1, len(soak.samples) // 20)]
    for sample in shown + ([] if shown[-1] is soak.samples[-1] else soak.samples[-1:]):
        print(f"{sample['call']:>6} {sample['seconds']:>8.1f} {sample['rss_mib']:>8.1f}")
    print(f"RSS: {start_rss:.1f} MiB before loading, {loaded_rss:.1f} loaded, {baseline:.1f} after {args.warmup} "
          f"warm-up calls, {end:.1f} at the end, peak {peak:.1f} after warm-up")
    print(f"growth after warm-up: {growth:+.1f} MiB (limit {args.limit_mib:.0f}), trend {slope:+.2f} MiB / 100 calls")
    for key, cache in caches.items():
        print(f"cache {key}: {cache['size']} / {cache['bound']}")
    print("PASS" if passed else f"FAIL (unbounded or overfull caches: {unbounded})" if unbounded else "FAIL")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "soak",
        "input": {"calls": args.calls, "threads": args.threads, "warmup": args.warmup, "every": args.every,
                  "torch_threads": args.torch_threads, "bundle": name, "images": IMAGES,
                  "sample_counts": list(SAMPLE_COUNTS), "adaptive": "every third call"},
        "result": {"passed": passed, "limit_mib": args.limit_mib, "rss_before_load_mib": start_rss,
                   "rss_loaded_mib": loaded_rss, "rss_after_warmup_mib": baseline, "rss_end_mib": end,
                   "rss_peak_after_warmup_mib": peak, "growth_after_warmup_mib": growth,
                   "trend_mib_per_100_calls": slope, "seconds": seconds, "calls_per_second": args.calls / seconds,
                   **soak.outcomes},
        "caches": caches,
        "rss": soak.samples,
        "machine": host,
    }, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    if not passed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
