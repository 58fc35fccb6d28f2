"""SAM on torch: embed an image once, then decode all box/point prompts in one batched call.

Reproduces segment_anything's SamPredictor (set_image + predict with multimask_output=True and the
best-scoring mask per prompt) but decodes K prompts together: one prompt encoder and one mask
decoder call, and full-resolution upsampling only for the chosen mask of each prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from star_edge.errors import InvalidInputError
from star_edge.geometry import original_to_sam, sam_preprocess_shape
from star_edge.sam.checkpoints import load_sam, resolve_device

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ImageEmbedding:
    """One image encoded by SAM.

    features: (1, C, h, w) tensor on the decoder's device, in its compute dtype
        (C = prompt_embed_dim, h = w = image_size / patch_size).
    original_size: (H, W) of the image given to `embed`.
    input_size: (h', w') of the resized image before padding to image_size x image_size.
    """

    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]


def _check_image(image: object) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise InvalidInputError(f"image must be a numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        message = f"image must have shape (H, W, 3) with H, W >= 1, got {image.shape}"
        raise InvalidInputError(message)
    if image.dtype != np.uint8:
        raise InvalidInputError(f"image must be uint8 RGB, got dtype {image.dtype}")
    return np.ascontiguousarray(image)


def _check_prompts(name: str, values: object, width: int) -> np.ndarray | None:
    """None or a finite real (K, width) array -> float64 (K, width)."""
    if values is None:
        return None
    if not isinstance(values, np.ndarray):
        kind = type(values).__name__
        raise InvalidInputError(f"{name} must be a numpy array of shape (K, {width}), got {kind}")
    if values.ndim != 2 or values.shape[1] != width:
        raise InvalidInputError(f"{name} must have shape (K, {width}), got {values.shape}")
    if values.dtype == np.bool_ or values.dtype.kind not in "iuf":
        raise InvalidInputError(f"{name} must hold real numbers, got dtype {values.dtype}")
    if not np.isfinite(values).all():
        raise InvalidInputError(f"{name} must be finite, got NaN or infinity")
    return values.astype(np.float64)


class MaskDecoder:
    """SAM image encoder + prompt decoder on torch.

    `embed` once per image, `decode` any number of times; the object keeps no per-image state,
    so one instance may serve several threads. Everything runs under torch.inference_mode.
    """

    def __init__(self, sam: torch.nn.Module, device: str = "cpu", dtype: str = "float32") -> None:
        """Use `sam` (a segment_anything Sam, moved to `device` in place) for inference.

        dtype: compute dtype of the image encoder and mask decoder ("float32", "float16",
            "bfloat16"; the half types are meant for CUDA). The prompt encoder, the mask
            upsampling and the returned scores stay float32.

        Raises:
            InvalidInputError: unknown dtype or device name.
            BackendUnavailableError: a CUDA device without CUDA.
        """
        if dtype not in _DTYPES:
            raise InvalidInputError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
        self._device = resolve_device(device)
        self._dtype = _DTYPES[dtype]
        self._sam = sam.to(self._device).eval()
        self._sam.image_encoder.to(self._dtype)
        self._sam.mask_decoder.to(self._dtype)

    @classmethod
    def from_module(
        cls, sam: torch.nn.Module, device: str = "cpu", dtype: str = "float32"
    ) -> MaskDecoder:
        """Wrap a segment_anything Sam (moved to `device` and cast in place)."""
        return cls(sam, device=device, dtype=dtype)

    @classmethod
    def from_dir(cls, path: str | Path, device: str = "cpu", dtype: str = "float32") -> MaskDecoder:
        """Load a sam/ folder (config.json + model.safetensors; see star_edge.sam.checkpoints).

        Raises:
            BundleError: missing, truncated or mismatched files, naming the file.
        """
        return cls(load_sam(path, device=device), device=device, dtype=dtype)

    @property
    def image_size(self) -> int:
        """Side of the square encoder input in pixels (1024 for the official models)."""
        return int(self._sam.image_encoder.img_size)

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return self._device

    @torch.inference_mode()
    def embed(self, image: np.ndarray) -> ImageEmbedding:
        """Encode one image.

        image: (H, W, 3) uint8 RGB. Resized with its longest side to `image_size` (PIL bilinear,
        as the official predictor), normalised with the model's pixel mean/std, padded
        bottom/right to image_size x image_size.

        Raises:
            InvalidInputError: not an (H, W, 3) uint8 array.
        """
        image = _check_image(image)
        original_size = (int(image.shape[0]), int(image.shape[1]))
        input_size = sam_preprocess_shape(*original_size, self.image_size)
        resized = Image.fromarray(image).resize(input_size[::-1], Image.Resampling.BILINEAR)
        pixels = torch.from_numpy(np.array(resized)).to(self._device).permute(2, 0, 1)[None]
        padded = self._sam.preprocess(pixels.float()).to(self._dtype)
        features = self._sam.image_encoder(padded)
        return ImageEmbedding(features=features, original_size=original_size, input_size=input_size)

    @torch.inference_mode()
    def decode(
        self,
        embedding: ImageEmbedding,
        boxes: np.ndarray | None = None,
        points: np.ndarray | None = None,
        multimask: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Masks for K prompts on an embedded image, in one batched decoder call.

        Prompt k is boxes[k] and/or one positive point points[k], in original-image pixels.
        boxes: (K, 4) real (x1, y1, x2, y2) or None; points: (K, 2) real (x, y) or None; not both
        None, and the same K when both are given. multimask=True takes, per prompt, the one of
        the decoder's multimask outputs with the highest predicted IoU; False takes its single
        mask output.

        Returns:
            masks: (K, H, W) bool, H, W = embedding.original_size.
            scores: (K,) float32, the predicted IoU of each returned mask.

        Raises:
            InvalidInputError: bad embedding, shapes, dtypes or non-finite coordinates.
        """
        self._check_embedding(embedding)
        if not isinstance(multimask, bool):
            raise InvalidInputError(f"multimask must be a bool, got {type(multimask).__name__}")
        boxes = _check_prompts("boxes", boxes, 4)
        points = _check_prompts("points", points, 2)
        if boxes is None and points is None:
            raise InvalidInputError("decode needs boxes, points or both; got neither")
        if boxes is not None and points is not None and len(boxes) != len(points):
            sizes = f"{len(boxes)} and {len(points)}"
            raise InvalidInputError(f"boxes and points must have the same K, got {sizes}")
        count = len(boxes) if boxes is not None else len(points)
        height, width = embedding.original_size
        if count == 0:
            return np.zeros((0, height, width), dtype=bool), np.zeros((0,), dtype=np.float32)
        logits, scores = self._decode_low_res(embedding, boxes, points, multimask)
        masks = self._sam.postprocess_masks(logits, embedding.input_size, embedding.original_size)
        return (masks[:, 0] > self._sam.mask_threshold).cpu().numpy(), scores.cpu().numpy()

    def _check_embedding(self, embedding: object) -> None:
        if not isinstance(embedding, ImageEmbedding):
            kind = type(embedding).__name__
            raise InvalidInputError(f"embedding must be an ImageEmbedding, got {kind}")
        features = embedding.features
        grid = self._sam.prompt_encoder.image_embedding_size
        expected = (1, self._sam.prompt_encoder.embed_dim, *grid)
        found = (tuple(features.shape), features.dtype, features.device)
        if found != (expected, self._dtype, self._device):
            raise InvalidInputError(
                f"embedding features {found[0]} {found[1]} on {found[2]} do not come from this "
                f"decoder (expected {expected} {self._dtype} on {self._device})"
            )

    def _decode_low_res(
        self,
        embedding: ImageEmbedding,
        boxes: np.ndarray | None,
        points: np.ndarray | None,
        multimask: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder for all K prompts at once.

        Returns the chosen low-resolution logits (K, 1, 4h, 4w) float32 and their predicted IoU
        (K,) float32.
        """
        height, width = embedding.original_size
        point_prompts = None
        if points is not None:
            xy = original_to_sam(points, (width, height), self.image_size)
            coords = torch.as_tensor(xy, dtype=torch.float32, device=self._device)
            labels = torch.ones((len(points), 1), dtype=torch.int32, device=self._device)
            point_prompts = (coords[:, None, :], labels)
        box_prompts = None
        if boxes is not None:
            corners = original_to_sam(boxes, (width, height), self.image_size)
            box_prompts = torch.as_tensor(corners, dtype=torch.float32, device=self._device)
        prompt_encoder = self._sam.prompt_encoder
        sparse, dense = prompt_encoder(points=point_prompts, boxes=box_prompts, masks=None)
        low_res, predicted_iou = self._sam.mask_decoder(
            image_embeddings=embedding.features,
            image_pe=prompt_encoder.get_dense_pe().to(self._dtype),
            sparse_prompt_embeddings=sparse.to(self._dtype),
            dense_prompt_embeddings=dense.to(self._dtype),
            multimask_output=multimask,
        )
        best = predicted_iou.float().argmax(dim=1)
        rows = torch.arange(len(best), device=self._device)
        return low_res[rows, best][:, None].float(), predicted_iou[rows, best].float()
