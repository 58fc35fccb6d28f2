"""Pooling image tokens over objects: each object's share of every token of the merged grid.

A reasoner's merged image tokens cover a (rows, cols) grid of cells of the image; an object covers
some of its pixels in each cell. `coverage_weights` gives, per object, the fraction of its visible
pixels in each cell, so `weights @ tokens` is the object's token mean weighted by coverage.
"""

from __future__ import annotations

import numpy as np


def coverage_weights(masks: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(n, rows * cols) float32, each row summing to 1: the share of an object's visible pixels
    (masks (n, H, W) bool, none empty) in each cell of a (rows, cols) grid laid over the image,
    cells in row-major order."""
    rows, cols = grid
    height, width = masks.shape[1:]
    cell_of_row = np.arange(height) * rows // height
    cell_of_col = np.arange(width) * cols // width
    weights = np.zeros((len(masks), rows * cols), dtype=np.float64)
    for index, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        if len(ys) == 0:
            raise ValueError(f"object {index} has an empty mask")
        np.add.at(weights[index], cell_of_row[ys] * cols + cell_of_col[xs], 1.0)
        weights[index] /= len(ys)
    return weights.astype(np.float32)


def object_features(tokens: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(n, hidden) float32: per object, the mean of the tokens (rows, cols, hidden) weighted by the
    pixels of its (n, H, W) bool mask that each token's cell covers (`coverage_weights`)."""
    rows, cols, hidden = tokens.shape
    weights = coverage_weights(masks, (rows, cols))
    return (weights.astype(np.float64) @ tokens.reshape(rows * cols, hidden)).astype(np.float32).reshape(-1, hidden)
