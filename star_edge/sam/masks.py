"""From the decoder's low-resolution logits to masks in original pixels, in numpy (no torch).

segment_anything's `Sam.postprocess_masks` upsamples the low-resolution logits (4h x 4w) to the
padded encoder input (S x S) with bilinear interpolation, crops the unpadded (h', w') part, and
resizes that to the original (H, W), again bilinear (align_corners=False, no antialiasing); the
mask is logits > threshold. Each of those steps is linear and separable, so the whole chain is
`Ry @ L @ Rx.T` with one (H, 4h) and one (W, 4w) matrix: the exact same values (up to float32
rounding), with no S x S intermediate, computed for the chosen mask of each prompt only.
Columns of the low-resolution logits that the crop never reaches are dropped from the matrices.
Each output pixel reads at most a few neighbouring logits, so the products run block by block over
the matrices' nonzero bands (`bands`) instead of as dense products: 8 times fewer operations for a
600 x 400 photo, more for larger ones, the same sums (only products with exact zeros are skipped).
SAM 2 has no padding and no crop: its logits are resized straight to (H, W) (`stretch_matrices`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import numpy as np

_CHUNK_VALUES = 1 << 24
_BAND_OUTPUTS = 64


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float64 matrix of 1-D bilinear resizing as torch's F.interpolate does
    it (mode="bilinear", align_corners=False, antialias=False, output size given): output i
    samples the input at max(0, (i + 0.5) * in/out - 0.5) between its two neighbours."""
    scale = in_size / out_size
    source = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    lower = np.minimum(source.astype(np.int64), in_size - 1)
    upper = np.minimum(lower + 1, in_size - 1)
    weight_upper = source - lower
    matrix = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, lower), 1.0 - weight_upper)
    np.add.at(matrix, (rows, upper), weight_upper)
    return matrix


@lru_cache(maxsize=64)
def _axis_matrix(low_res: int, image_size: int, input_side: int, original_side: int) -> np.ndarray:
    """(original_side, used) float32: low-res -> padded input -> crop -> original, along one axis;
    `used` = the low-resolution positions that contribute (trailing unused ones dropped)."""
    to_input = bilinear_matrix(low_res, image_size)[:input_side]
    combined = bilinear_matrix(input_side, original_side) @ to_input
    used = int(np.flatnonzero(np.any(combined != 0.0, axis=0)).max()) + 1
    combined = combined[:, :used].astype(np.float32)
    combined.flags.writeable = False
    return combined


