"""SAM on torch: embed an image once, then decode all box/point prompts in one call.

Reproduces segment_anything's SamPredictor (set_image + predict with multimask_output=True and the
best-scoring mask per prompt) for K prompts at once: the image encoder runs in cache-sized tiles
(`image_encoder.encode`), the prompt decoder shares the image-side work between prompts
(`prompt_decoder.PromptDecoder`), and only the chosen mask of each prompt is upsampled to full
resolution, in one matrix product per axis (`masks`).

SAM 2 / 2.1 (a `sam2_model.Sam2Image`, config kind "sam2") goes through the same `MaskDecoder`:
its family-specific half is `sam2_backend.Sam2Runner` (the `sam2` package's SAM2ImagePredictor,
all prompts of a group in one decoder pass); SAM 1's is `_Sam1Runner` below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from star_edge.errors import InvalidInputError
from star_edge.sam.cache import EmbeddingCache
from star_edge.sam.checkpoints import load_sam, resolve_device
from star_edge.sam.embedding import ImageEmbedding
from star_edge.sam.image_encoder import encode
from star_edge.sam.inputs import check_image, check_prompts, encoder_input, labelled_points
from star_edge.sam.masks import upsample_masks, upsampling_matrices
from star_edge.sam.prompt_decoder import PromptDecoder
from star_edge.sam.sam2_backend import Sam2Runner
from star_edge.sam.sam2_model import Sam2Image

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_UPSAMPLE_VALUES = 1 << 24
_TILE_TOKENS = 1024
DEFAULT_CACHE_SIZE = 8


class _Runner(Protocol):
    """The family-specific half of `MaskDecoder` (`_Sam1Runner`, `sam2_backend.Sam2Runner`)."""

    @property
    def image_size(self) -> int: ...

    @property
    def mask_threshold(self) -> float: ...

    def default_max_batch(self) -> int: ...

    def feature_shapes(self) -> tuple[tuple[int, ...], ...]: ...

    def embed(self, image: np.ndarray, device: torch.device) -> ImageEmbedding: ...

    def decode_best(
        self,
        embedding: ImageEmbedding,
        boxes: np.ndarray | None,
        points: np.ndarray | None,
        multimask: bool,
        max_batch: int,
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]: ...


class _Sam1Runner:
    """SAM 1 inside `MaskDecoder`: the padded ResizeLongestSide input, the tiled ViT encoder and
    the re-expressed prompt decoder (a segment_anything Sam already on its device)."""

    def __init__(self, sam: torch.nn.Module, dtype: torch.dtype) -> None:
        """Casts the image encoder and the mask decoder to `dtype` in place."""
        self._sam = sam
        self._dtype = dtype
        sam.image_encoder.to(dtype)
        sam.mask_decoder.to(dtype)
        self._decoder = PromptDecoder(sam.prompt_encoder, sam.mask_decoder)

    @property
    def image_size(self) -> int:
        return int(self._sam.image_encoder.img_size)

    @property
    def mask_threshold(self) -> float:
        return float(self._sam.mask_threshold)

    def default_max_batch(self) -> int:
        return self._decoder.default_max_batch()

    def feature_shapes(self) -> tuple[tuple[int, ...], ...]:
        grid = self._sam.prompt_encoder.image_embedding_size
        return ((1, self._sam.prompt_encoder.embed_dim, *grid),)

    def embed(self, image: np.ndarray, device: torch.device) -> ImageEmbedding:
        mean = self._sam.pixel_mean.flatten().tolist()
        std = self._sam.pixel_std.flatten().tolist()
        pixels, input_size = encoder_input(image, self.image_size, mean, std)
        tensor = torch.from_numpy(pixels).to(device, self._dtype)
        features = encode(self._sam.image_encoder, tensor)
        original_size = (int(image.shape[0]), int(image.shape[1]))
        return ImageEmbedding(features=features, original_size=original_size, input_size=input_size)

    def decode_best(
        self,
        embedding: ImageEmbedding,
        boxes: np.ndarray | None,
        points: np.ndarray | None,
        multimask: bool,
        max_batch: int,
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
        device = embedding.features.device
        coords, labels = labelled_points(boxes, points, embedding.original_size, self.image_size)
        rows, cols = upsampling_matrices(
            self._decoder.low_res_size,
            self.image_size,
            embedding.input_size,
            embedding.original_size,
        )
        logits, scores = self._decoder.decode_best(
            embedding.features,
            torch.from_numpy(coords).to(device),
            torch.from_numpy(labels).to(device),
            multimask,
            max_batch,
            extent=(rows.shape[1], cols.shape[1]),
            tile_tokens=None if device.type == "cuda" else _TILE_TOKENS,
        )
        return logits, scores, rows, cols


def _check_max_batch(max_batch: object) -> int | None:
    if max_batch is None:
        return None
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise InvalidInputError(f"max_batch must be None or an int >= 1, got {max_batch!r}")
    return max_batch


class MaskDecoder:
    """SAM image encoder + prompt decoder on torch (SAM 1, or SAM 2 / 2.1).

    `embed` once per image, `decode` any number of times. Embeddings are cached by image content
    (a bounded LRU, `cache_size` entries of C * h * w * itemsize bytes each: 4 MiB for the
    official SAM 1 models in float32, 64 KiB for the tiny demo SAM; 16 MiB for SAM 2, whose
    embeddings carry its high-resolution features too). One instance may serve several threads;
    everything runs under torch.inference_mode.
    """

    def __init__(
        self,
        sam: torch.nn.Module,
        device: str = "cpu",
        dtype: str = "float32",
        cache_size: int = DEFAULT_CACHE_SIZE,
        max_batch: int | None = None,
    ) -> None:
        """Use `sam` (a segment_anything Sam or a `sam2_model.Sam2Image`, moved to `device` in
        place) for inference.

        dtype: compute dtype of the image encoder and mask decoder ("float32", "float16",
            "bfloat16"). float16 is meant for CUDA; bfloat16 also runs fast on CPUs with
            AVX512-BF16 or AMX (benchmarks/sam_decode.py --bf16), not exactly: a prompt whose
            candidate masks score alike may pick another one. The prompt encoder, the mask
            upsampling and the returned scores stay float32.
        cache_size: embeddings kept (least recently used dropped first); 0 disables the cache.
        max_batch: prompts decoded together; None picks on CPU (SAM 1 from the embedding size,
            `PromptDecoder.default_max_batch`: 4 for 64 x 64 x 256 embeddings; SAM 2: 4). On
            CUDA None means all prompts in one group.

        Raises:
            InvalidInputError: unknown dtype or device name, bad cache_size or max_batch.
            BackendUnavailableError: a CUDA device without CUDA.
        """
        if dtype not in _DTYPES:
            raise InvalidInputError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
        self._max_batch = _check_max_batch(max_batch)
        self._cache: EmbeddingCache[ImageEmbedding] = EmbeddingCache(cache_size)
        self._device = resolve_device(device)
        self._dtype = _DTYPES[dtype]
        sam = sam.to(self._device).eval()
        self._runner: _Runner = (
            Sam2Runner(sam, self._dtype)
            if isinstance(sam, Sam2Image)
            else _Sam1Runner(sam, self._dtype)
        )

    @classmethod
    def from_module(
        cls,
        sam: torch.nn.Module,
        device: str = "cpu",
        dtype: str = "float32",
        cache_size: int = DEFAULT_CACHE_SIZE,
        max_batch: int | None = None,
    ) -> MaskDecoder:
        """Wrap a segment_anything Sam or a `Sam2Image` (moved to `device` and cast in place)."""
        return cls(sam, device=device, dtype=dtype, cache_size=cache_size, max_batch=max_batch)

    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        device: str = "cpu",
        dtype: str = "float32",
        cache_size: int = DEFAULT_CACHE_SIZE,
        max_batch: int | None = None,
    ) -> MaskDecoder:
        """Load a sam/ folder (config.json + model.safetensors; see star_edge.sam.checkpoints),
        SAM 1 or SAM 2 as its config's kind says.

        Raises:
            BundleError: missing, truncated or mismatched files, naming the file.
        """
        sam = load_sam(path, device=device)
        return cls(sam, device=device, dtype=dtype, cache_size=cache_size, max_batch=max_batch)

    @property
    def image_size(self) -> int:
        """Side of the square encoder input in pixels (1024 for the official models)."""
        return self._runner.image_size

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return self._device

    @property
    def cache(self) -> EmbeddingCache[ImageEmbedding]:
        """The embedding cache (hits, misses, len, clear)."""
        return self._cache

    @property
    def max_batch(self) -> int:
        """Prompts decoded together in one group."""
        if self._max_batch is not None:
            return self._max_batch
        if self._device.type == "cuda":
            return 1 << 30
        return self._runner.default_max_batch()

    def embed(self, image: np.ndarray) -> ImageEmbedding:
        """Encode one image (or return the cached embedding of the same pixels).

        image: (H, W, 3) uint8 RGB. SAM 1: resized with its longest side to `image_size` (PIL
        bilinear, as the official predictor), normalised with the model's pixel mean/std, padded
        bottom/right to image_size x image_size. SAM 2: stretched to image_size x image_size
        (bilinear, antialiased, as torchvision resizes tensors), normalised with its mean/std.

        On CUDA it returns once the features are computed (it synchronises), so the time it takes
        is the encoder's, not its kernel launches'.

        Raises:
            InvalidInputError: not an (H, W, 3) uint8 array.
        """
        image = check_image(image)
        return self._cache.get_or_compute(image, lambda: self._embed(image))

    @torch.inference_mode()
    def _embed(self, image: np.ndarray) -> ImageEmbedding:
        embedding = self._runner.embed(image, self._device)
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        return embedding

    @torch.inference_mode()
    def decode(
        self,
        embedding: ImageEmbedding,
        boxes: np.ndarray | None = None,
        points: np.ndarray | None = None,
        multimask: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Masks for K prompts on an embedded image, decoded together.

        Prompt k is boxes[k] and/or one positive point points[k], in original-image pixels.
        boxes: (K, 4) real (x1, y1, x2, y2) or None; points: (K, 2) real (x, y) or None; not both
        None, and the same K when both are given. multimask=True takes, per prompt, the one of
        the decoder's multimask outputs with the highest predicted IoU; False takes its single
        mask output (SAM 2: unless that mask is unstable, then its best multimask output, as the
        official builder's default post-processing does).

        Returns:
            masks: (K, H, W) bool, H, W = embedding.original_size.
            scores: (K,) float32, the predicted IoU of each returned mask.

        Raises:
            InvalidInputError: bad embedding, shapes, dtypes or non-finite coordinates.
        """
        self._check_embedding(embedding)
        boxes, points, count = check_prompts(boxes, points, multimask)
        height, width = embedding.original_size
        if count == 0:
            return np.zeros((0, height, width), dtype=bool), np.zeros((0,), dtype=np.float32)
        logits, scores, rows, cols = self._runner.decode_best(
            embedding, boxes, points, multimask, self.max_batch
        )
        return self._upsample(logits, rows, cols), scores.cpu().numpy()

    def _upsample(self, logits: torch.Tensor, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """(K, r', c') float32 logits and the matrices of `masks.upsampling_matrices` (or
        `masks.stretch_matrices`) -> (K, H, W) bool masks. On the CPU by `masks.upsample_masks`
        (banded products); on a GPU as dense products, in groups of prompts whose
        full-resolution logits stay under `_UPSAMPLE_VALUES` values."""
        threshold = self._runner.mask_threshold
        if logits.device.type == "cpu":
            return upsample_masks(logits.numpy(), rows, cols, threshold)
        rows_t = torch.tensor(rows, device=self._device)
        cols_t = torch.tensor(cols, device=self._device).t()
        cropped = logits[:, : rows.shape[1], : cols.shape[1]]
        masks = torch.empty((len(logits), rows.shape[0], cols.shape[0]), dtype=torch.bool)
        step = max(1, _UPSAMPLE_VALUES // (rows.shape[0] * cols.shape[0]))
        for start in range(0, len(logits), step):
            full = rows_t @ cropped[start : start + step] @ cols_t
            masks[start : start + step] = (full > threshold).cpu()
        return masks.numpy()

    def _check_embedding(self, embedding: object) -> None:
        if not isinstance(embedding, ImageEmbedding):
            kind = type(embedding).__name__
            raise InvalidInputError(f"embedding must be an ImageEmbedding, got {kind}")
        shapes = self._runner.feature_shapes()
        expected = tuple((shape, self._dtype, self._device) for shape in shapes)
        tensors = (embedding.features, *embedding.high_res)
        found = tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)
        if found != expected:
            given = ", ".join(str(shape) for shape, _, _ in found)
            wanted = ", ".join(str(shape) for shape, _, _ in expected)
            raise InvalidInputError(
                f"embedding features {given} {found[0][1]} on {found[0][2]} do not come from "
                f"this decoder (expected {wanted} {self._dtype} on {self._device})"
            )
