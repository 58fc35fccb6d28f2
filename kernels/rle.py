"""COCO run-length encoding, byte-identical to pycocotools.mask.encode.

A mask is read in column-major (Fortran) order as alternating runs of 0s and 1s, starting with 0s
(so the first run may be empty). Each run length, after run i > 2 has run i-2 subtracted, is
written as a little-endian sequence of 5-bit groups, one character (48 + group) each, bit 0x20
meaning "more groups follow" and bit 0x10 of the last group carrying the sign.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numba import njit

from star_edge.errors import InvalidInputError

MAX_CHARS_PER_COUNT = 13
"""A signed 64-bit count needs at most ceil(65 / 5) characters."""

_PARSE_OK = 0
_PARSE_ERRORS = {
    1: "a character outside '0'..'o'",
    2: "a truncated last count",
    3: "a count of more than 63 bits",
    4: "a negative run length",
    5: "run lengths that do not add up to H*W",
}

RLE = dict[str, object]
"""{"size": [H, W], "counts": str}; "counts" may also be bytes where an RLE is read."""


@njit(cache=True)
def _count_column_transitions(mask: np.ndarray, counts: np.ndarray) -> None:
    """mask (H, W) uint8 0/1 -> counts (W,) int64: per column x, the pixels (y, x) whose value
    differs from the pixel before them in column-major order ((y - 1, x); (H - 1, x - 1) for y = 0;
    0 before (0, 0)). Rows are read in memory order, so no transposed copy is made."""
    h, w = mask.shape
    if h == 0:
        return
    previous = 0
    for x in range(w):
        counts[x] += mask[0, x] != previous
        previous = mask[h - 1, x]
    for y in range(1, h):
        for x in range(w):
            counts[x] += mask[y, x] != mask[y - 1, x]


@njit(cache=True)
def _write_transition_positions(mask: np.ndarray, slots: np.ndarray, positions: np.ndarray) -> None:
    """Writes the column-major position x * H + y of every transition of mask (H, W) uint8 into
    positions, at its column's next slot (slots (W,) int64, advanced as they fill). Slots of column
    x follow those of column x - 1 and rows are scanned in order, so the positions come out sorted."""
    h, w = mask.shape
    if h == 0:
        return
    previous = 0
    for x in range(w):
        if mask[0, x] != previous:
            positions[slots[x]] = x * h
            slots[x] += 1
        previous = mask[h - 1, x]
    for y in range(1, h):
        for x in range(w):
            if mask[y, x] != mask[y - 1, x]:
                positions[slots[x]] = x * h + y
                slots[x] += 1


@njit(cache=True, inline="always")
def _positions_to_lengths(values: np.ndarray, n_pixels: int) -> None:
    """values (n,) int64: n - 1 sorted transition positions then a free slot -> the n run lengths."""
    start = 0
    for i in range(values.shape[0] - 1):
        position = values[i]
        values[i] = position - start
        start = position
    values[values.shape[0] - 1] = n_pixels - start


@njit(cache=True)
def _column_transitions(masks: np.ndarray) -> np.ndarray:
    """masks (M, H, W) uint8 0/1 -> (M, W) int64 transitions per column (see
    _count_column_transitions)."""
    counts = np.zeros((masks.shape[0], masks.shape[2]), dtype=np.int64)
    for k in range(masks.shape[0]):
        _count_column_transitions(masks[k], counts[k])
    return counts


@njit(cache=True)
def _column_major_runs(masks: np.ndarray, column_transitions: np.ndarray, run_offsets: np.ndarray) -> np.ndarray:
    """masks (M, H, W) uint8 0/1, their (M, W) int64 column transitions and run_offsets (M + 1,)
    int64 -> flat (run_offsets[-1],) int64 column-major run lengths, mask k's from run_offsets[k]."""
    m, h, w = masks.shape
    runs = np.empty(run_offsets[m], dtype=np.int64)
    for k in range(m):
        slots = run_offsets[k] + np.cumsum(column_transitions[k]) - column_transitions[k]
        _write_transition_positions(masks[k], slots, runs)
        _positions_to_lengths(runs[run_offsets[k] : run_offsets[k + 1]], h * w)
    return runs


@njit(cache=True, inline="always")
def _write_count(value: int, chars: np.ndarray, position: int) -> int:
    """Writes one signed count as characters at chars[position:]; returns the next position."""
    more = True
    while more:
        group = value & 0x1F
        value >>= 5
        more = value != -1 if group & 0x10 else value != 0
        if more:
            group |= 0x20
        chars[position] = group + 48
        position += 1
    return position


