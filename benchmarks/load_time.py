"""Time to load a bundle in a fresh process, per backend, side by side: what `star-edge segment`
pays before its first answer.

Each measurement is a new Python process that runs `import star_edge` and
`Segmenter.from_pretrained(bundle, backend=...)` and reports its wall and CPU time for both
(imports included: they are most of it). Backends alternate, --repeats times each; the medians and
the torch / onnx ratio are printed. The default bundle (or --bundle) must hold ONNX graphs.

Usage: python benchmarks/load_time.py [--repeats 5] [--bundle DIR]
Writes benchmarks/results/load_time.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "load_time.json"
BACKENDS = ("torch", "onnx")
_PROBE = """
import json, sys, time
wall, cpu = time.perf_counter(), time.process_time()
from star_edge import Segmenter
segmenter = Segmenter.from_pretrained(sys.argv[1] or None, backend=sys.argv[2])
print(json.dumps({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                  "backend": segmenter.backend, "torch_imported": "torch" in sys.modules}))
"""


def load_once(bundle: str, backend: str) -> dict:
    """One fresh process loading `bundle` ("" for the default) with `backend`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _PROBE, bundle, backend], capture_output=True, text=True,
                          env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bundle", default="", help="a bundle folder (default: the shipped demo bundle)")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {backend: [] for backend in BACKENDS}
    for _ in range(args.repeats):
        for backend in BACKENDS:
            runs[backend].append(load_once(args.bundle, backend))
    summary = {backend: {"wall_s": statistics.median(r["wall_s"] for r in found),
                         "cpu_s": statistics.median(r["cpu_s"] for r in found),
                         "torch_imported": any(r["torch_imported"] for r in found)}
               for backend, found in runs.items()}
    auto = load_once(args.bundle, "auto")
    ratio = summary["torch"]["wall_s"] / summary["onnx"]["wall_s"]
    for backend, numbers in summary.items():
        print(f"{backend:6s} load: {numbers['wall_s']:.2f} s wall, {numbers['cpu_s']:.2f} s CPU (median of "
              f"{args.repeats}; torch imported: {numbers['torch_imported']})")
    print(f"torch / onnx: {ratio:.1f}x; backend='auto' chose {auto['backend']} ({auto['wall_s']:.2f} s)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "bundle": args.bundle or "default", "repeats": args.repeats, "median": summary,
        "torch_over_onnx": ratio, "auto": auto, "runs": runs,
        "machine": {"python": platform.python_version(), "processor": platform.processor(),
                    "cpus": os.cpu_count()},
    }, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
