"""N answers from one prompt: the shared-prefill decoder against the two usual ways, side by side.

For each model and N in {1, 2, 4, 8, 16}, three ways to draw N answers of exactly T new tokens
(the models are untrained and rarely emit an end token, so the end token is disabled everywhere and
every way does the same amount of decoding):

- ours: `sampling.prefill` (one vision encode, one prefill of batch 1) + `sampling.decode` of N rows
  in one batch (greedy when N = 1);
- sequential: N calls of `model.generate(**inputs, num_return_sequences=1)`;
- hf_nrs: one call of `model.generate(**inputs, num_return_sequences=N)`.
All three sample with temperature 1.0, top-p 0.9, top-k off (N > 1). The processor runs once per
model, outside the timings. Stages: vision (vision tower), prefill (the language model reading the
prompt), decode (all later steps, sampling included); for Hugging Face they are measured with forward
hooks, which also record how many times the vision tower ran and how many rows the first language
model forward had (what `num_return_sequences` really shares). Peak memory: the growth of the
process's resident set during the call, sampled every millisecond after `malloc_trim` returned freed
memory to the system (CPU; on CUDA, `torch.cuda.max_memory_allocated`).

Models: the default bundle's reasoner (tiny Qwen3-VL) and a random Qwen2.5-VL of ~80 M parameters at
840 px, built from config. Repeats are interleaved across the ways (background load hits them alike);
the table shows medians.

Usage: python benchmarks/reasoner_sampling.py [--repeat 3] [--large-repeat 2] [--tokens 32] [--threads T]
Writes benchmarks/results/reasoner_sampling.json; its top-level speedup keys are the large model's at N = 8.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import GenerationConfig

from star_edge.bench import bench_image
from star_edge.bundle import load_bundle
from star_edge.defaults import default_bundle_path
from star_edge.export.tiny_reasoner import TinyDims, write_tiny_reasoner
from star_edge.reasoner import sampling
from star_edge.reasoner.torch_backend import TorchReasoner

SAMPLE_COUNTS = (1, 2, 4, 8, 16)
METHODS = ("ours", "sequential", "hf_nrs")
QUERY = "the red circle left of the blue square"
RESULTS = Path(__file__).parent / "results" / "reasoner_sampling.json"
LARGE_DIMS = TinyDims(hidden_size=640, num_layers=10, num_heads=10, num_kv_heads=2, intermediate_size=1792,
                      vision_hidden_size=512, vision_depth=8, vision_heads=8, vision_intermediate_size=1536,
                      image_tokens_per_side=30)


class HookClock:
    """Stage times of Hugging Face `generate` calls from forward hooks on the vision tower and the
    language model: vision = vision tower forwards; prefill = the first language-model forward of
    each call; decode = the rest of the call. Also counts vision forwards and the prefill's rows."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.device = model.device
        self.vision_ms = self.prefill_ms = 0.0
        self.vision_calls = 0
        self.prefill_rows: list[int] = []
        self._marks: dict[str, float] = {}
        self._handles = [
            model.model.visual.register_forward_pre_hook(lambda *_: self._mark("vision")),
            model.model.visual.register_forward_hook(lambda *_: self._end_vision()),
            model.model.language_model.register_forward_pre_hook(self._start_language, with_kwargs=True),
            model.model.language_model.register_forward_hook(lambda *_: self._end_language()),
        ]

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _mark(self, name: str) -> None:
        self._marks[name] = self.now()

    def _end_vision(self) -> None:
        self.vision_ms += (self.now() - self._marks["vision"]) * 1e3
        self.vision_calls += 1

    def _start_language(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if "prefill" not in self._marks:
            self.prefill_rows.append(int(kwargs["inputs_embeds"].shape[0]))
            self._mark("prefill")

    def _end_language(self) -> None:
        if "prefill_end" not in self._marks:
            self._mark("prefill_end")
            self.prefill_ms += (self._marks["prefill_end"] - self._marks["prefill"]) * 1e3

    def new_call(self) -> None:
        """Mark the start of another `generate` call (its first language forward is a prefill)."""
        self._marks = {}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


class PeakMemory:
    """Peak growth of memory during a block: CUDA allocator peak, or resident set size sampled by a
    thread every millisecond (after glibc's malloc_trim hands freed pages back)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mib = 0.0
        self._stop = threading.Event()

    @staticmethod
    def _rss_bytes() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self._base = self._rss_bytes()
        self._peak = self._base
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc_info: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
            return
        self._stop.set()
        self._thread.join()
        self.peak_mib = (max(self._peak, self._rss_bytes()) - self._base) / 2**20


def _generation_config(reasoner: TorchReasoner, n: int, tokens: int) -> GenerationConfig:
    """HF settings equal to ours: greedy for n = 1, else temperature 1.0, top-p 0.9, no top-k; the
    end token is masked until `tokens` tokens (min_new_tokens) so every row decodes all of them."""
    base = reasoner.model.generation_config
    common = {"max_new_tokens": tokens, "min_new_tokens": tokens, "eos_token_id": base.eos_token_id,
              "pad_token_id": base.pad_token_id}
    if n == 1:
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(do_sample=True, temperature=1.0, top_p=0.9, top_k=0, **common)


def run_ours(reasoner: TorchReasoner, inputs: dict, n: int, tokens: int, seed: int) -> dict:
    state = sampling.prefill(reasoner.model, inputs)
    decoded = sampling.decode(reasoner.model, state, range(n), seed, eos_token_ids=[], max_new_tokens=tokens,
                              greedy=n == 1)
    assert all(len(ids) == tokens for ids in decoded.token_ids)
    return {"vision_ms": state.vision_ms, "prefill_ms": state.prefill_ms, "decode_ms": decoded.decode_ms,
            "vision_calls": 1, "prefill_rows": 1}


def _run_hf(reasoner: TorchReasoner, inputs: dict, calls: int, rows_per_call: int, tokens: int, seed: int) -> dict:
    model = reasoner.model
    config = _generation_config(reasoner, calls * rows_per_call, tokens)
    config.num_return_sequences = rows_per_call
    clock = HookClock(model)
    torch.manual_seed(seed)
    try:
        start = clock.now()
        with torch.inference_mode():
            for _ in range(calls):
                clock.new_call()
                sequences = model.generate(**inputs, generation_config=config)
                assert sequences.shape[1] - inputs["input_ids"].shape[1] == tokens
        total = (clock.now() - start) * 1e3
    finally:
        clock.close()
    return {"vision_ms": clock.vision_ms, "prefill_ms": clock.prefill_ms,
            "decode_ms": total - clock.vision_ms - clock.prefill_ms,
            "vision_calls": clock.vision_calls, "prefill_rows": max(clock.prefill_rows)}


def run_sequential(reasoner: TorchReasoner, inputs: dict, n: int, tokens: int, seed: int) -> dict:
    return _run_hf(reasoner, inputs, calls=n, rows_per_call=1, tokens=tokens, seed=seed)


def run_hf_nrs(reasoner: TorchReasoner, inputs: dict, n: int, tokens: int, seed: int) -> dict:
    return _run_hf(reasoner, inputs, calls=1, rows_per_call=n, tokens=tokens, seed=seed)


RUNNERS: dict[str, Callable[..., dict]] = {"ours": run_ours, "sequential": run_sequential, "hf_nrs": run_hf_nrs}


def measure_model(name: str, reasoner: TorchReasoner, repeat: int, tokens: int) -> dict:
    """The table of one model: per N and method, median stage times and the peak memory growth."""
    inputs = reasoner.hf_inputs(Image.fromarray(bench_image()), QUERY)
    for method in METHODS:  # warm-up: allocator, kernels, lazy imports
        RUNNERS[method](reasoner, inputs, 2, 2, seed=0)
    rows = []
    for n in SAMPLE_COUNTS:
        runs: dict[str, list[dict]] = {method: [] for method in METHODS}
        for r in range(repeat):
            for method in METHODS[r % 3:] + METHODS[: r % 3]:
                with PeakMemory(reasoner.device) as memory:
                    result = RUNNERS[method](reasoner, inputs, n, tokens, seed=r)
                runs[method].append({**result, "peak_mib": memory.peak_mib})
        for method in METHODS:
            stages = {key: statistics.median(run[key] for run in runs[method])
                      for key in ("vision_ms", "prefill_ms", "decode_ms")}
            rows.append({
                "model": name, "N": n, "method": method, **{k: round(v, 1) for k, v in stages.items()},
                "total_ms": round(sum(stages.values()), 1),
                "vision_calls": runs[method][0]["vision_calls"], "prefill_rows": runs[method][0]["prefill_rows"],
                "peak_mib": round(max(run["peak_mib"] for run in runs[method]), 1),
            })
        ours = next(row for row in rows if row["N"] == n and row["method"] == "ours")
        line = "  ".join(f"{row['method']} {row['total_ms']:.0f} ms" for row in rows if row["N"] == n)
        print(f"{name} N={n}: {line}  (ours: vision {ours['vision_ms']:.0f}, prefill {ours['prefill_ms']:.0f}, "
              f"decode {ours['decode_ms']:.0f})", flush=True)
    return {
        "parameters": sum(p.numel() for p in reasoner.model.parameters()),
        "input_size": list(reasoner.input_size),
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "image_tokens": int((inputs["input_ids"] == reasoner.model.config.image_token_id).sum()),
        "new_tokens": tokens,
        "repeat": repeat,
        "table": rows,
        "speedup_vs_sequential": _speedups(rows, "sequential"),
        "speedup_vs_hf_num_return_sequences": _speedups(rows, "hf_nrs"),
    }


def _speedups(rows: list[dict], other: str) -> dict[str, float]:
    total = {(row["N"], row["method"]): row["total_ms"] for row in rows}
    return {str(n): round(total[(n, other)] / total[(n, "ours")], 2) for n in SAMPLE_COUNTS}


def _print_table(report: dict) -> None:
    print(f"\n{'model':<26}{'N':>3} {'method':<11}{'vision':>9}{'prefill':>9}{'decode':>9}{'total':>9}"
          f"{'x ours':>8}{'peak MiB':>10}{'vis.calls':>10}{'prefill rows':>13}")
    for name, model in report["models"].items():
        ours = {row["N"]: row["total_ms"] for row in model["table"] if row["method"] == "ours"}
        for row in model["table"]:
            print(f"{name:<26}{row['N']:>3} {row['method']:<11}{row['vision_ms']:>9.0f}{row['prefill_ms']:>9.0f}"
                  f"{row['decode_ms']:>9.0f}{row['total_ms']:>9.0f}{row['total_ms'] / ours[row['N']]:>8.2f}"
                  f"{row['peak_mib']:>10.1f}{row['vision_calls']:>10}{row['prefill_rows']:>13}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="repeats for the default bundle")
    parser.add_argument("--large-repeat", type=int, default=2, help="repeats for the ~80 M model")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per answer")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (1 keeps timings steadier on a machine shared with other work)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    default = load_bundle(default_bundle_path())
    models = {f"default ({default.name})": TorchReasoner.from_dir(default.reasoner_dir, default.manifest["reasoner"],
                                                                  device=args.device)}
    with tempfile.TemporaryDirectory() as folder:
        manifest = write_tiny_reasoner(folder, seed=0, family="qwen2_5_vl", dims=LARGE_DIMS)
        models["random qwen2_5_vl 840px"] = TorchReasoner.from_dir(folder, manifest, device=args.device)
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "device": args.device,
                    "torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "query": QUERY,
        "models": {},
    }
    for name, reasoner in models.items():
        repeat = args.repeat if name.startswith("default") else args.large_repeat
        report["models"][name] = measure_model(name, reasoner, repeat, args.tokens)
    large = report["models"]["random qwen2_5_vl 840px"]
    report["reference_model"] = "random qwen2_5_vl 840px"
    report["speedup_vs_sequential"] = large["speedup_vs_sequential"]["8"]
    report["speedup_vs_hf_num_return_sequences"] = large["speedup_vs_hf_num_return_sequences"]["8"]
    report["wall_s"] = round(time.perf_counter() - started, 1)
    _print_table(report)
    print(f"\nN=8 on the ~80 M model: {report['speedup_vs_sequential']}x vs sequential generate, "
          f"{report['speedup_vs_hf_num_return_sequences']}x vs num_return_sequences ({report['wall_s']} s in all)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
