"""SAM 2 / 2.1 for single images, built from a sam/config.json dict; torch only (no `sam2` package).

`Sam2Image` holds the official image-path modules under their official names (`image_encoder`,
`sam_prompt_encoder`, `sam_mask_decoder`, `no_mem_embed`), so the image-path tensors of an official
checkpoint load with `load_state_dict(strict=True)`. What it computes is what the `sam2` package's
SAM2ImagePredictor does:

- `set_image`: the image is converted to float in [0, 1], stretched to S x S (bilinear with
  antialiasing, torchvision's tensor `Resize`), normalised with the ImageNet mean / std, and
  encoded; the stride-4 / stride-8 levels go through the decoder's `conv_s0` / `conv_s1` once,
  and `no_mem_embed` is added to the stride-16 level (the no-memory path of image mode).
- `predict`: box corners and points are prompts in the S x S frame, always followed by one
  padding point; the mask decoder runs on all prompts of a group at once. With
  multimask_output=False, the official builder's post-processing falls back to the best
  multimask output when the single mask is unstable (`select_outputs`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from star_edge.sam.sam2_config import check_sam2_config
from star_edge.sam.sam2_decoder import MaskDecoder, PromptEncoder
from star_edge.sam.sam2_encoder import NECK_DIM, ImageEncoder

BACKBONE_STRIDE = 16
"""Stride of the image embedding the decoder attends to."""
STABILITY_DELTA = 0.05
STABILITY_THRESHOLD = 0.98
"""build_sam2's dynamic multimask fallback: the single mask is kept when the area of its logits
> +delta over the area > -delta is at least the threshold."""


class Sam2Image(nn.Module):
    """SAM 2's image path: encoder, prompt encoder, mask decoder and the no-memory embedding."""

    def __init__(self, config: dict[str, Any]) -> None:
        """config: a checked sam/config.json dict of kind "sam2" (see `sam2_config`)."""
        super().__init__()
        self.image_size = int(config["image_size"])
        self.grid = self.image_size // BACKBONE_STRIDE
        self.pixel_mean = tuple(float(v) for v in config["pixel_mean"])
        self.pixel_std = tuple(float(v) for v in config["pixel_std"])
        self.mask_threshold = float(config["mask_threshold"])
        self.image_encoder = ImageEncoder(config)
        self.sam_prompt_encoder = PromptEncoder(self.image_size, self.grid)
        self.sam_mask_decoder = MaskDecoder()
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, NECK_DIM))

    def preprocess(
        self, image: np.ndarray, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (1, 3, S, S) normalised pixels in `dtype` on `device`."""
        pixels = torch.tensor(image, device=device).permute(2, 0, 1).float().div(255)
        size = (self.image_size, self.image_size)
        resized = F.interpolate(
            pixels[None], size=size, mode="bilinear", align_corners=False, antialias=True
        )
        mean = torch.tensor(self.pixel_mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.pixel_std, device=device).view(1, 3, 1, 1)
        return ((resized - mean) / std).to(dtype)

    def encode(
        self, pixels: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """pixels (1, 3, S, S) from `preprocess` -> the image embedding (1, D, S/16, S/16) with
        the no-memory embedding added, and the decoder's projected high-resolution features
        ((1, D/8, S/4, S/4), (1, D/4, S/8, S/8)), in the encoder's dtype."""
        stride4, stride8, stride16 = self.image_encoder(pixels)
        decoder = self.sam_mask_decoder
        high_res = (decoder.conv_s0(stride4), decoder.conv_s1(stride8))
        features = stride16 + self.no_mem_embed.view(1, -1, 1, 1).to(stride16.dtype)
        return features, high_res

    def decode(
        self,
        features: torch.Tensor,
        high_res: tuple[torch.Tensor, torch.Tensor],
        coords: torch.Tensor,
        labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All decoder outputs for K prompts.

        features, high_res: from `encode`; coords (K, N, 2) float32 in the S x S frame, labels
        (K, N) int64 (see `PromptEncoder.embed_points`).

        Returns:
            logits (K, 4, S/4, S/4) and iou (K, 4), float32; output 0 the single mask.
        """
        dtype = features.dtype
        prompt_encoder = self.sam_prompt_encoder
        sparse = prompt_encoder.embed_points(coords, labels).to(dtype)
        dense = prompt_encoder.no_mask_embed.weight.view(1, -1, 1, 1).to(dtype)
        image_pe = prompt_encoder.dense_pe().to(dtype)
        logits, iou = self.sam_mask_decoder(features, high_res, image_pe, dense, sparse)
        return logits.float(), iou.float()


def stability(logits: torch.Tensor) -> torch.Tensor:
    """(K, r, c) mask logits -> (K,) area(> +delta) / area(> -delta), 1 where both are empty."""
    flat = logits.flatten(1)
    inner = (flat > STABILITY_DELTA).sum(dim=1).float()
    outer = (flat > -STABILITY_DELTA).sum(dim=1).float()
    return torch.where(outer > 0, inner / outer.clamp(min=1), torch.ones_like(outer))


def select_outputs(logits: torch.Tensor, iou: torch.Tensor, multimask: bool) -> torch.Tensor:
    """Which decoder output each prompt keeps: (K, 4, r, c) logits, (K, 4) iou -> (K,) int64.

    multimask: the multimask output (1-3) with the highest predicted IoU, as SAM2ImagePredictor
    with multimask_output=True followed by an argmax. Otherwise output 0, unless its stability
    is below STABILITY_THRESHOLD, then that best multimask output (build_sam2's default
    post-processing, `dynamic_multimask_via_stability`).
    """
    best = iou[:, 1:].argmax(dim=1) + 1
    if multimask:
        return best
    stable = stability(logits[:, 0]) >= STABILITY_THRESHOLD
    return torch.where(stable, torch.zeros_like(best), best)


def build_sam2_from_config(config: dict[str, Any]) -> Sam2Image:
    """An untrained `Sam2Image` (eval mode) from a sam/config.json dict of kind "sam2".

    Parameters are created on torch's current default device (`with torch.device("meta")`
    builds without allocating).

    Raises:
        InvalidInputError: the config fails `check_sam2_config`.
    """
    check_sam2_config(config)
    return Sam2Image(config).eval()
