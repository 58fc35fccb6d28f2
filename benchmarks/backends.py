"""The pipeline on torch and on onnxruntime (fp32 and int8), per stage and end to end, side by side.

Model: the default bundle (tiny Qwen3-VL + tiny SAM; results/backends.json was measured with the
untrained default that shipped before the trained demo model), exported to ONNX with int8
decoders by `star_edge.export.bundle_export.export_bundle` into a temporary folder (or --bundle, an
exported bundle). Backends:

- torch: TorchReasoner + the torch MaskDecoder (float32);
- onnx fp32: OnnxReasoner + OnnxMaskDecoder on onnxruntime's CPU provider, fp32 graphs;
- onnx int8: the same with the dynamically quantised reasoner decoder and SAM decoder.

Stages (medians over --repeat rounds, the backends interleaved in every round so background load
hits them alike): vision (the reasoner's vision tower), prefill (the language model reading the
prompt, vision excluded), decode per forward pass at batch 1 and at batch 8 (--tokens tokens, end
token disabled so every row decodes all of them: --tokens - 1 passes, the first token comes from the
prefill), SAM embed (cache cleared), SAM decode (8 prompts), and end to end
`Segmenter.segment(samples=8)` (cache cleared; its rows also decode --tokens tokens; with the end
token disabled the answers do not parse, so end to end is the reasoner plus SAM's image encoder).

Accuracy of int8 against fp32 on this model: greedy token agreement on the probe prompts, and the
max |logit difference| of the prefill relative to the largest logit. (gIoU on the synthetic test
split: benchmarks/onnx_accuracy.py.) Also recorded: whether onnx fp32 greedy tokens
equal torch's on the default bundle.

Usage: python benchmarks/backends.py [--threads 1] [--repeat 5] [--tokens 16] [--bundle DIR]
Writes benchmarks/results/backends.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from star_edge.bench import bench_image
from star_edge.bundle import load_bundle
from star_edge.defaults import default_bundle_path
from star_edge.export.bundle_export import export_bundle
from star_edge.reasoner.onnx_backend import OnnxReasoner
from star_edge.reasoner.torch_backend import TorchReasoner
from star_edge.sam.onnx_backend import OnnxMaskDecoder
from star_edge.sam.torch_backend import MaskDecoder
from star_edge.segmenter import Segmenter

BACKENDS = ("torch", "onnx_fp32", "onnx_int8")
QUERY = "the red circle left of the blue square"
RESULTS = Path(__file__).parent / "results" / "backends.json"
PROMPTS = 8


def load_backends(root: Path, threads: int) -> dict[str, tuple[object, object]]:
    """backend -> (reasoner, mask decoder) for the exported bundle at `root`."""
    bundle = load_bundle(root)
    manifest = bundle.manifest["reasoner"]
    loaded = {"torch": (TorchReasoner.from_dir(bundle.reasoner_dir, manifest), MaskDecoder.from_dir(bundle.sam_dir))}
    for variant in ("fp32", "int8"):
        reasoner = OnnxReasoner.from_dir(root / "onnx", bundle.reasoner_dir, manifest, decoder_variant=variant,
                                         threads=threads)
        loaded[f"onnx_{variant}"] = (reasoner, OnnxMaskDecoder.from_dir(root / "onnx", decoder_variant=variant,
                                                                        threads=threads))
    return loaded


def _without_end_tokens(reasoner: object, tokens: int) -> None:
    """Let every row decode exactly `tokens` tokens."""
    reasoner.max_new_tokens = tokens
    if isinstance(reasoner, TorchReasoner):
        reasoner.model.generation_config.eos_token_id = []
    else:
        reasoner.eos_token_ids = []


def measure_round(name: str, reasoner: object, decoder: object, image: np.ndarray, tokens: int,
                  boxes: np.ndarray, points: np.ndarray) -> dict[str, float]:
    """One timing of every stage for one backend (ms)."""
    picture = Image.fromarray(image)
    prepared = reasoner.prefill(picture, QUERY)
    timings = {"vision": prepared.timings["vision"], "prefill": prepared.timings["prefill"]}
    for rows in (1, 8):
        decoded = reasoner.sample(prepared, range(rows), seed=0)
        timings[f"decode_token_b{rows}"] = decoded.timings["decode"] / (tokens - 1)
    decoder.cache.clear()
    begin = time.perf_counter()
    embedding = decoder.embed(image)
    timings["sam_embed"] = (time.perf_counter() - begin) * 1e3
    begin = time.perf_counter()
    decoder.decode(embedding, boxes, points)
    timings["sam_decode"] = (time.perf_counter() - begin) * 1e3
    return timings


def int8_accuracy(fp32: OnnxReasoner, int8: OnnxReasoner, images: list[Image.Image], queries: list[str]) -> dict:
    """Greedy agreement (tokens equal / tokens compared) and the prefill's relative logit error."""
    agree = compared = 0
    worst = 0.0
    for picture in images:
        for query in queries:
            expected, found = fp32.generate(picture, query), int8.generate(picture, query)
            agree += sum(a == b for a, b in zip(expected.token_ids[0], found.token_ids[0]))
            compared += len(expected.token_ids[0])
            reference = fp32.prefill(picture, query).state.logits
            error = np.abs(int8.prefill(picture, query).state.logits - reference).max() / np.abs(reference).max()
            worst = max(worst, float(error))
    return {"greedy_token_agreement": round(agree / compared, 4), "max_relative_logit_error": round(worst, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per row in the decode stages (>= 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--bundle", type=Path, default=None, help="an exported bundle (default: export the demo one)")
    args = parser.parse_args()
    if args.tokens < 2:
        parser.error("--tokens must be at least 2 (the first token comes from the prefill)")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        root = args.bundle
        if root is None:
            root = Path(folder) / "bundle"
            export_bundle(default_bundle_path(), root, onnx=True, variants=("fp32", "int8"))
        export_s = time.perf_counter() - started
        backends = load_backends(root, args.threads)
        image = bench_image()
        probes = [Image.fromarray(image), Image.fromarray(bench_image(320, 400))]
        queries = [QUERY, "what could hold water?"]
        torch_reasoner, onnx_reasoner = backends["torch"][0], backends["onnx_fp32"][0]
        greedy_equal = all(torch_reasoner.generate(p, q).token_ids == onnx_reasoner.generate(p, q).token_ids
                           for p in probes for q in queries)
        accuracy = int8_accuracy(onnx_reasoner, backends["onnx_int8"][0], probes, queries)
        segmenters = {name: Segmenter(load_bundle(root), *parts) for name, parts in backends.items()}
        rng = np.random.default_rng(0)
        corners = rng.uniform(0, 320, (PROMPTS, 2))
        boxes = np.concatenate([corners, corners + rng.uniform(40, 300, (PROMPTS, 2))], axis=1)
        points = (boxes[:, :2] + boxes[:, 2:]) / 2
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in BACKENDS}
        for name, (reasoner, _) in backends.items():
            _without_end_tokens(reasoner, args.tokens)
            measure_round(name, *backends[name], image, args.tokens, boxes, points)  # warm-up
        for round_index in range(args.repeat):
            order = BACKENDS[round_index % 3:] + BACKENDS[: round_index % 3]
            for name in order:
                timings = measure_round(name, *backends[name], image, args.tokens, boxes, points)
                segmenters[name].mask_decoder.cache.clear()
                begin = time.perf_counter()
                segmenters[name].segment(image, QUERY, samples=8, seed=round_index)
                timings["end_to_end_n8"] = (time.perf_counter() - begin) * 1e3
                runs[name].append(timings)
    table = {name: {stage: round(statistics.median(run[stage] for run in runs[name]), 2) for stage in runs[name][0]}
             for name in BACKENDS}
    speedups = {name: {stage: round(table["torch"][stage] / value, 2) for stage, value in table[name].items()}
                for name in BACKENDS[1:]}
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": args.threads, "torch": torch.__version__,
                    "onnxruntime": __import__("onnxruntime").__version__},
        "bundle": load_bundle(default_bundle_path()).name if args.bundle is None else str(args.bundle),
        "query": QUERY, "tokens": args.tokens, "sam_prompts": PROMPTS, "repeat": args.repeat,
        "stages_ms": table,
        "speedup_vs_torch": speedups,
        "onnx_fp32_greedy_equals_torch": greedy_equal,
        "int8_vs_fp32": accuracy,
        "export_s": round(export_s, 1),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    stages = list(table["torch"])
    print(f"\n{'stage (ms, median)':<20}" + "".join(f"{name:>12}" for name in BACKENDS)
          + "".join(f"{'x ' + name:>16}" for name in BACKENDS[1:]))
    for stage in stages:
        print(f"{stage:<20}" + "".join(f"{table[name][stage]:>12.2f}" for name in BACKENDS)
              + "".join(f"{speedups[name][stage]:>16.2f}" for name in BACKENDS[1:]))
    print(f"\nonnx fp32 greedy tokens equal torch's: {greedy_equal}; int8 vs fp32: {accuracy}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS} ({report['wall_s']} s, export {report['export_s']} s)")


if __name__ == "__main__":
    main()
