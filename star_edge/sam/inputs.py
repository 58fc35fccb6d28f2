"""What every SAM backend does before the networks run, in numpy (no torch): check the image and
the prompts, build the image encoder's input, and turn box/point prompts into labelled points.

Labelled points are the one prompt format of our decoders (torch module and ONNX graph alike), as
in segment_anything's own ONNX export: per prompt N points (x, y) in the SAM frame, each with a
label: 1 positive point, 0 negative point, 2 / 3 the top-left / bottom-right box corner, -1 padding
(a point-only prompt gets one padding point, as `PromptEncoder` pads it). SAM 2 has its own frame
and order (`labelled_points_sam2`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from star_edge.errors import InvalidInputError
from star_edge.geometry import original_to_sam, original_to_sam2, sam_preprocess_shape

LABEL_PADDING = -1
LABEL_POSITIVE = 1
LABEL_BOX_TOP_LEFT = 2
LABEL_BOX_BOTTOM_RIGHT = 3


def check_image(image: object) -> np.ndarray:
    """An (H, W, 3) uint8 RGB numpy array with H, W >= 1, made C-contiguous.

    Raises:
        InvalidInputError: anything else.
    """
    if not isinstance(image, np.ndarray):
        raise InvalidInputError(f"image must be a numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        message = f"image must have shape (H, W, 3) with H, W >= 1, got {image.shape}"
        raise InvalidInputError(message)
    if image.dtype != np.uint8:
        raise InvalidInputError(f"image must be uint8 RGB, got dtype {image.dtype}")
    return np.ascontiguousarray(image)


def _check_array(name: str, values: object, width: int) -> np.ndarray | None:
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


def check_prompts(
    boxes: object, points: object, multimask: object
) -> tuple[np.ndarray | None, np.ndarray | None, int]:
    """Check `decode`'s prompt arguments.

    boxes: None or (K, 4) real (x1, y1, x2, y2); points: None or (K, 2) real (x, y); not both None,
    the same K when both are given; multimask: a bool.

    Returns:
        boxes (K, 4) float64 or None, points (K, 2) float64 or None, and K.

    Raises:
        InvalidInputError: naming the offending argument.
    """
    if not isinstance(multimask, bool):
        raise InvalidInputError(f"multimask must be a bool, got {type(multimask).__name__}")
    boxes = _check_array("boxes", boxes, 4)
    points = _check_array("points", points, 2)
    if boxes is None and points is None:
        raise InvalidInputError("decode needs boxes, points or both; got neither")
    if boxes is not None and points is not None and len(boxes) != len(points):
        sizes = f"{len(boxes)} and {len(points)}"
        raise InvalidInputError(f"boxes and points must have the same K, got {sizes}")
    return boxes, points, len(boxes) if boxes is not None else len(points)


def resize_longest_side(image: np.ndarray, image_size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (h', w', 3) uint8 with its longest side `image_size` (PIL bilinear, as
    segment_anything's ResizeLongestSide applies torchvision's resize to a PIL image)."""
    new_h, new_w = sam_preprocess_shape(image.shape[0], image.shape[1], image_size)
    resized = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR)
    return np.asarray(resized)


def encoder_input(
    image: np.ndarray,
    image_size: int,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
) -> tuple[np.ndarray, tuple[int, int]]:
    """The image encoder's input, computed as `Sam.preprocess` does.

    image: (H, W, 3) uint8 RGB (checked by `check_image`).

    Returns:
        pixels: (1, 3, image_size, image_size) float32: resized longest side first, then
            (x - mean) / std per channel, zero-padded bottom and right.
        input_size: (h', w') of the resized image before padding.
    """
    resized = resize_longest_side(image, image_size)
    mean = np.asarray(pixel_mean, dtype=np.float32)
    std = np.asarray(pixel_std, dtype=np.float32)
    normalised = (resized.astype(np.float32) - mean) / std
    pixels = np.zeros((1, 3, image_size, image_size), dtype=np.float32)
    height, width = resized.shape[:2]
    pixels[0, :, :height, :width] = normalised.transpose(2, 0, 1)
    return pixels, (height, width)


