"""GRPO training data: samples by stream index, served as the rows TRL's GRPOTrainer reads.

A row is a dict:
- "prompt": the chat messages asking the question (`star_edge.reasoner.prompts.build_messages`);
- "image": the image as a PIL image resized to the reasoner input (PIL bicubic, as
  `TorchReasoner.hf_inputs` does), which TRL puts into the prompt;
- "sam_image": the original (H, W, 3) uint8 pixels, for SAM inside the reward;
- "target": a `rewards.Target` (boxes, points, masks in original pixels);
- "sample_id": identifies the sample (the reward embeds each distinct image once).

The `datasets.Dataset` holds only the row numbers; rows are built on access (`with_transform`), so
a stream of any length costs no memory and a resumed run sees exactly the rows it would have seen.
Sources: the synthetic generator (seeded, pure per index) or a ReasonSeg-layout / Hugging Face
folder, one row per (image, query), its target mask taken as one object (box and point from it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from star_edge.errors import InvalidInputError
from star_edge.reasoner.prompts import PROMPT_TEMPLATES, build_messages
from star_edge.train.data.synthetic import STAGES, SyntheticConfig, sample, split_seed
from star_edge.train.data.synthetic_scenes import interior_point, mask_box
from star_edge.train.rewards import Target

if TYPE_CHECKING:
    from datasets import Dataset

NO_LABEL_SUFFIX = "_nolabel"
"""A prompt template asking for boxes and points only is registered as `<template id>` + this."""


@dataclass(frozen=True)
class DataConfig:
    """Where GRPO's prompts come from (defaults: the demo model's synthetic world)."""

    source: str = "synthetic"
    """"synthetic" (the seeded generator), or a ReasonSeg-layout folder or `save_to_disk` folder."""
    synthetic_stage: str = "mixed"
    """The generator's stage: "single", "dense", "reasoning" or "mixed" (synthetic only)."""
    seed: int = 0
    """The synthetic stream's seed (its train split, `split_seed(seed, "train")`)."""
    size_range: tuple[int, int] = (256, 256)
    """Synthetic image width and height range, inclusive."""
    objects: tuple[int, int] = (2, 6)
    """Synthetic objects per scene, inclusive range."""
    train_samples: int = 100_000
    """Rows in one epoch of the synthetic stream (a folder has its own length)."""

    def __post_init__(self) -> None:
        if self.synthetic_stage not in STAGES:
            raise InvalidInputError(f"synthetic_stage must be one of {', '.join(STAGES)}, got {self.synthetic_stage!r}")
        if self.train_samples < 1 or self.seed < 0:
            raise InvalidInputError("train_samples must be >= 1 and seed >= 0")


@dataclass(frozen=True)
class TrainItem:
    """One training example in original pixels: image (H, W, 3) uint8; boxes (n, 4) inclusive;
    points (n, 2); labels n nouns; masks (n, H, W) bool; trace: the worded reasoning ("" if none);
    ignore: (H, W) bool pixels the mask reward leaves out (ReasonSeg's ignore regions), or None."""

    sample_id: str
    image: np.ndarray
    query: str
    boxes: np.ndarray
    points: np.ndarray
    labels: list[str]
    masks: np.ndarray
    trace: str = ""
    ignore: np.ndarray | None = None


def synthetic_items(config: DataConfig) -> Callable[[int], TrainItem]:
    """Index -> item of the synthetic train stream of `config` (pure per index)."""
    stream = split_seed(config.seed, "train")
    settings = SyntheticConfig(size_range=tuple(config.size_range), objects=tuple(config.objects),
                               stage=config.synthetic_stage)

    def item(index: int) -> TrainItem:
        drawn = sample(stream, index, settings)
        return TrainItem(drawn.image_id, drawn.image, drawn.query, drawn.boxes, drawn.points, list(drawn.labels),
                         drawn.masks, drawn.trace)

    return item


