"""The tiny SAM judged through the runtime: mask IoU with ground-truth prompts, and its export.

`evaluate` loads a written sam/ folder with the runtime's `MaskDecoder` (the path `Segmenter`
takes), embeds each scene's image once and decodes all its prompts in one call, multimask output
with the highest predicted IoU, as at inference. `export_sam` writes a bundle sam/ folder in
float16 when that costs less than `max_iou_loss` of that IoU, else in float32.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from star_edge.export.tiny_sam import write_sam_dir
from star_edge.sam.checkpoints import load_sam, read_sam_config
from star_edge.sam.torch_backend import MaskDecoder
from star_edge.train.metrics import intersection_union, iou
from star_edge.train.sam_data import SamScene

FP16_MAX_IOU_LOSS = 0.005


@dataclass(frozen=True)
class SamEvaluation:
    """mask_iou: the mean over all prompts of the scenes; ious: (P,) float64, one per prompt in
    scene order; scenes and prompts: how many of each were evaluated."""

    mask_iou: float
    scenes: int
    prompts: int
    ious: np.ndarray


def predict_masks(decoder: MaskDecoder, scene: SamScene) -> np.ndarray:
    """The runtime's masks for a scene's ground-truth prompts: (K, H, W) bool."""
    embedding = decoder.embed(scene.image)
    masks, _ = decoder.decode(embedding, scene.boxes, scene.points)
    return masks


def evaluate(sam_dir: str | Path, scenes: Sequence[SamScene]) -> SamEvaluation:
    """Mean mask IoU of the sam/ folder `sam_dir` on `scenes` (see the module docstring).

    Raises:
        BundleError: `sam_dir` is missing, truncated or mismatched.
    """
    decoder = MaskDecoder.from_dir(sam_dir, cache_size=0)
    ious = [iou(*intersection_union(predicted, target))
            for scene in scenes
            for predicted, target in zip(predict_masks(decoder, scene), scene.masks)]
    values = np.asarray(ious, dtype=np.float64)
    mean = float(values.mean()) if len(values) else float("nan")
    return SamEvaluation(mask_iou=mean, scenes=len(scenes), prompts=len(values), ious=values)


def export_sam(sam_dir: str | Path, out_dir: str | Path, scenes: Sequence[SamScene],
               max_iou_loss: float = FP16_MAX_IOU_LOSS) -> dict[str, Any]:
    """Write the sam/ folder `sam_dir` (a checkpoint's, float32) to `out_dir` for a bundle.

    Both precisions are evaluated on `scenes`; float16 is kept when its mean mask IoU is less than
    `max_iou_loss` below float32's. Returns the report: dtype, mask_iou_fp32, mask_iou_fp16,
    scenes, prompts, bytes (of the written folder).
    """
    fp32 = evaluate(sam_dir, scenes)
    sam, config = load_sam(sam_dir), read_sam_config(sam_dir)
    with tempfile.TemporaryDirectory() as staging:
        write_sam_dir(sam, config, staging, dtype=torch.float16)
        fp16 = evaluate(staging, scenes)
    dtype = torch.float16 if fp32.mask_iou - fp16.mask_iou < max_iou_loss else torch.float32
    written = write_sam_dir(sam, config, out_dir, dtype=dtype)
    return {"dtype": str(dtype).removeprefix("torch."), "mask_iou_fp32": fp32.mask_iou,
            "mask_iou_fp16": fp16.mask_iou, "scenes": fp32.scenes, "prompts": fp32.prompts,
            "bytes": sum(path.stat().st_size for path in written)}
