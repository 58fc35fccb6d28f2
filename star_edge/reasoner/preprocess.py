"""The reasoner's inputs without torch: prompt tokens, image patches and M-RoPE positions, in numpy.

The ONNX and TensorRT backends build here what the Hugging Face processor and `get_rope_index`
build for the torch backend, for the one case a reasoner sees (one image of a fixed size, one user
turn), and the tests hold them equal:

- the prompt: the chat template is rendered once, at export, around a placeholder query and stored
  as a prefix and a suffix (`PromptText`); at run time the query goes between them and each image
  placeholder token is repeated once per merged patch, as the processor does;
- tokens: the checkpoint's own tokenizer.json, run by the `tokenizers` library;
- pixels: resized to the input size (PIL bicubic, as the torch backend does), rescaled in float64
  then cast to float32, normalised with float32 mean and std, and cut into flattened patches in
  the vision tower's order (merge blocks of patches, each patch repeated over the temporal axis);
- positions: the three multimodal rotary rows (temporal, height, width) of Qwen2.5-VL / Qwen3-VL.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image

from star_edge.errors import BundleError, InvalidInputError


@dataclass(frozen=True)
class ImageLayout:
    """How an image becomes the vision tower's input.

    Attributes:
        input_size: (W, H) in pixels, multiples of patch_size * merge_size.
        patch_size: side of one patch in pixels.
        temporal_patch_size: frames per patch (a still image is repeated to fill them).
        merge_size: patches per side merged into one image token.
        mean, std: per-channel normalisation (RGB), applied after rescaling.
        rescale_factor: pixel values are multiplied by it first (1 / 255).
    """

    input_size: tuple[int, int]
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale_factor: float

    @property
    def grid(self) -> tuple[int, int, int]:
        """(t, h, w): patches along time, height and width."""
        return (1, self.input_size[1] // self.patch_size, self.input_size[0] // self.patch_size)

    @property
    def image_tokens(self) -> int:
        """Image tokens in the prompt: one per merged block of patches."""
        t, h, w = self.grid
        return t * h * w // self.merge_size**2


def pixel_patches(image: PIL.Image.Image, layout: ImageLayout) -> np.ndarray:
    """The vision tower's input for one image.

    Args:
        image: any mode and size; converted to RGB and resized to `layout.input_size` (bicubic).

    Returns:
        (h * w, 3 * temporal_patch_size * patch_size**2) float32, with (t, h, w) = layout.grid:
        patches in merge-block order (block row, block column, row in block, column in block), each
        flattened as (channel, time, row, column).
    """
    rgb = image.convert("RGB")
    if rgb.size != layout.input_size:
        rgb = rgb.resize(layout.input_size, PIL.Image.Resampling.BICUBIC)
    channels = np.asarray(rgb).transpose(2, 0, 1)
    scaled = (channels.astype(np.float64) * layout.rescale_factor).astype(np.float32)
    mean = np.asarray(layout.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(layout.std, dtype=np.float32)[:, None, None]
    normalized = (scaled - mean) / std
    _, rows, cols = layout.grid
    patch, merge, frames = layout.patch_size, layout.merge_size, layout.temporal_patch_size
    blocks = normalized.reshape(3, rows // merge, merge, patch, cols // merge, merge, patch)
    blocks = blocks.transpose(1, 4, 2, 5, 0, 3, 6)  # block row, block col, row, col, channel, y, x
    repeated = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], frames, patch, patch))
    return np.ascontiguousarray(repeated.reshape(rows * cols, 3 * frames * patch * patch))


def mrope_positions(image_mask: np.ndarray, grid: tuple[int, int, int], merge_size: int) -> np.ndarray:
    """The temporal, height and width rotary positions of a prompt with one image.

    Text tokens count up on all three rows; the image's tokens sit on their (t, h, w) grid of merged
    patches, offset by the position where the image starts; text after the image goes on from that
    start plus the image's longer side in tokens.

    Args:
        image_mask: (L,) bool, True at the image tokens (one contiguous run).
        grid: (t, h, w) patches of the image.
        merge_size: patches per side merged into one token.

    Returns:
        (3, L) int64.
    """
    length = image_mask.shape[0]
    image = np.flatnonzero(image_mask)
    t, h, w = grid[0], grid[1] // merge_size, grid[2] // merge_size
    if image.size != t * h * w or (image.size and image[-1] - image[0] + 1 != image.size):
        raise InvalidInputError(f"expected one run of {t * h * w} image tokens, found {image.size}")
    start = int(image[0]) if image.size else length
    positions = np.empty((3, length), dtype=np.int64)
    positions[:, :start] = np.arange(start)
    grid_t, grid_h, grid_w = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    positions[:, start : start + image.size] = start + np.stack([grid_t, grid_h, grid_w]).reshape(3, -1)
    after = start + image.size
    resume = start + max(h, w) if image.size else start
    positions[:, after:] = resume + np.arange(length - after)
    return positions


@dataclass(frozen=True)
class PromptText:
    """The rendered chat prompt around the query: prefix + query + suffix.

    Attributes:
        prefix, suffix: the chat template's output before and after the query, with the image
            placeholder token once (as the template writes it).
        image_token: the image placeholder token, repeated once per image token at run time.
    """

    prefix: str
    suffix: str
    image_token: str

    def render(self, query: str, image_tokens: int) -> str:
        """The full prompt for `query` with `image_tokens` image placeholders."""
        expand = self.image_token * image_tokens
        return (self.prefix.replace(self.image_token, expand) + query
                + self.suffix.replace(self.image_token, expand))


class PromptTokenizer:
    """The checkpoint's tokenizer (tokenizer.json) on the `tokenizers` library, without transformers."""

    def __init__(self, tokenizer_file: str | Path) -> None:
        """Raises BundleError when the file is missing or not a tokenizers JSON."""
        from tokenizers import Tokenizer

        path = Path(tokenizer_file)
        if not path.is_file():
            raise BundleError(f"{path} is missing (the reasoner's tokenizer)")
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises its own exception type
            raise BundleError(f"{path} is not a readable tokenizer: {exc}") from exc
        self.special_tokens = tuple(
            token.content for token in self._tokenizer.get_added_tokens_decoder().values() if token.special
        )

    def token_id(self, token: str) -> int:
        """The id of `token` (a whole token of the vocabulary); BundleError if it has none."""
        found = self._tokenizer.token_to_id(token)
        if found is None:
            raise BundleError(f"the reasoner's tokenizer has no token {token!r}")
        return found

    def encode(self, text: str) -> np.ndarray:
        """(L,) int64 token ids of `text`, special tokens in it recognised."""
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=True).ids, dtype=np.int64)

    def decode(self, token_ids: list[int]) -> str:
        """The text of generated ids, special tokens (the end token) removed."""
        return self._tokenizer.decode(token_ids, skip_special_tokens=True)