class FolderItems:
    """Index -> item over a ReasonSeg-layout or `save_to_disk` folder: one item per (image, query).

    The target mask becomes one object: its inclusive bounding box, the pixel deepest inside it and
    an empty label (ReasonSeg names no objects); a sample with an empty mask has no target. Its
    ignore region is left out of the mask reward, as the evaluation leaves it out.
    """

    def __init__(self, samples: Sequence[Any]) -> None:
        self.samples = samples
        self.index = [(i, q) for i, item in enumerate(samples) for q in range(len(item.queries))]

    def __len__(self) -> int:
        return len(self.index)

    def __call__(self, index: int) -> TrainItem:
        position, query = self.index[index]
        item = self.samples[position]
        pixels = item.pixels()
        mask = np.asarray(item.mask, dtype=bool)
        if mask.any():
            boxes, points = np.array([mask_box(mask)]), np.array([interior_point(mask)])
            masks, labels = mask[None], [""]
        else:
            boxes, points = np.zeros((0, 4), np.int64), np.zeros((0, 2), np.int64)
            masks, labels = np.zeros((0, *mask.shape), dtype=bool), []
        ignore = np.asarray(item.ignore, dtype=bool)
        return TrainItem(f"{item.image_id}#{query}", pixels, item.queries[query], boxes, points, labels, masks,
                         ignore=ignore if ignore.any() else None)


def open_items(config: DataConfig) -> tuple[Callable[[int], TrainItem], int]:
    """(index -> item, number of items) for the configured source."""
    if config.source == "synthetic":
        return synthetic_items(config), config.train_samples
    from star_edge.train.data.hf import is_dataset_dict
    from star_edge.train.eval import open_dataset

    split = "train" if is_dataset_dict(config.source) else None  # other folders are one split
    items = FolderItems(open_dataset(config.source, split=split))
    return items, len(items)


def prompt_template_for(template: str, with_labels: bool) -> str:
    """The template id to train with: `template`, or its no-label variant for the label ablation.

    Raises InvalidInputError when the no-label variant is not registered in PROMPT_TEMPLATES.
    """
    if with_labels or template.endswith(NO_LABEL_SUFFIX):
        return template
    variant = template + NO_LABEL_SUFFIX
    if variant not in PROMPT_TEMPLATES:
        raise InvalidInputError(
            f"training without labels asks with prompt template {variant!r}, which star_edge.reasoner.prompts "
            f"does not register (it has {sorted(PROMPT_TEMPLATES)})")
    return variant


class RowBuilder:
    """Row numbers -> GRPO rows (the `with_transform` function; picklable for DataLoader workers)."""

    def __init__(self, items: Callable[[int], TrainItem], frame: str, input_size: tuple[int, int],
                 template: str) -> None:
        self.items, self.frame, self.input_size, self.template = items, frame, tuple(input_size), template

    def row(self, index: int) -> dict[str, Any]:
        """The row of stream position `index` (module docstring)."""
        item = self.items(index)
        height, width = item.image.shape[:2]
        resized = Image.fromarray(item.image).convert("RGB").resize(self.input_size, Image.Resampling.BICUBIC)
        return {
            "prompt": build_messages(item.query, frame=self.frame, template=self.template),
            "image": resized,
            "sam_image": item.image,
            "target": Target(item.boxes, item.points, item.masks, image_size=(width, height),
                             ignore=item.ignore),
            "sample_id": item.sample_id,
        }

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        rows = [self.row(int(index)) for index in batch["row"]]
        return {key: [row[key] for row in rows] for key in rows[0]} if rows else {}


def grpo_dataset(items: Callable[[int], TrainItem], count: int, frame: str, input_size: tuple[int, int],
                 template: str) -> Dataset:
    """A `datasets.Dataset` of `count` rows built on access by `RowBuilder`."""
    from datasets import Dataset  # the GRPO stages' dependency; SFT reads prompt_template_for alone

    return Dataset.from_dict({"row": np.arange(count)}).with_transform(
        RowBuilder(items, frame, input_size, template))
