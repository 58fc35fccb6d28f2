"""Plain numpy (and itertools) versions of the kernels: slow, obviously right, for tests and
benchmarks. Nothing at runtime imports this module."""

from __future__ import annotations

from itertools import permutations

import numpy as np


def pairwise_iou_reference(masks_a: np.ndarray, masks_b: np.ndarray | None = None) -> np.ndarray:
    """IoU (M, N) float64 of masks_a (M, H, W) bool with masks_b (N, H, W) bool, pair by pair with
    logical_and / logical_or; two empty masks have IoU 0.0. With masks_b None: masks_a with itself,
    each unordered pair computed once."""
    symmetric = masks_b is None
    other = masks_a if symmetric else masks_b
    iou = np.zeros((len(masks_a), len(other)), dtype=np.float64)
    for i, mask_a in enumerate(masks_a):
        for j in range(i if symmetric else 0, len(other)):
            union = np.count_nonzero(np.logical_or(mask_a, other[j]))
            if union:
                iou[i, j] = np.count_nonzero(np.logical_and(mask_a, other[j])) / union
    if symmetric:
        iou = np.triu(iou) + np.triu(iou, 1).T
    return iou


def column_major_runs(mask: np.ndarray) -> np.ndarray:
    """Run lengths (n,) int64 of mask (H, W) bool read in column-major order, alternating 0-runs
    and 1-runs and starting with a (possibly empty) 0-run."""
    pixels = mask.T.reshape(-1).astype(np.int8)
    changes = np.flatnonzero(np.diff(pixels, prepend=0))
    boundaries = np.concatenate([[0], changes, [pixels.size]])
    return np.diff(boundaries).astype(np.int64)


def counts_to_string(runs: np.ndarray) -> str:
    """The COCO compressed string of run lengths (n,) int64."""
    chars = []
    lengths = runs.tolist()
    for i, run in enumerate(lengths):
        value = run - lengths[i - 2] if i > 2 else run
        while True:
            group = value & 0x1F
            value >>= 5
            last = value == (-1 if group & 0x10 else 0)
            chars.append(chr(48 + group + (0 if last else 0x20)))
            if last:
                break
    return "".join(chars)


def string_to_counts(counts: str) -> np.ndarray:
    """Run lengths (n,) int64 of a COCO compressed string."""
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value = 0
        shift = 0
        while True:
            group = ord(counts[position]) - 48
            position += 1
            value |= (group & 0x1F) << shift
            shift += 5
            if not group & 0x20:
                if group & 0x10:
                    value -= 1 << shift
                break
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return np.array(runs, dtype=np.int64)


def rle_encode_reference(masks: np.ndarray) -> list[dict]:
    """COCO RLEs {"size": [H, W], "counts": str} of masks (M, H, W) bool."""
    return [{"size": list(mask.shape), "counts": counts_to_string(column_major_runs(mask))} for mask in masks]


def rle_decode_reference(rles: list[dict]) -> np.ndarray:
    """Masks (M, H, W) bool of COCO RLEs with str counts, all of one size."""
    masks = []
    for rle in rles:
        h, w = rle["size"]
        runs = string_to_counts(rle["counts"])
        values = np.arange(len(runs)) % 2 == 1
        masks.append(np.repeat(values, runs).reshape(w, h).T)
    return np.array(masks, dtype=np.bool_)


def linear_sum_assignment_reference(cost: np.ndarray, maximize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Optimal (rows, cols) of cost (n, m) by trying every assignment: for n, m <= 7 or so."""
    transposed = cost.shape[0] > cost.shape[1]
    oriented = cost.T if transposed else cost
    n_rows, n_cols = oriented.shape
    rows = np.arange(n_rows)
    assignments = list(permutations(range(n_cols), n_rows))
    choices = np.array(assignments, dtype=np.int64).reshape(len(assignments), n_rows)
    totals = oriented[rows, choices].sum(axis=1)
    cols = choices[np.argmax(totals) if maximize else np.argmin(totals)]
    if not transposed:
        return rows, cols
    order = np.argsort(cols)
    return cols[order], rows[order]