def upsampling_matrices(
    low_res_size: tuple[int, int],
    image_size: int,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """The two matrices of `Sam.postprocess_masks` (read-only, cached per geometry).

    low_res_size: (4h, 4w) of the decoder's logits; image_size: S; input_size: (h', w') of the
    resized image; original_size: (H, W).

    Returns:
        rows: (H, r) float32 and cols: (W, c) float32 with r <= 4h, c <= 4w, such that
        rows @ logits[:r, :c] @ cols.T equals postprocess_masks(logits) in exact arithmetic.
    """
    rows = _axis_matrix(low_res_size[0], image_size, input_size[0], original_size[0])
    cols = _axis_matrix(low_res_size[1], image_size, input_size[1], original_size[1])
    return rows, cols


@lru_cache(maxsize=64)
def _stretch_matrix(low_res: int, original_side: int) -> np.ndarray:
    """(original_side, low_res) float32, read-only: one bilinear resize along one axis."""
    matrix = bilinear_matrix(low_res, original_side).astype(np.float32)
    matrix.flags.writeable = False
    return matrix


def stretch_matrices(
    low_res_size: tuple[int, int], original_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """SAM 2's postprocessing as two matrices (read-only, cached per geometry): its logits cover
    the whole stretched image, so they are resized straight to the original size (bilinear,
    align_corners=False, as SAM2Transforms.postprocess_masks).

    low_res_size: (r, c) of the decoder's logits; original_size: (H, W).

    Returns:
        rows: (H, r) float32 and cols: (W, c) float32 with rows @ logits @ cols.T the resized
        logits in exact arithmetic.
    """
    rows = _stretch_matrix(low_res_size[0], original_size[0])
    cols = _stretch_matrix(low_res_size[1], original_size[1])
    return rows, cols


@lru_cache(maxsize=1)
def _blas_controller() -> Any:
    """threadpoolctl's view of the loaded BLAS libraries (scanning them takes ~0.5 ms)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


class _OneBlasThread:
    """numpy's BLAS on one thread while any caller is inside `hold()`, shared by threads.

    threadpoolctl's limit is process-wide and restores the value it found on entry, so two threads
    overlapping in plain `limit()` blocks (A in, B in, A out, B out) would leave BLAS on one thread
    for good. Here the first caller in sets the limit and the last one out restores it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._limiter: Any = None

    @contextmanager
    def hold(self) -> Iterator[None]:
        with self._lock:
            if self._holders == 0:
                self._limiter = _blas_controller().limit(limits=1, user_api="blas")
            self._holders += 1
        try:
            yield
        finally:
            with self._lock:
                self._holders -= 1
                if self._holders == 0:
                    self._limiter.restore_original_limits()
                    self._limiter = None


_ONE_BLAS_THREAD = _OneBlasThread()


def bands(matrix: np.ndarray, outputs: int = _BAND_OUTPUTS) -> tuple[tuple[slice, slice], ...]:
    """The nonzero band of a resampling matrix, block by block.

    matrix: (O, I). Returns ((output rows, input columns), ...) for consecutive blocks of `outputs`
    rows: within a block's rows, every entry outside its input columns is 0 (a block without any
    nonzero entry gets an empty column slice).
    """
    blocks = []
    for start in range(0, matrix.shape[0], outputs):
        stop = min(start + outputs, matrix.shape[0])
        used = np.flatnonzero(np.any(matrix[start:stop] != 0.0, axis=0))
        first, last = (int(used[0]), int(used[-1]) + 1) if used.size else (0, 0)
        blocks.append((slice(start, stop), slice(first, last)))
    return tuple(blocks)


def upsample_masks(
    logits: np.ndarray, rows: np.ndarray, cols: np.ndarray, threshold: float
) -> np.ndarray:
    """Low-resolution logits -> masks (K, H, W) bool in original pixels.

    logits: (K, r', c') float32 with r' >= r, c' >= c; rows (H, r), cols (W, c) from
    `upsampling_matrices`. The logits are `rows @ logits @ cols.T`, computed band by band
    (`bands`), in groups of prompts whose float32 full-resolution logits stay under
    `_CHUNK_VALUES` values (64 MiB).

    The products run on one BLAS thread: numpy's BLAS spins its worker threads while it waits,
    and on a loaded machine (another process on the cores) 8 masks of 640 x 480 took 360 ms of
    wall time with two threads against 22 ms with one.
    """
    count = len(logits)
    height, width = rows.shape[0], cols.shape[0]
    cropped = logits[:, : rows.shape[1], : cols.shape[1]]
    masks = np.empty((count, height, width), dtype=bool)
    step = max(1, _CHUNK_VALUES // (height * width))
    row_bands, col_bands = bands(rows), bands(cols)
    middle = np.empty((min(step, count), height, cols.shape[1]), dtype=np.float32)
    full = np.empty((min(step, count), height, width), dtype=np.float32)
    with _ONE_BLAS_THREAD.hold():
        for start in range(0, count, step):
            chunk = np.asarray(cropped[start : start + step], dtype=np.float32)
            size = len(chunk)
            for outputs, inputs in row_bands:
                np.matmul(rows[outputs, inputs], chunk[:, inputs], out=middle[:size, outputs])
            for outputs, inputs in col_bands:
                np.matmul(middle[:size, :, inputs], cols[outputs, inputs].T, out=full[:size, :, outputs])
            np.greater(full[:size], threshold, out=masks[start : start + size])
    return masks


def best_outputs(iou_predictions: np.ndarray, multimask: bool) -> np.ndarray:
    """Which decoder output each prompt keeps: (K, M) predicted IoU (output 0 the single-mask
    output, 1.. the multimask outputs) -> (K,) int64, the argmax over outputs 1.. when multimask,
    else 0 (what SamPredictor returns, taking its best-scoring mask)."""
    if not multimask:
        return np.zeros(len(iou_predictions), dtype=np.int64)
    return np.argmax(iou_predictions[:, 1:], axis=1).astype(np.int64) + 1