@njit(cache=True)
def _encode_runs(runs: np.ndarray, run_offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat run lengths (int64) of M masks -> (chars uint8, with mask k's string at
    MAX_CHARS_PER_COUNT * run_offsets[k], lengths (M,) int64)."""
    m = run_offsets.shape[0] - 1
    chars = np.empty(MAX_CHARS_PER_COUNT * run_offsets[m], dtype=np.uint8)
    lengths = np.empty(m, dtype=np.int64)
    for k in range(m):
        first = run_offsets[k]
        start = MAX_CHARS_PER_COUNT * first
        position = start
        for i in range(run_offsets[k + 1] - first):
            value = runs[first + i]
            if i > 2:
                value -= runs[first + i - 2]
            position = _write_count(value, chars, position)
        lengths[k] = position - start
    return chars, lengths


@njit(cache=True)
def _read_count(chars: np.ndarray, position: int, end: int) -> tuple[int, int, int]:
    """Reads one signed count from chars[position:end] -> (value, next position, status: 0 or an
    error code)."""
    value = 0
    shift = 0
    more = True
    while more:
        if position >= end:
            return 0, position, 2
        if shift >= 64:
            return 0, position, 3
        group = np.int64(chars[position]) - 48
        if group < 0 or group > 63:
            return 0, position, 1
        value |= (group & 0x1F) << shift
        more = (group & 0x20) != 0
        position += 1
        if shift == 60 and ((group >> 3) & 1) != ((group >> 4) & 1):
            return 0, position, 3  # bit 63 and the sign bit above it differ: the count needs 65 bits
        shift += 5
        if not more and (group & 0x10) and shift < 64:
            value |= np.int64(-1) << shift
    return value, position, _PARSE_OK


@njit(cache=True)
def _parse_counts(
    chars: np.ndarray, offsets: np.ndarray, n_pixels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Strings of M RLEs (chars uint8, string k at chars[offsets[k]:offsets[k + 1]]) and their pixel
    counts H*W (M,) int64 -> (runs int64 with mask k's runs from offsets[k], n_runs (M,) int64,
    status (M,) int64: 0 or an error code)."""
    m = offsets.shape[0] - 1
    runs = np.empty(chars.shape[0], dtype=np.int64)
    n_runs = np.zeros(m, dtype=np.int64)
    status = np.zeros(m, dtype=np.int64)
    for k in range(m):
        start = offsets[k]
        position = start
        total = 0
        n = 0
        while position < offsets[k + 1] and status[k] == _PARSE_OK:
            value, position, status[k] = _read_count(chars, position, offsets[k + 1])
            if n > 2:
                value += runs[start + n - 2]
            if value < 0 and status[k] == _PARSE_OK:
                status[k] = 4
            if value > n_pixels[k] - total and status[k] == _PARSE_OK:
                status[k] = 5
            runs[start + n] = value
            total += value
            n += 1
        if status[k] == _PARSE_OK and total != n_pixels[k]:
            status[k] = 5
        n_runs[k] = n
    return runs, n_runs, status


@njit(cache=True)
def _paint_mask(runs: np.ndarray, mask: np.ndarray) -> None:
    """Sets the 1-runs (every second run) of column-major run lengths runs (n,) int64 in mask (H, W)
    bool, which starts all False."""
    h = mask.shape[0]
    pixel = 0
    for i in range(runs.shape[0]):
        length = runs[i]
        if i % 2 == 1 and length > 0:
            x = pixel // h
            y = pixel - x * h
            left = length
            while left > 0:
                take = min(left, h - y)
                mask[y : y + take, x] = True
                left -= take
                x += 1
                y = 0
        pixel += length


@njit(cache=True)
def _paint_masks(runs: np.ndarray, offsets: np.ndarray, n_runs: np.ndarray, h: int, w: int) -> np.ndarray:
    """Run lengths of M masks (as _parse_counts returns them) -> (M, H, W) bool."""
    m = n_runs.shape[0]
    masks = np.zeros((m, h, w), dtype=np.bool_)
    for k in range(m):
        _paint_mask(runs[offsets[k] : offsets[k] + n_runs[k]], masks[k])
    return masks


@njit(cache=True)
def _sum_odd_runs(runs: np.ndarray, offsets: np.ndarray, n_runs: np.ndarray) -> np.ndarray:
    """Run lengths of M masks -> (M,) int64 sum of the 1-runs (every second run)."""
    m = n_runs.shape[0]
    areas = np.zeros(m, dtype=np.int64)
    for k in range(m):
        for i in range(1, n_runs[k], 2):
            areas[k] += runs[offsets[k] + i]
    return areas


def _check_masks(masks: np.ndarray) -> np.ndarray:
    """Returns masks as (M, H, W) bool ((H, W) becomes (1, H, W)) or raises InvalidInputError."""
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3:
        raise InvalidInputError(f"masks must be (M, H, W) or (H, W), got an array of shape {masks.shape}")
    if masks.dtype != np.bool_:
        raise InvalidInputError(f"masks must have dtype bool, got {masks.dtype}")
    return np.ascontiguousarray(masks)


def rle_encode(masks: np.ndarray) -> list[RLE]:
    """COCO RLEs of masks (M, H, W) or (H, W) bool: one {"size": [H, W], "counts": str} per mask,
    counts identical to pycocotools.mask.encode (which returns them as bytes)."""
    masks = _check_masks(masks)
    m, h, w = masks.shape
    run_offsets = np.zeros(m + 1, dtype=np.int64)
    pixels = masks.view(np.uint8)
    if pixels.max(initial=0) > 1:
        pixels = np.minimum(pixels, 1)  # bool arrays made by .view(bool) may hold bytes other than 0/1
    column_transitions = _column_transitions(pixels)
    np.cumsum(column_transitions.sum(axis=1) + 1, out=run_offsets[1:])
    runs = _column_major_runs(pixels, column_transitions, run_offsets)
    chars, lengths = _encode_runs(runs, run_offsets)
    starts = MAX_CHARS_PER_COUNT * run_offsets[:-1]
    return [
        {"size": [h, w], "counts": chars[start : start + length].tobytes().decode("ascii")}
        for start, length in zip(starts.tolist(), lengths.tolist())
    ]


def _as_rle_list(rles: RLE | Sequence[RLE]) -> list[RLE]:
    if isinstance(rles, Mapping):
        return [rles]
    if isinstance(rles, (str, bytes)) or not isinstance(rles, Sequence):
        raise InvalidInputError(f"expected an RLE dict or a sequence of them, got {type(rles).__name__}")
    return list(rles)


def _rle_size(rle: RLE, index: int) -> tuple[int, int]:
    if not isinstance(rle, Mapping) or "size" not in rle or "counts" not in rle:
        raise InvalidInputError(f"rles[{index}] must be a dict with 'size' and 'counts'")
    size = np.asarray(rle["size"])
    if size.shape != (2,) or size.dtype.kind not in "iu" or (size < 0).any():
        raise InvalidInputError(f"rles[{index}]['size'] must be [H, W] of non-negative ints, got {rle['size']!r}")
    h, w = int(size[0]), int(size[1])
    if h * w > np.iinfo(np.int64).max:
        raise InvalidInputError(f"rles[{index}]['size'] {[h, w]} has more than 2**63 - 1 pixels")
    return h, w


def _rle_bytes(rle: RLE, index: int) -> bytes:
    counts = rle["counts"]
    if isinstance(counts, str):
        if not counts.isascii():
            raise InvalidInputError(f"rles[{index}]['counts'] has non-ASCII characters")
        return counts.encode("ascii")
    if isinstance(counts, bytes):
        return counts
    raise InvalidInputError(f"rles[{index}]['counts'] must be str or bytes, got {type(counts).__name__}")


def _parse_rles(rle_list: list[RLE], sizes: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RLEs and their (H, W) -> (runs int64, offsets (M + 1,) int64 where mask k's runs start,
    n_runs (M,) int64)."""
    strings = [_rle_bytes(rle, i) for i, rle in enumerate(rle_list)]
    offsets = np.zeros(len(strings) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in strings], out=offsets[1:])
    chars = np.frombuffer(b"".join(strings), dtype=np.uint8)
    n_pixels = np.array([h * w for h, w in sizes], dtype=np.int64)
    runs, n_runs, status = _parse_counts(chars, offsets, n_pixels)
    bad = np.flatnonzero(status)
    if bad.size:
        index = int(bad[0])
        raise InvalidInputError(f"rles[{index}]['counts'] is corrupt: {_PARSE_ERRORS[int(status[index])]}")
    return runs, offsets, n_runs


def rle_decode(rles: RLE | Sequence[RLE]) -> np.ndarray:
    """Masks (M, H, W) bool of COCO RLEs (a dict or a sequence of dicts of one size; counts str or
    bytes). An empty sequence gives a (0, 0, 0) array."""
    rle_list = _as_rle_list(rles)
    sizes = [_rle_size(rle, i) for i, rle in enumerate(rle_list)]
    for i, size in enumerate(sizes):
        if size != sizes[0]:
            raise InvalidInputError(f"rles[{i}] has size {list(size)}, rles[0] has {list(sizes[0])}")
    h, w = sizes[0] if sizes else (0, 0)
    runs, offsets, n_runs = _parse_rles(rle_list, sizes)
    return _paint_masks(runs, offsets, n_runs, h, w)


def rle_area(rles: RLE | Sequence[RLE]) -> np.ndarray:
    """True-pixel counts (M,) int64 of COCO RLEs (a dict or a sequence of dicts, sizes may differ),
    read from the runs without painting the masks."""
    rle_list = _as_rle_list(rles)
    sizes = [_rle_size(rle, i) for i, rle in enumerate(rle_list)]
    runs, offsets, n_runs = _parse_rles(rle_list, sizes)
    return _sum_odd_runs(runs, offsets, n_runs)
