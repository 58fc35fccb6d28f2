"""Inputs and references shared by the SAM tests: images (synthetic and the real photos in
examples/), random box + point prompts, mask IoU, and the tiny SAM with random position
embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from star_edge.export.tiny_sam import make_tiny_sam


def with_positional_noise(sam: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give the zero-initialised absolute and relative position embeddings random values, so a
    shifted, mis-padded or mis-cropped image changes the result."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sam.named_parameters():
            if "pos_embed" in name or "rel_pos" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    return sam


def noisy_tiny_sam() -> torch.nn.Module:
    """The seed-0 tiny SAM with random position embeddings."""
    return with_positional_noise(make_tiny_sam(seed=0)[0], seed=1)


def natural_image(height: int, width: int, seed: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB: a sky-to-ground gradient, overlapping filled shapes, blur and noise."""
    rng = np.random.default_rng(seed)
    rows = np.linspace(0.0, 1.0, height)[:, None, None]
    top, bottom = rng.uniform(40, 220, 3), rng.uniform(40, 220, 3)
    background = np.broadcast_to(top * (1 - rows) + bottom * rows, (height, width, 3))
    image = Image.fromarray(background.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x1, x2 = sorted(rng.uniform(0, width, 2))
        y1, y2 = sorted(rng.uniform(0, height, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x1, y1, x2 + 8, y2 + 8), fill=colour)
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float64)
    return np.clip(blurred + rng.normal(0, 6, blurred.shape), 0, 255).astype(np.uint8)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PHOTOS = ["coffee.jpg", "chelsea.jpg"]


def photo(name: str) -> np.ndarray:
    """A real photo from examples/ (CC0) as (H, W, 3) uint8 RGB."""
    with Image.open(EXAMPLES / name) as image:
        return np.asarray(image.convert("RGB"))


def random_prompts(height: int, width: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """boxes (K, 4) float64 (x1, y1, x2, y2) and points (K, 2) float64 (x, y) inside their box,
    in pixels of an (H, W) image; the last box touches the bottom-right corner."""
    rng = np.random.default_rng(seed)
    xs = np.sort(rng.uniform(0, width - 1, (count, 2)), axis=1)
    ys = np.sort(rng.uniform(0, height - 1, (count, 2)), axis=1)
    boxes = np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1)
    boxes[-1, 2:] = (width - 1, height - 1)
    points = boxes[:, :2] + rng.uniform(0.2, 0.8, (count, 2)) * (boxes[:, 2:] - boxes[:, :2])
    return boxes, points


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)
