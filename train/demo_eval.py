"""The demo model's held-out numbers (its model card), measured on a bundle.

- Box IoU per curriculum phase: greedy answers of the reasoner (torch, float32) on `--val` scenes
  of each `DEMO_CURRICULUM` phase from the val split, the first target's box (`greedy_box_iou`:
  mean IoU, Acc@0.5, share of answers that parse).
- Naming on dense grounding: greedy answers to "find every object" on `--dense` val scenes of the
  mixed stream's dense stage; each answer's boxes matched one-to-one to the scene's objects
  (Hungarian on box IoU, a match needs IoU >= 0.5): the share of objects found, and of those the
  share whose label is the object's noun (how well the reasoner recognises what it finds).
- End to end: `Segmenter` with `--samples` samples voted (seed 0) on the first `--scenes` scenes
  of the test split's first phase (one named target among plain shapes, the kind `make demo`
  shows); mean mask IoU with the target's mask (pycocotools).

The reasoning-segmentation scores (gIoU / cIoU per type and depth) come from `star-edge eval
--synthetic`; this adds what that benchmark does not ask.

Usage: python -m star_edge.train.demo_eval [--bundle DIR] [--val 200] [--dense 200] [--scenes 100]
       [--samples 8] [--json PATH]    (--val 0, --dense 0 or --scenes 0 skips that part)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as coco_mask

from star_edge.defaults import default_bundle_path
from star_edge.kernels import linear_sum_assignment_batch
from star_edge.reasoner.torch_backend import TorchReasoner
from star_edge.segmenter import Segmenter
from star_edge.train.data.synthetic import SyntheticSample, sample, split_seed
from star_edge.train.demo import DEMO_DATA_SEED, bundle_reasoner, demo_curriculum, dense_config, held_out
from star_edge.train.rewards import box_iou
from star_edge.train.sft import greedy_box_iou, greedy_objects


def phase_box_iou(bundle_dir: Path, count: int) -> dict[str, dict[str, float]]:
    """"phase N" -> greedy_box_iou of the bundle's reasoner on `count` val scenes of phase N (1-based)."""
    reasoner = bundle_reasoner(bundle_dir)
    scores = {}
    with torch.inference_mode():
        for number, phase in enumerate(demo_curriculum(), start=1):
            scores[f"phase {number}"] = greedy_box_iou(reasoner, held_out(count, phase.config))
    return scores


def greedy_naming(reasoner: TorchReasoner, scenes: list[SyntheticSample]) -> dict[str, float]:
    """Greedy answers on dense-grounding scenes (module docstring): {"objects": objects in all
    scenes, "found": share of them matched by an answer box, "named": share of the matched whose
    label is the object's noun, "precision": share of answer boxes that match an object}."""
    objects = found = named = answered = 0
    for scene in scenes:
        predicted = greedy_objects(reasoner, scene) or []
        ious = box_iou(np.array([o.box for o in predicted], dtype=np.float64).reshape(-1, 4), scene.boxes)
        rows, cols = linear_sum_assignment_batch([ious], maximize=True)[0]
        for row, col in zip(rows.tolist(), cols.tolist()):
            if ious[row, col] >= 0.5:
                found += 1
                named += predicted[row].label.strip().lower() == scene.labels[col]
        objects += len(scene.boxes)
        answered += len(predicted)
    return {"objects": objects, "found": found / max(objects, 1), "named": named / max(found, 1),
            "precision": found / max(answered, 1)}


def dense_naming(bundle_dir: Path, count: int) -> dict[str, float]:
    """greedy_naming of the bundle's reasoner on `count` val scenes of the mixed stream's dense stage."""
    with torch.inference_mode():
        return greedy_naming(bundle_reasoner(bundle_dir), held_out(count, dense_config()))


def end_to_end_mask_iou(bundle_dir: Path, scenes: int, samples: int) -> dict[str, Any]:
    """Mean mask IoU of the voted result on the first `scenes` test scenes of phase 1."""
    config = demo_curriculum()[0].config
    ious = []
    with Segmenter.from_pretrained(bundle_dir) as segmenter:
        for index in range(scenes):
            scene = sample(split_seed(DEMO_DATA_SEED, "test"), index, config)
            result = segmenter.segment(Image.fromarray(scene.image), scene.query, samples=samples, seed=0)
            stacked = np.stack([result.mask, scene.mask], -1).astype(np.uint8)
            encoded = coco_mask.encode(np.asfortranarray(stacked))
            ious.append(float(coco_mask.iou(encoded[:1], encoded[1:], [0])[0, 0]))
        backend = segmenter.backend
    return {"mean_mask_iou": float(np.mean(ious)), "scenes": scenes, "samples": samples, "backend": backend}


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry (module docstring)."""
    parser = argparse.ArgumentParser(description="The demo model's held-out numbers.")
    parser.add_argument("--bundle", type=Path, default=None, help="a bundle folder (default: the shipped one)")
    parser.add_argument("--val", type=int, default=200, help="val scenes per curriculum phase (0: skip)")
    parser.add_argument("--dense", type=int, default=200, help="val scenes of dense grounding (0: skip)")
    parser.add_argument("--scenes", type=int, default=100, help="test scenes end to end (0: skip)")
    parser.add_argument("--samples", type=int, default=8, help="samples voted end to end")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    for name, least in (("val", 0), ("dense", 0), ("scenes", 0), ("samples", 1)):
        if getattr(args, name) < least:
            parser.error(f"--{name} must be at least {least}, got {getattr(args, name)}")
    bundle_dir = args.bundle or default_bundle_path()
    report: dict[str, Any] = {"bundle": str(bundle_dir)}
    if args.val:
        report["box_iou"] = phase_box_iou(bundle_dir, args.val)
    if args.dense:
        report["dense_naming"] = dense_naming(bundle_dir, args.dense)
    if args.scenes:
        report["end_to_end"] = end_to_end_mask_iou(bundle_dir, args.scenes, args.samples)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
