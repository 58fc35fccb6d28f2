"""What the reasoner's image tokens say about each object, read by a linear probe.

For every object of `--scenes` synthetic scenes (the mixed stream's dense stage, stream seed 5: no
split the demo model trains or is scored on), the image tokens the language model receives (after
the vision merger) are averaged, weighted by how many of the object's visible pixels each token
covers. A softmax regression on 80 % of the objects then predicts the object's noun and its colour
on the other 20 %. High colour and low noun accuracy say the vision tower passes on what colour an
object is but not what it is: no amount of reasoning in the language model recovers the category.

Usage: python -m star_edge.train.vision_probe [--bundle DIR] [--scenes 2000] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from star_edge.defaults import default_bundle_path
from star_edge.reasoner.torch_backend import TorchReasoner
from star_edge.train.data.synthetic import SyntheticSample, sample
from star_edge.train.demo import bundle_reasoner, dense_config
from star_edge.train.object_pooling import object_features

PROBE_STREAM = 5
"""Stream seed of the probe's scenes (the demo model trains on 0 and is scored on 1 and 2)."""


def image_tokens(reasoner: TorchReasoner, image: np.ndarray) -> np.ndarray:
    """(rows, cols, hidden) float32: the merged image tokens of one (H, W, 3) uint8 image, on the
    grid they cover (row-major, as the language model receives them)."""
    inputs = reasoner.hf_inputs(Image.fromarray(image), "find every object")  # the tokens ignore the query
    with torch.inference_mode():
        output = reasoner.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    tokens = getattr(output, "pooler_output", output)[0].float().cpu().numpy()
    merge = reasoner.model.config.vision_config.spatial_merge_size
    _, rows, cols = (int(v) for v in inputs["image_grid_thw"][0])
    return tokens.reshape(rows // merge, cols // merge, -1)


def probe_accuracy(features: np.ndarray, labels: Sequence[str], train_share: float = 0.8,
                   steps: int = 500, seed: int = 0) -> dict[str, Any]:
    """Softmax regression from features (n, d) to labels, trained on the first `train_share` of
    the rows (features standardised with those rows' statistics), scored on the rest.

    Returns {"classes", "train", "held_out", "majority"}: accuracies on both parts and that of
    always answering the held-out part's most frequent label.
    """
    classes = sorted(set(labels))
    target = torch.tensor([classes.index(label) for label in labels])
    cut = int(train_share * len(target))
    if not 0 < cut < len(target):
        raise ValueError(f"train_share {train_share} leaves no rows on one side of {len(target)}")
    x = torch.as_tensor(features, dtype=torch.float32)
    mean, std = x[:cut].mean(0), x[:cut].std(0) + 1e-6
    x = (x - mean) / std
    generator = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(x.shape[1], len(classes))
    with torch.no_grad():
        linear.weight.normal_(0.0, 0.01, generator=generator)
        linear.bias.zero_()
    optimiser = torch.optim.AdamW(linear.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(steps):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(linear(x[:cut]), target[:cut]).backward()
        optimiser.step()
    with torch.no_grad():
        right = linear(x).argmax(1) == target
    held_out = target[cut:]
    return {"classes": len(classes), "train": float(right[:cut].float().mean()),
            "held_out": float(right[cut:].float().mean()),
            "majority": float(torch.bincount(held_out).max() / len(held_out))}


def probe(reasoner: TorchReasoner, scenes: Iterable[SyntheticSample]) -> dict[str, Any]:
    """{"objects", "noun": probe_accuracy, "colour": probe_accuracy} over every object of `scenes`."""
    features, nouns, colours = [], [], []
    for scene in scenes:
        features.append(object_features(image_tokens(reasoner, scene.image), scene.instance_masks))
        nouns += [obj.noun for obj in scene.objects]
        colours += [obj.colour for obj in scene.objects]
    stacked = np.concatenate(features)
    return {"objects": len(stacked), "noun": probe_accuracy(stacked, nouns),
            "colour": probe_accuracy(stacked, colours)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None, help="a bundle folder (default: the shipped one)")
    parser.add_argument("--scenes", type=int, default=2000, help="dense-grounding scenes (2-6 objects each)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    if args.scenes < 2:
        parser.error(f"--scenes must be at least 2, got {args.scenes}")
    bundle_dir = args.bundle or default_bundle_path()
    scenes = (sample(PROBE_STREAM, index, dense_config()) for index in range(args.scenes))
    report = {"bundle": str(bundle_dir), "scenes": args.scenes, **probe(bundle_reasoner(bundle_dir), scenes)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
