"""Every coordinate-frame change of star-edge, and nothing else.

Frames:
- original: pixels of the image the caller gave, size (W, H); x in [0, W-1], y in [0, H-1].
- reasoner input ("pixels" frame, Qwen2.5-VL): integer pixels of the image resized to the reasoner
  input, (840, 840) by default.
- 0-1000 grid ("grid1000" frame, Qwen3-VL): the image normalised to a 1000 x 1000 grid.
- SAM: the ResizeLongestSide frame of segment_anything (longest side = the SAM image size).
- SAM 2: the image stretched to the square SAM 2 input (side x side), as the sam2 package does.

Arrays of coordinates have a last dimension of x, y pairs: (..., 2) points, (..., 4) boxes
(x1, y1, x2, y2), any even length in general. Sizes are (width, height) tuples, except for
`sam_preprocess_shape`, which keeps segment_anything's (height, width) order.

Reasoner frames map to original pixels with the StAR reference rounding `int(v * (W / w) + 0.5)`
(x; y alike with H / h), where (w, h) is the frame size: the scale factor is computed first, as the
reference does, and `int` truncates toward zero (so -1.7 maps to -1 at scale 1). Nowhere else in
star-edge multiplies coordinates by scale factors.
"""

from __future__ import annotations

import operator
from enum import Enum
from typing import Sequence

import numpy as np

from star_edge.errors import InvalidInputError

GRID1000_SIZE: tuple[int, int] = (1000, 1000)
"""Size (w, h) of the Qwen3-VL normalised coordinate grid."""

DEFAULT_INPUT_SIZE: tuple[int, int] = (840, 840)
"""Reasoner input size (w, h) of the StAR reference (Qwen2.5-VL, pixel coordinates)."""

_INT_LIMIT = float(2**53)


class Frame(str, Enum):
    """The coordinate frame a reasoner answers in; `Frame("grid1000")` parses a manifest value."""

    PIXELS = "pixels"
    GRID1000 = "grid1000"


def _positive_int(value: object, name: str) -> int:
    """`value` as a positive int (numpy integers yes, bools no), else InvalidInputError."""
    if isinstance(value, bool):
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}") from None
    if number <= 0:
        raise InvalidInputError(f"{name} must be a positive integer, got {number}")
    return number


def check_size(size: Sequence[int], name: str = "size") -> tuple[int, int]:
    """Validate a (width, height) pair of positive integers and return it as a tuple of ints.

    Raises InvalidInputError naming `name` when it is not two positive integers (bools refused).
    """
    try:
        width, height = size
    except (TypeError, ValueError):
        message = f"{name} must be two integers (width, height), got {size!r}"
        raise InvalidInputError(message) from None
    return _positive_int(width, f"{name} width"), _positive_int(height, f"{name} height")


def _as_xy(coords: np.ndarray | Sequence, dtype: type | None = np.float64) -> np.ndarray:
    """Coordinates as an array whose last dimension holds x, y pairs; raises InvalidInputError."""
    try:
        array = np.asarray(coords, dtype=dtype)
    except (TypeError, ValueError) as error:
        raise InvalidInputError(f"coordinates must be an array of numbers: {error}") from None
    if array.ndim == 0 or array.shape[-1] == 0 or array.shape[-1] % 2:
        raise InvalidInputError(
            f"coordinates must have a last dimension of x, y pairs, got shape {array.shape}"
        )
    return array


