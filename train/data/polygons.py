"""Polygons to masks, with the pixel convention of the LISA ReasonSeg loader.

Convention: pixel (x, y) is the integer point (x, y), i.e. coordinates name pixel centres, x the
column and y the row. Polygon vertices are truncated to integers first (as LISA's
`np.array(points, dtype=np.int32)`), then the polygon is filled with its 1-pixel outline included
(as LISA's `cv2.fillPoly` + `cv2.polylines`; here PIL's polygon fill and outline). For horizontal,
vertical and diagonal edges that is exactly the integer points inside or on the polygon; along
other edges it adds the pixels the edge passes through (all within one pixel of the edge).

Several labelled polygons become one label map as in LISA: they are painted from the largest
(pixel count) to the smallest, so where polygons overlap the smaller one decides.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

BACKGROUND, TARGET, IGNORE = 0, 1, 2
"""Values of the label map that `paint_polygons` returns."""


def integer_vertices(points: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Vertices (k, 2) as int64, truncated toward zero like LISA's int32 cast."""
    return np.trunc(np.asarray(points, dtype=np.float64).reshape(-1, 2)).astype(np.int64)


def polygon_mask(points: Sequence[Sequence[float]] | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Rasterise one polygon.

    Args:
        points: (k, 2) x, y vertices, k >= 1 (fewer than 3 draw a point or a line); truncated to
            integers.
        size: (W, H) of the image.

    Returns:
        (H, W) bool, the pixels the polygon covers (module docstring); parts outside the image are
        clipped.
    """
    width, height = size
    mask = np.zeros((height, width), dtype=bool)
    window = _draw_clipped(integer_vertices(points), width, height)
    if window is not None:
        (x0, y0), crop = window
        mask[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop
    return mask


def paint_polygons(
    polygons: Sequence[np.ndarray], values: Sequence[int], size: tuple[int, int]
) -> np.ndarray:
    """Paint polygons into a label map, largest first (LISA's order), so smaller ones win overlaps.

    Args:
        polygons: each (k, 2) x, y vertices.
        values: one label value (1..255) per polygon, e.g. TARGET or IGNORE.
        size: (W, H) of the image.

    Returns:
        (H, W) uint8 label map, BACKGROUND (0) where no polygon lies. Ties in area keep the
        given order.
    """
    width, height = size
    windows = [_draw_clipped(integer_vertices(p), width, height) for p in polygons]
    areas = [0 if w is None else int(w[1].sum()) for w in windows]
    labels = np.zeros((height, width), dtype=np.uint8)
    for index in sorted(range(len(windows)), key=lambda i: -areas[i]):
        if windows[index] is None:
            continue
        (x0, y0), crop = windows[index]
        region = labels[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]]
        region[crop] = values[index]
    return labels


def _draw_clipped(vertices: np.ndarray, width: int, height: int) -> tuple[tuple[int, int], np.ndarray] | None:
    """Draw integer vertices (k, 2) on the part of the image their bounding box covers: returns
    ((x0, y0), crop (h, w) bool) with the crop's top-left pixel at (x0, y0), or None when the
    polygon misses the image."""
    x0, y0 = max(int(vertices[:, 0].min()), 0), max(int(vertices[:, 1].min()), 0)
    x1, y1 = min(int(vertices[:, 0].max()), width - 1), min(int(vertices[:, 1].max()), height - 1)
    if x1 < x0 or y1 < y0:
        return None
    canvas = Image.new("L", (x1 - x0 + 1, y1 - y0 + 1), 0)
    shifted = [(int(x) - x0, int(y) - y0) for x, y in vertices]
    draw = ImageDraw.Draw(canvas)
    if len(shifted) >= 3:
        draw.polygon(shifted, fill=1, outline=1)
    else:
        draw.line(shifted if len(shifted) == 2 else shifted * 2, fill=1, width=1)
    return (x0, y0), np.asarray(canvas, dtype=bool)