def labelled_points(
    boxes: np.ndarray | None,
    points: np.ndarray | None,
    original_size: tuple[int, int],
    image_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """K prompts (each a box and/or one positive point, original pixels) as labelled points.

    boxes: (K, 4) float64 (x1, y1, x2, y2) or None; points: (K, 2) float64 or None (not both);
    original_size: (H, W) of the image; image_size: the SAM input side.

    Returns:
        coords: (K, N, 2) float32 in the SAM frame (what SamPredictor passes to the prompt
            encoder, before its +0.5 pixel-centre shift); N = 3 for box + point (point, top-left,
            bottom-right, in the order PromptEncoder concatenates them), 2 for a box alone
            (its corners), 2 for a point alone (the point and a padding point at (0, 0)).
        labels: (K, N) int64 (see the module docstring).

    Raises:
        InvalidInputError: a coordinate beyond float32's range in SAM's frame.
    """
    height, width = original_size
    count = len(boxes) if boxes is not None else len(points)
    columns: list[np.ndarray] = []
    labels: list[int] = []
    if points is not None:
        columns.append(original_to_sam(points, (width, height), image_size)[:, None, :])
        labels.append(LABEL_POSITIVE)
        if boxes is None:
            columns.append(np.zeros((count, 1, 2)))
            labels.append(LABEL_PADDING)
    if boxes is not None:
        columns.append(original_to_sam(boxes, (width, height), image_size).reshape(count, 2, 2))
        labels += [LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT]
    return _float32_coords(columns), np.broadcast_to(np.array(labels, dtype=np.int64), (count, len(labels))).copy()


def labelled_points_sam2(
    boxes: np.ndarray | None,
    points: np.ndarray | None,
    original_size: tuple[int, int],
    image_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """K prompts (each a box and/or one positive point, original pixels) as SAM 2's labelled
    points, in the order SAM2ImagePredictor builds them: box corners first, then the point, then
    one padding point (its prompt encoder always pads: the predictor passes boxes as points).

    boxes: (K, 4) float64 (x1, y1, x2, y2) or None; points: (K, 2) float64 or None (not both);
    original_size: (H, W) of the image; image_size: the SAM 2 input side S.

    Returns:
        coords: (K, N, 2) float32 in the S x S frame (`geometry.original_to_sam2`); N = 4 for
            box + point, 3 for a box alone, 2 for a point alone; the padding point is (0, 0).
        labels: (K, N) int64 (see the module docstring).

    Raises:
        InvalidInputError: a coordinate beyond float32's range in SAM's frame.
    """
    height, width = original_size
    count = len(boxes) if boxes is not None else len(points)
    columns: list[np.ndarray] = []
    labels: list[int] = []
    if boxes is not None:
        columns.append(original_to_sam2(boxes, (width, height), image_size).reshape(count, 2, 2))
        labels += [LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT]
    if points is not None:
        columns.append(original_to_sam2(points, (width, height), image_size)[:, None, :])
        labels.append(LABEL_POSITIVE)
    columns.append(np.zeros((count, 1, 2)))
    labels.append(LABEL_PADDING)
    return _float32_coords(columns), np.broadcast_to(np.array(labels, dtype=np.int64), (count, len(labels))).copy()


def _float32_coords(columns: list[np.ndarray]) -> np.ndarray:
    """The prompt columns (K, n_i, 2) float64 joined into (K, N, 2) float32; a coordinate that
    float32 cannot hold (finite in float64, |x| > 3.4e38) is refused, not turned into infinity."""
    coords = np.concatenate(columns, axis=1)
    if np.abs(coords).max(initial=0.0) > np.finfo(np.float32).max:
        raise InvalidInputError("prompt coordinates must fit float32 in SAM's frame (|x| <= 3.4e38), "
                                f"got {np.abs(coords).max():.3g}")
    return coords.astype(np.float32)
