"""Scenes for the tiny SAM: every object of a synthetic scene with its ground-truth prompt.

A scene is a pure function of (stream seed, index), like every synthetic sample, so a training
stream resumes at any position. Each visible object is one prompt, given exactly as the runtime
receives it from a parsed answer: its box (x1, y1, x2, y2) and its point (x, y) in original pixels,
with the synthetic conventions (inclusive box of the visible mask; the mask's deepest pixel).
`model_inputs` turns a batch of scenes into what `MaskDecoder` feeds the networks, through the
same functions (`star_edge.sam.inputs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from star_edge.sam.inputs import encoder_input, labelled_points
from star_edge.train.data.synthetic import SyntheticConfig, sample, split_seed
from star_edge.train.data.synthetic_scenes import interior_point, mask_box

SAM_SCENES = SyntheticConfig(stage="single", objects=(1, 4), no_target_probability=0.0)
"""The scenes of the tiny SAM's stream: 256 px, 1-4 overlapping objects, plain shapes and
everyday items in the generator's default mix (the query is drawn but unused)."""


@dataclass(frozen=True)
class SamScene:
    """One image and its K objects as prompts and targets.

    image: (H, W, 3) uint8 RGB; boxes: (K, 4) int64 inclusive (x1, y1, x2, y2); points: (K, 2)
    int64 (x, y); masks: (K, H, W) bool, the visible masks (disjoint); all in original pixels.
    """

    image: np.ndarray = field(repr=False)
    boxes: np.ndarray
    points: np.ndarray
    masks: np.ndarray = field(repr=False)


def scene_at(stream: int, index: int, config: SyntheticConfig = SAM_SCENES) -> SamScene:
    """Scene `index` of the synthetic stream `stream` (a split seed), every object a prompt."""
    item = sample(stream, index, config)
    masks = item.instance_masks
    boxes = np.array([mask_box(mask) for mask in masks], dtype=np.int64).reshape(-1, 4)
    points = np.array([interior_point(mask) for mask in masks], dtype=np.int64).reshape(-1, 2)
    return SamScene(image=item.image, boxes=boxes, points=points, masks=masks)


def split_scenes(seed: int, split: str, count: int, config: SyntheticConfig = SAM_SCENES) -> list[SamScene]:
    """The first `count` scenes of a split ("train", "val", "test") of the data seed `seed`."""
    stream = split_seed(seed, split)
    return [scene_at(stream, index, config) for index in range(count)]


@dataclass(frozen=True)
class ScenePrompts:
    """One scene's prompts and targets in the networks' frame.

    points: (K, 1, 2) float32 and point_labels (K, 1) int64, boxes (K, 4) float32, all in the SAM
    frame before the prompt encoder's +0.5 pixel-centre shift (what `SamPredictor` passes);
    targets: (K, H, W) float32 in {0, 1}; input_size (h', w') of the resized image;
    original_size (H, W).
    """

    points: torch.Tensor
    point_labels: torch.Tensor
    boxes: torch.Tensor
    targets: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]


def model_inputs(
    scenes: Sequence[SamScene], image_size: int, pixel_mean: Sequence[float], pixel_std: Sequence[float]
) -> tuple[torch.Tensor, list[ScenePrompts]]:
    """Scenes -> (B, 3, S, S) float32 normalised, padded encoder input and each scene's prompts.

    Images go through `encoder_input` and prompts through `labelled_points`, as in `MaskDecoder`
    (labelled points: the positive point first, then the two box corners).
    """
    pixels, prompts = [], []
    for scene in scenes:
        height, width = scene.image.shape[:2]
        image_pixels, input_size = encoder_input(scene.image, image_size, pixel_mean, pixel_std)
        pixels.append(torch.from_numpy(image_pixels))
        coords, labels = labelled_points(scene.boxes.astype(np.float64), scene.points.astype(np.float64),
                                         (height, width), image_size)
        coords_t, labels_t = torch.from_numpy(coords), torch.from_numpy(labels)
        prompts.append(ScenePrompts(
            points=coords_t[:, :1], point_labels=labels_t[:, :1],
            boxes=coords_t[:, 1:].reshape(-1, 4),
            targets=torch.from_numpy(scene.masks.astype(np.float32)),
            input_size=input_size, original_size=(height, width),
        ))
    return torch.cat(pixels), prompts
