"""Bit-packed masks and their pairwise IoU.

A mask of H*W pixels becomes ceil(H*W / 64) uint64 words, so the intersection of two masks is one
AND and one popcount per 64 pixels instead of 64 boolean operations.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from star_edge.errors import InvalidInputError

WORD_BITS = 64
_PARALLEL_CALLS = threading.Lock()
"""One parallel kernel at a time per process: Numba's workqueue threading layer (its fallback
without OpenMP or TBB) aborts the process when two threads run parallel kernels at once, and each
call uses every core anyway."""


@dataclass(frozen=True)
class PackedMasks:
    """M masks of one (H, W) shape, bit-packed.

    Attributes:
        bits: (M, n_words) uint64, n_words = ceil(H * W / 64). Pixel p of the row-major flattened
            mask is bit p % 64 of word p // 64 (on little-endian hosts); padding bits are zero.
        areas: (M,) int64, the number of True pixels of each mask.
        shape: (H, W) of the masks.
    """

    bits: np.ndarray
    areas: np.ndarray
    shape: tuple[int, int]

    def __len__(self) -> int:
        return self.bits.shape[0]


@intrinsic
def _popcount(typingctx, word):
    """The number of set bits of a uint64, as LLVM's ctpop (one POPCNT instruction where the CPU
    has it)."""
    if word != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        fn_type = ir.FunctionType(ir.IntType(64), [ir.IntType(64)])
        fn = cgutils.get_or_insert_function(builder.module, fn_type, "llvm.ctpop.i64")
        return builder.call(fn, args)

    return types.uint64(types.uint64), codegen


@njit(cache=True)
def _popcount_rows(bits: np.ndarray) -> np.ndarray:
    """bits (M, n_words) uint64 -> (M,) int64 set bits per row."""
    counts = np.zeros(bits.shape[0], dtype=np.int64)
    for i in range(bits.shape[0]):
        total = 0
        for w in range(bits.shape[1]):
            total += _popcount(bits[i, w])
        counts[i] = total
    return counts


@njit(cache=True, inline="always")
def _intersection(row_a: np.ndarray, row_b: np.ndarray) -> int:
    """Shared set bits of two (n_words,) uint64 rows."""
    total = 0
    for w in range(row_a.shape[0]):
        total += _popcount(row_a[w] & row_b[w])
    return total


@njit(cache=True, inline="always")
def _iou(intersection: int, area_a: int, area_b: int) -> float:
    union = area_a + area_b - intersection
    if union == 0:
        return 0.0
    return intersection / union


@njit(cache=True, inline="always")
def _fill_upper_row(bits: np.ndarray, areas: np.ndarray, i: int, out: np.ndarray) -> None:
    """Writes out[i, j] and out[j, i] for every j >= i."""
    out[i, i] = 1.0 if areas[i] > 0 else 0.0
    for j in range(i + 1, bits.shape[0]):
        value = _iou(_intersection(bits[i], bits[j]), areas[i], areas[j])
        out[i, j] = value
        out[j, i] = value


@njit(cache=True, parallel=True)
def _iou_symmetric(bits: np.ndarray, areas: np.ndarray) -> np.ndarray:
    """bits (M, n_words) uint64, areas (M,) int64 -> (M, M) float64, each pair computed once.

    Task k takes the rows k and M-1-k, whose upper-triangle lengths add up to M + 1, so the parallel
    tasks are equally long.
    """
    m = bits.shape[0]
    out = np.empty((m, m), dtype=np.float64)
    for k in prange((m + 1) // 2):
        _fill_upper_row(bits, areas, k, out)
        if m - 1 - k != k:
            _fill_upper_row(bits, areas, m - 1 - k, out)
    return out


@njit(cache=True, parallel=True)
def _iou_cross(bits_a: np.ndarray, areas_a: np.ndarray, bits_b: np.ndarray, areas_b: np.ndarray) -> np.ndarray:
    """(M, n_words) and (N, n_words) uint64 bits with their int64 areas -> (M, N) float64."""
    out = np.empty((bits_a.shape[0], bits_b.shape[0]), dtype=np.float64)
    for i in prange(bits_a.shape[0]):
        for j in range(bits_b.shape[0]):
            out[i, j] = _iou(_intersection(bits_a[i], bits_b[j]), areas_a[i], areas_b[j])
    return out


def _check_masks(masks: np.ndarray) -> np.ndarray:
    """Returns masks as an (M, H, W) bool array or raises InvalidInputError."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise InvalidInputError(f"masks must be (M, H, W), got an array of shape {masks.shape}")
    if masks.dtype != np.bool_:
        raise InvalidInputError(f"masks must have dtype bool, got {masks.dtype}")
    return masks


def pack_masks(masks: np.ndarray) -> PackedMasks:
    """Bit-packs masks (M, H, W) bool into a PackedMasks (bits (M, ceil(H*W/64)) uint64, areas (M,)
    int64)."""
    masks = _check_masks(masks)
    m, h, w = masks.shape
    n_pixels = h * w
    n_bytes = -(-n_pixels // WORD_BITS) * (WORD_BITS // 8)
    packed = np.packbits(masks.reshape(m, n_pixels), axis=1, bitorder="little")
    if packed.shape[1] != n_bytes:
        padded = np.zeros((m, n_bytes), dtype=np.uint8)
        padded[:, : packed.shape[1]] = packed
        packed = padded
    bits = packed.view(np.uint64)
    return PackedMasks(bits=bits, areas=_popcount_rows(bits), shape=(h, w))


def unpack_masks(packed: PackedMasks) -> np.ndarray:
    """The masks (M, H, W) bool that pack_masks packed."""
    h, w = packed.shape
    m = len(packed)
    pixels = np.unpackbits(packed.bits.view(np.uint8), axis=1, count=h * w, bitorder="little")
    return pixels.view(np.bool_).reshape(m, h, w)


def _check_packed(packed: object, name: str) -> PackedMasks:
    """Returns packed if it is a well-formed PackedMasks, else raises InvalidInputError."""
    if not isinstance(packed, PackedMasks):
        raise InvalidInputError(f"{name} must be PackedMasks (see pack_masks), got {type(packed).__name__}")
    bits, areas = packed.bits, packed.areas
    if bits.ndim != 2 or bits.dtype != np.uint64 or areas.shape != bits.shape[:1] or areas.dtype != np.int64:
        raise InvalidInputError(
            f"{name} must hold bits (M, n_words) uint64 and areas (M,) int64, got bits {bits.shape} {bits.dtype}"
            f" and areas {areas.shape} {areas.dtype}"
        )
    return packed


def pairwise_iou(a: PackedMasks, b: PackedMasks | None = None) -> np.ndarray:
    """IoU of every mask of a with every mask of b, as (M, N) float64.

    With b None: the symmetric (M, M) matrix of a with itself, each unordered pair computed once;
    the diagonal is 1.0 for non-empty masks. The IoU of two empty masks is 0.0. Safe to call from
    several threads (the parallel kernels run one at a time).
    """
    a = _check_packed(a, "a")
    if b is None:
        with _PARALLEL_CALLS:
            return _iou_symmetric(a.bits, a.areas)
    b = _check_packed(b, "b")
    if a.shape != b.shape or a.bits.shape[1] != b.bits.shape[1]:
        raise InvalidInputError(f"mask shapes differ: {a.shape} vs {b.shape}")
    with _PARALLEL_CALLS:
        return _iou_cross(a.bits, a.areas, b.bits, b.areas)