def _xy_factors(last_dim: int, fx: float, fy: float) -> np.ndarray:
    """(last_dim,) float64 factors [fx, fy, fx, fy, ...] for interleaved x, y coordinates."""
    return np.tile(np.array([fx, fy], dtype=np.float64), last_dim // 2)


def _rescale_rounded(
    coords: np.ndarray | Sequence, from_size: tuple[int, int], to_size: tuple[int, int]
) -> np.ndarray:
    """Map coordinates from a frame of (checked) size `from_size` to one of `to_size`.

    Computes `trunc(v * (to / from) + 0.5)` per axis; returns int64 of the same shape. Values are
    saturated at +-2**53 before the integer conversion (far outside any image; clamp afterwards).
    """
    (from_w, from_h), (to_w, to_h) = from_size, to_size
    xy = _as_xy(coords)
    if not np.isfinite(xy).all():
        raise InvalidInputError("coordinates must be finite (no NaN or inf)")
    with np.errstate(over="ignore"):  # a finite value past float64's range becomes inf, then saturates
        scaled = xy * _xy_factors(xy.shape[-1], to_w / from_w, to_h / from_h) + 0.5
    return np.clip(np.trunc(scaled), -_INT_LIMIT, _INT_LIMIT).astype(np.int64)


def input_to_original(
    coords: np.ndarray | Sequence,
    image_size: Sequence[int],
    input_size: Sequence[int] = DEFAULT_INPUT_SIZE,
) -> np.ndarray:
    """Reasoner input pixels -> original pixels: `int(v * (W / w) + 0.5)` per axis.

    coords (..., 2k) numbers in the resized input of size input_size (w, h); image_size (W, H).
    Returns (..., 2k) int64, not clamped.
    """
    image_size = check_size(image_size, "image_size")
    return _rescale_rounded(coords, check_size(input_size, "input_size"), image_size)


def original_to_input(
    coords: np.ndarray | Sequence,
    image_size: Sequence[int],
    input_size: Sequence[int] = DEFAULT_INPUT_SIZE,
) -> np.ndarray:
    """Original pixels -> reasoner input pixels: `int(v * (w / W) + 0.5)` per axis.

    The inverse used for training targets: coords (..., 2k) numbers in the original image of size
    image_size (W, H). Returns (..., 2k) int64, not clamped. A round trip through
    `input_to_original` lands within `0.5 * W / w + 0.5` pixels of the start (x; y alike).
    """
    image_size = check_size(image_size, "image_size")
    return _rescale_rounded(coords, image_size, check_size(input_size, "input_size"))


def grid1000_to_original(coords: np.ndarray | Sequence, image_size: Sequence[int]) -> np.ndarray:
    """0-1000 grid -> original pixels: `int(v * (W / 1000) + 0.5)` per axis.

    coords (..., 2k) numbers on the grid; image_size (W, H). Returns (..., 2k) int64, not clamped.
    """
    return _rescale_rounded(coords, GRID1000_SIZE, check_size(image_size, "image_size"))


def original_to_grid1000(coords: np.ndarray | Sequence, image_size: Sequence[int]) -> np.ndarray:
    """Original pixels -> 0-1000 grid: `int(v * (1000 / W) + 0.5)` per axis.

    coords (..., 2k) numbers in the original image of size image_size (W, H). Returns (..., 2k)
    int64, not clamped (the grid's own range is 0..1000 inclusive).
    """
    return _rescale_rounded(coords, check_size(image_size, "image_size"), GRID1000_SIZE)


def frame_size(
    frame: Frame | str, input_size: Sequence[int] = DEFAULT_INPUT_SIZE
) -> tuple[int, int]:
    """The (w, h) a reasoner frame spans: input_size for "pixels", (1000, 1000) for "grid1000".

    Raises InvalidInputError for an unknown frame name.
    """
    try:
        frame = Frame(frame)
    except ValueError:
        names = ", ".join(repr(f.value) for f in Frame)
        message = f"unknown coordinate frame {frame!r}; expected one of {names}"
        raise InvalidInputError(message) from None
    if frame is Frame.GRID1000:
        return GRID1000_SIZE
    return check_size(input_size, "input_size")


def reasoner_to_original(
    coords: np.ndarray | Sequence,
    image_size: Sequence[int],
    frame: Frame | str,
    input_size: Sequence[int] = DEFAULT_INPUT_SIZE,
) -> np.ndarray:
    """A reasoner's answer frame -> original pixels (input_size is ignored for "grid1000").

    coords (..., 2k) numbers; image_size (W, H). Returns (..., 2k) int64, not clamped.
    """
    image_size = check_size(image_size, "image_size")
    return _rescale_rounded(coords, frame_size(frame, input_size), image_size)


def original_to_reasoner(
    coords: np.ndarray | Sequence,
    image_size: Sequence[int],
    frame: Frame | str,
    input_size: Sequence[int] = DEFAULT_INPUT_SIZE,
) -> np.ndarray:
    """Original pixels -> a reasoner's answer frame (input_size is ignored for "grid1000").

    coords (..., 2k) numbers; image_size (W, H). Returns (..., 2k) int64, not clamped.
    """
    image_size = check_size(image_size, "image_size")
    return _rescale_rounded(coords, image_size, frame_size(frame, input_size))


def sam_preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(new_height, new_width) of an image resized so its longest side is `long_side`.

    As segment_anything's ResizeLongestSide.get_preprocess_shape: scale = long_side / max(H, W),
    each side `int(side * scale + 0.5)`, but at least 1 (segment_anything rounds the short side of
    an image thinner than 1 : 2 * long_side to 0 and fails). Note the (height, width) order, as in
    segment_anything.
    """
    width, height = check_size((width, height), "image size")
    long_side = _positive_int(long_side, "long_side")
    scale = long_side * 1.0 / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def original_to_sam(
    coords: np.ndarray | Sequence, image_size: Sequence[int], long_side: int
) -> np.ndarray:
    """Original pixels -> SAM's ResizeLongestSide frame, as apply_coords / apply_boxes do.

    coords (..., 2k) numbers (points (..., 2) or boxes (..., 4)); image_size (W, H); long_side the
    SAM image size (1024 for the official models). x is multiplied by new_w / W and y by new_h / H,
    with (new_h, new_w) from `sam_preprocess_shape`. Returns (..., 2k) float64, unrounded.
    """
    width, height = check_size(image_size, "image_size")
    new_h, new_w = sam_preprocess_shape(height, width, long_side)
    xy = _as_xy(coords)
    return xy * _xy_factors(xy.shape[-1], new_w / width, new_h / height)


def original_to_sam2(
    coords: np.ndarray | Sequence, image_size: Sequence[int], side: int
) -> np.ndarray:
    """Original pixels -> SAM 2's square input frame, as SAM2Transforms.transform_coords does
    with normalize=True: x * side / W, y * side / H.

    coords (..., 2k) numbers; image_size (W, H); side the SAM 2 image size (1024 for the
    official models). Returns (..., 2k) float64, unrounded.
    """
    width, height = check_size(image_size, "image_size")
    side = _positive_int(side, "side")
    xy = _as_xy(coords)
    return xy * _xy_factors(xy.shape[-1], side / width, side / height)


def _clamp_xy(coords: np.ndarray | Sequence, image_size: Sequence[int]) -> np.ndarray:
    """Clamp interleaved x, y coordinates to [0, W-1] x [0, H-1]; keeps the dtype."""
    width, height = check_size(image_size, "image_size")
    xy = _as_xy(coords, dtype=None)
    upper = _xy_factors(xy.shape[-1], width - 1, height - 1).astype(xy.dtype)
    return np.clip(xy, np.zeros_like(upper), upper)


def clamp_points(points: np.ndarray | Sequence, image_size: Sequence[int]) -> np.ndarray:
    """Clamp points (..., 2) to the image: x to [0, W-1], y to [0, H-1]; image_size (W, H).

    Returns a new array of the same shape and dtype.
    """
    xy = _as_xy(points, dtype=None)
    if xy.shape[-1] != 2:
        raise InvalidInputError(f"points must have shape (..., 2), got {xy.shape}")
    return _clamp_xy(xy, image_size)


def clamp_boxes(boxes: np.ndarray | Sequence, image_size: Sequence[int]) -> np.ndarray:
    """Clamp boxes (..., 4) x1, y1, x2, y2 to the image: x to [0, W-1], y to [0, H-1].

    image_size (W, H). Returns a new array of the same shape and dtype.
    """
    xy = _as_xy(boxes, dtype=None)
    if xy.shape[-1] != 4:
        raise InvalidInputError(f"boxes must have shape (..., 4), got {xy.shape}")
    return _clamp_xy(xy, image_size)


def order_box_corners(boxes: np.ndarray | Sequence) -> np.ndarray:
    """Boxes (..., 4) with corners ordered so that x1 <= x2 and y1 <= y2.

    Returns a new array of the same shape and dtype.
    """
    xy = _as_xy(boxes, dtype=None)
    if xy.shape[-1] != 4:
        raise InvalidInputError(f"boxes must have shape (..., 4), got {xy.shape}")
    low = np.minimum(xy[..., :2], xy[..., 2:])
    high = np.maximum(xy[..., :2], xy[..., 2:])
    return np.concatenate([low, high], axis=-1)
