"""SAM 2 inside the torch `MaskDecoder`: its image embedding and its batched prompt decoding.

`MaskDecoder` owns what both families share (checks, embedding cache, device and dtype, the
upsampling of the chosen logits); `Sam2Runner` does what differs for SAM 2: the stretched,
ImageNet-normalised encoder input, the embedding with its high-resolution features, SAM 2's
prompt order and frame, and one plain batched decoder pass per group of prompts.
"""

from __future__ import annotations

import numpy as np
import torch

from star_edge.sam.embedding import ImageEmbedding
from star_edge.sam.inputs import labelled_points_sam2
from star_edge.sam.masks import stretch_matrices
from star_edge.sam.sam2_encoder import NECK_DIM
from star_edge.sam.sam2_model import Sam2Image, select_outputs

_CPU_MAX_BATCH = 4
"""Prompts per decoder pass on CPU. Each prompt holds about 40 MB of activations (its own copy
of the 64 x 64 image tokens through the transformer, the 256 x 256 upscaled features); 16
prompts of hiera tiny on one thread took 1.97 / 1.85 / 2.49 / 2.95 s in groups of 1 / 4 / 8 / 16."""


class Sam2Runner:
    """The SAM 2 half of `MaskDecoder` (a `Sam2Image` already on its device)."""

    def __init__(self, model: Sam2Image, dtype: torch.dtype) -> None:
        """Casts the image encoder and the mask decoder to `dtype` in place; the prompt encoder
        and the no-memory embedding stay float32 (added in the encoder's dtype)."""
        self._model = model
        self._dtype = dtype
        model.image_encoder.to(dtype)
        model.sam_mask_decoder.to(dtype)

    @property
    def image_size(self) -> int:
        return self._model.image_size

    @property
    def mask_threshold(self) -> float:
        return self._model.mask_threshold

    def default_max_batch(self) -> int:
        """Prompts per decoder pass on CPU."""
        return _CPU_MAX_BATCH

    def feature_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Shapes of an embedding's features and high_res tensors, in that order."""
        grid = self._model.grid
        return (
            (1, NECK_DIM, grid, grid),
            (1, NECK_DIM // 8, 4 * grid, 4 * grid),
            (1, NECK_DIM // 4, 2 * grid, 2 * grid),
        )

    def embed(self, image: np.ndarray, device: torch.device) -> ImageEmbedding:
        """(H, W, 3) uint8 RGB (checked) -> its embedding, with the high-resolution features."""
        pixels = self._model.preprocess(image, device, self._dtype)
        features, high_res = self._model.encode(pixels)
        size = self.image_size
        original_size = (int(image.shape[0]), int(image.shape[1]))
        return ImageEmbedding(features, original_size, (size, size), high_res)

    def decode_best(
        self,
        embedding: ImageEmbedding,
        boxes: np.ndarray | None,
        points: np.ndarray | None,
        multimask: bool,
        max_batch: int,
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
        """The chosen output of each of K >= 1 prompts (see `sam2_model.select_outputs`).

        boxes (K, 4) / points (K, 2) float64 in original pixels, checked.

        Returns:
            logits (K, 4h, 4w) float32 and scores (K,) float32 on the device, and the float32
            resize matrices rows (H, 4h), cols (W, 4w) of `masks.stretch_matrices`.
        """
        device = embedding.features.device
        coords, labels = labelled_points_sam2(
            boxes, points, embedding.original_size, self.image_size
        )
        coords_t = torch.from_numpy(coords).to(device)
        labels_t = torch.from_numpy(labels).to(device)
        chosen_logits, chosen_scores = [], []
        for start in range(0, len(coords), max_batch):
            group = slice(start, start + max_batch)
            logits, iou = self._model.decode(
                embedding.features, embedding.high_res, coords_t[group], labels_t[group]
            )
            best = select_outputs(logits, iou, multimask)
            rows = torch.arange(len(best), device=device)
            chosen_logits.append(logits[rows, best])
            chosen_scores.append(iou[rows, best])
        low_res = (4 * self._model.grid, 4 * self._model.grid)
        rows_m, cols_m = stretch_matrices(low_res, embedding.original_size)
        return torch.cat(chosen_logits), torch.cat(chosen_scores), rows_m, cols_m

