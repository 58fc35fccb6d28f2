"""What `MaskDecoder.embed` returns: one image encoded by SAM (either family), on torch."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageEmbedding:
    """One image encoded by SAM.

    features: (1, C, h, w) tensor on the decoder's device, in its compute dtype
        (C = the decoder width, h = w = image_size / the encoder's patch size; 64 for the official models).
    original_size: (H, W) of the image given to `embed`.
    input_size: (h', w') of the resized image inside the image_size x image_size input (SAM 1
        pads it bottom/right; SAM 2 stretches the image to the whole input).
    high_res: SAM 2 only: the decoder's projected stride-4 and stride-8 encoder features,
        (1, C/8, 4h, 4w) and (1, C/4, 2h, 2w), like `features`; () for SAM 1.
    """

    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    high_res: tuple[torch.Tensor, ...] = ()
