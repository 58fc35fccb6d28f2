"""Can the demo reasoner's vision tower learn what objects are, when asked directly?

Trains the bundle's vision tower (its merger included) and a linear head to name every object of
dense-grounding scenes (stream seed 5, `vision_probe`'s scenes) from its coverage-pooled image
tokens, 16 scenes a step, AdamW (tower at --lr, head at 1e-2), for --seconds on one CPU thread;
every 50 steps it scores the head on 300 held-out scenes (indices 100,000 on). The language
model is not involved. Prints one JSON line per score and a final summary.

Usage: python docs/demo-model/tower_noun_training.py [--bundle DIR] [--seconds 1200] [--lr 1e-3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image

from star_edge.defaults import default_bundle_path
from star_edge.train.data.synthetic import sample
from star_edge.train.data.synthetic_catalogue import KINDS
from star_edge.train.demo import bundle_reasoner, dense_config
from star_edge.train.object_pooling import coverage_weights
from star_edge.train.vision_probe import PROBE_STREAM

NOUNS = sorted(KINDS)
HELD_OUT_FROM = 100_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--seconds", type=float, default=1200.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    bundle_dir = args.bundle or default_bundle_path()
    reasoner = bundle_reasoner(bundle_dir)
    model = reasoner.model
    merge = model.config.vision_config.spatial_merge_size
    config = dense_config()

    def batch(indices: range) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
        pixels, grids, weights, labels = [], [], [], []
        for index in indices:
            scene = sample(PROBE_STREAM, index, config)
            inputs = reasoner.hf_inputs(Image.fromarray(scene.image), "find every object")
            pixels.append(inputs["pixel_values"])
            grids.append(inputs["image_grid_thw"])
            _, rows, cols = (int(v) for v in inputs["image_grid_thw"][0])
            weights.append(torch.from_numpy(coverage_weights(scene.instance_masks, (rows // merge, cols // merge))))
            labels += [NOUNS.index(obj.noun) for obj in scene.objects]
        return torch.cat(pixels), torch.cat(grids), weights, torch.tensor(labels)

    def pooled(pixels: torch.Tensor, grids: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        tokens = model.model.get_image_features(pixels, grids).pooler_output
        return torch.cat([w @ t for w, t in zip(weights, tokens)])

    head = torch.nn.Linear(model.config.text_config.hidden_size, len(NOUNS))
    optimiser = torch.optim.AdamW([{"params": list(model.model.visual.parameters()), "lr": args.lr},
                                   {"params": list(head.parameters()), "lr": 1e-2}], weight_decay=0.01)
    held_out = batch(range(HELD_OUT_FROM, HELD_OUT_FROM + 300))

    def accuracy() -> float:
        with torch.no_grad():
            return float((head(pooled(*held_out[:3])).argmax(1) == held_out[3]).float().mean())

    start, step = time.time(), 0
    while time.time() - start < args.seconds:
        pixels, grids, weights, labels = batch(range(16 * step, 16 * step + 16))
        loss = torch.nn.functional.cross_entropy(head(pooled(pixels, grids, weights)), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        step += 1
        if step % 50 == 0:
            print(json.dumps({"step": step, "scenes": 16 * step, "seconds": round(time.time() - start),
                              "loss": round(loss.item(), 3), "held_out": round(accuracy(), 3)}), flush=True)
    print(json.dumps({"bundle": str(bundle_dir), "lr": args.lr, "steps": step, "scenes": 16 * step,
                      "held_out_objects": len(held_out[3]), "held_out": accuracy()}))


if __name__ == "__main__":
    main()
