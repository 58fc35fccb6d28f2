"""Masks to polygons: Numba kernels for connected components and boundary tracing.

`mask_to_polygons` turns a mask into polygons whose vertices are pixel coordinates (the pixel
centre convention of `star_edge.train.data.polygons`): every polygon is the outer boundary of one
8-connected, hole-free piece of the mask, traced through the centres of its boundary pixels, so
filling it (boundary included) gives back exactly that piece. A mask with holes is first cut along
rows into hole-free pieces (the cut opens each hole to the outside); the LISA polygon format has no
holes.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# The 8 neighbour steps (row, column), clockwise on screen (y down), starting East.
_STEPS = np.array([(0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1)],
                  dtype=np.int64)


@njit(cache=True)
def _label(mask: np.ndarray, eight: bool) -> tuple[np.ndarray, int]:
    """Connected components of `mask` (H, W) bool: labels (H, W) int32 (0 = not in the mask,
    1..n in raster order of each component's first pixel) and n."""
    height, width = mask.shape
    labels = np.zeros((height, width), dtype=np.int32)
    stack = np.empty(height * width, dtype=np.int64)
    count = 0
    for start in range(height * width):
        r0, c0 = start // width, start % width
        if not mask[r0, c0] or labels[r0, c0]:
            continue
        count += 1
        labels[r0, c0] = count
        top = 0
        stack[0] = start
        while top >= 0:
            here = stack[top]
            top -= 1
            r, c = here // width, here % width
            for dr in range(-1, 2):
                for dc in range(-1, 2):
                    if (dr == 0 and dc == 0) or (not eight and dr != 0 and dc != 0):
                        continue
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < height and 0 <= cc < width and mask[rr, cc] and not labels[rr, cc]:
                        labels[rr, cc] = count
                        top += 1
                        stack[top] = rr * width + cc
    return labels, count


@njit(cache=True)
def _first_hole_row(mask: np.ndarray) -> int:
    """The top row of the first hole of `mask` (H, W) bool (a 4-connected background region that
    does not reach the border), or -1 when the mask has no hole."""
    height, width = mask.shape
    padded = np.ones((height + 2, width + 2), dtype=np.bool_)
    padded[1:-1, 1:-1] = ~mask
    labels, _ = _label(padded, False)
    outside = labels[0, 0]
    for r in range(height):
        for c in range(width):
            if labels[r + 1, c + 1] != 0 and labels[r + 1, c + 1] != outside:
                return r
    return -1


@njit(cache=True)
def _trace(mask: np.ndarray, start_r: int, start_c: int, steps: np.ndarray) -> np.ndarray:
    """The outer boundary of the 8-connected component of `mask` (H, W) bool (with a background
    border of one pixel) whose first pixel in raster order is (start_r, start_c).

    Moore-neighbour tracing, clockwise on screen, stopped by Jacob's criterion (the first move
    repeats). Returns (k, 2) int64 (row, column) boundary pixels in order; a pixel is repeated when
    the boundary passes it twice (a one-pixel neck).
    """
    out = np.empty((4 * mask.sum() + 8, 2), dtype=np.int64)
    r, c = start_r, start_c
    back = 4  # the west neighbour of the first pixel is background
    second_r, second_c = -1, -1
    count = 0
    while count < out.shape[0]:
        found = -1
        for k in range(1, 9):
            d = (back + k) % 8
            if mask[r + steps[d, 0], c + steps[d, 1]]:
                found = d
                break
        if found < 0:  # a single pixel
            out[0, 0], out[0, 1] = r, c
            return out[:1]
        next_r, next_c = r + steps[found, 0], c + steps[found, 1]
        if count > 0 and r == start_r and c == start_c and next_r == second_r and next_c == second_c:
            break
        out[count, 0], out[count, 1] = r, c
        count += 1
        if count == 1:
            second_r, second_c = next_r, next_c
        prev = (found + 7) % 8  # the background neighbour examined just before `found`
        back_r, back_c = r + steps[prev, 0], c + steps[prev, 1]
        for d in range(8):
            if next_r + steps[d, 0] == back_r and next_c + steps[d, 1] == back_c:
                back = d
                break
        r, c = next_r, next_c
    return out[:count]


def _hole_free_pieces(mask: np.ndarray, row0: int) -> list[tuple[np.ndarray, int]]:
    """Split `mask` (h, W) bool, whose first row is image row `row0`, into row bands without
    holes: [(band mask, first image row), ...]. Cutting at a hole's top row opens that hole."""
    cut = int(_first_hole_row(mask)) if mask.any() else -1
    if cut < 0:
        return [(mask, row0)]
    return _hole_free_pieces(mask[:cut], row0) + _hole_free_pieces(mask[cut:], row0 + cut)


def _drop_collinear(path: np.ndarray) -> np.ndarray:
    """Keep the vertices of a closed (k, 2) path where its direction changes (at least 3 kept)."""
    if len(path) < 3:
        return path
    forward = np.roll(path, -1, axis=0) - path
    backward = path - np.roll(path, 1, axis=0)
    corners = path[np.any(forward != backward, axis=1)]
    return corners if len(corners) >= 3 else path


def mask_to_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """Polygons that reproduce `mask` exactly when filled with their boundary included.

    Args:
        mask: (H, W) bool.

    Returns:
        A list of (k, 2) int64 arrays of (x, y) vertices, pixel coordinates; k >= 3 (a component
        of one or two pixels repeats a vertex). Empty for an empty mask. Edges are horizontal,
        vertical or diagonal, so rasterisers agree on them.
    """
    mask = np.asarray(mask, dtype=bool)
    polygons = []
    for band, row0 in _hole_free_pieces(mask, 0):
        padded = np.zeros((band.shape[0] + 2, band.shape[1] + 2), dtype=bool)
        padded[1:-1, 1:-1] = band
        labels, count = _label(padded, True)
        if count == 0:
            continue
        flat = labels.ravel()
        firsts = np.unique(flat, return_index=True)[1][1:]  # first pixel of labels 1..count
        for first in firsts:
            r, c = divmod(int(first), padded.shape[1])
            rows_cols = _trace(padded, r, c, _STEPS)
            xy = np.stack([rows_cols[:, 1] - 1, rows_cols[:, 0] - 1 + row0], axis=1)
            xy = _drop_collinear(xy)
            if len(xy) < 3:
                xy = np.concatenate([xy, xy[:3 - len(xy)]] if len(xy) == 2 else [xy] * 3)
            polygons.append(xy.astype(np.int64))
    return polygons
