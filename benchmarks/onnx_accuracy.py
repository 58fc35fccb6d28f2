"""Accuracy of the exported backends on the synthetic test split: torch vs onnxruntime fp32 vs
onnxruntime with the dynamic-int8 decoders, side by side on the same queries and seeds.

The default (trained demo) bundle, or --bundle, is exported to ONNX with int8 decoders into a
temporary folder (`export_bundle`); each backend runs the whole pipeline (`Segmenter` over the
backend's reasoner and SAM decoder) through `star_edge.train.eval.evaluate` on the first --count
samples of the synthetic test split, at each N of --samples. Reported per backend and N: gIoU,
cIoU, and against torch the share of queries with the same mask (IoU of the two masks >= 0.99)
and the mean |per-query IoU difference|.

Usage: python benchmarks/onnx_accuracy.py [--count 200] [--samples 1,8] [--threads 1] [--bundle DIR]
Writes benchmarks/results/onnx_accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as coco_mask

from star_edge.bundle import load_bundle
from star_edge.defaults import default_bundle_path
from star_edge.export.bundle_export import export_bundle
from star_edge.reasoner.onnx_backend import OnnxReasoner
from star_edge.reasoner.torch_backend import TorchReasoner
from star_edge.sam.onnx_backend import OnnxMaskDecoder
from star_edge.sam.torch_backend import MaskDecoder
from star_edge.segmenter import Segmenter
from star_edge.train.data.synthetic import SyntheticBenchmark
from star_edge.train.eval import build_report, evaluate

RESULTS = Path(__file__).parent / "results" / "onnx_accuracy.json"


def segmenters(root: Path, threads: int) -> dict[str, Segmenter]:
    """backend name -> Segmenter over the exported bundle at `root`."""
    bundle = load_bundle(root)
    manifest = bundle.manifest["reasoner"]
    loaded = {"torch": Segmenter(bundle, TorchReasoner.from_dir(bundle.reasoner_dir, manifest),
                                 MaskDecoder.from_dir(bundle.sam_dir))}
    for variant in ("fp32", "int8"):
        reasoner = OnnxReasoner.from_dir(root / "onnx", bundle.reasoner_dir, manifest, decoder_variant=variant,
                                         threads=threads)
        decoder = OnnxMaskDecoder.from_dir(root / "onnx", decoder_variant=variant, threads=threads)
        loaded[f"onnx {variant}"] = Segmenter(bundle, reasoner, decoder)
    return loaded


def _agreement(records: list[dict], reference: list[dict]) -> dict[str, float]:
    """Against the reference backend's records (same order): same-mask share and mean |IoU diff|."""
    same, differences = 0, []
    for ours, theirs in zip(records, reference):
        a, b = (coco_mask.decode({"size": r["pred_mask"]["size"], "counts": r["pred_mask"]["counts"].encode()})
                for r in (ours, theirs))
        union = np.logical_or(a, b).sum()
        same += bool(union == 0 or np.logical_and(a, b).sum() / union >= 0.99)
        differences.append(abs(ours["iou"] - theirs["iou"]))
    return {"same_mask": same / len(records), "mean_abs_iou_difference": float(np.mean(differences))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--samples", default="1,8")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bundle", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    samples = [int(n) for n in args.samples.split(",")]
    dataset = SyntheticBenchmark(0, args.count, split="test")
    report: dict = {"count": args.count, "samples": samples, "threads": args.threads, "backends": {}}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "bundle"
        export_bundle(args.bundle or default_bundle_path(), root, onnx=True, variants=("fp32", "int8"))
        report["bundle"] = load_bundle(root).name
        records: dict[str, list[dict]] = {}
        for name, segmenter in segmenters(root, args.threads).items():
            began = time.perf_counter()
            records[name], _ = evaluate(segmenter, dataset, samples=samples)
            summary = build_report(records[name], {})["summary_by_samples"]
            report["backends"][name] = {
                "seconds": round(time.perf_counter() - began, 1),
                **{f"N={n}": {"giou": summary[str(n)]["giou"], "ciou": summary[str(n)]["ciou"]} for n in samples},
            }
            print(name, json.dumps(report["backends"][name]), flush=True)
    for name in records:
        if name != "torch":
            for n in samples:
                ours = [r for r in records[name] if r["n_samples"] == n]
                theirs = [r for r in records["torch"] if r["n_samples"] == n]
                report["backends"][name][f"N={n}"]["vs_torch"] = _agreement(ours, theirs)
    print(json.dumps(report, indent=1))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
