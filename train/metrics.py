"""Reasoning-segmentation metrics (DESIGN section 9), pure numpy.

Per sample: intersection and union of the predicted and the target mask, with the ignore region
removed from both; IoU = intersection / union, and 1.0 when the union is empty (nothing to find and
nothing predicted), as LISA's evaluation counts it.
Over samples: gIoU = the mean of the per-sample IoUs; cIoU = sum of intersections / sum of unions
(1.0 when every union is empty). Both overall, per reasoning type and per depth.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np


def intersection_union(
    prediction: np.ndarray, target: np.ndarray, ignore: np.ndarray | None = None
) -> tuple[int, int]:
    """Pixel counts (intersection, union) of two (H, W) bool masks outside `ignore` (H, W) bool."""
    prediction, target = np.asarray(prediction, dtype=bool), np.asarray(target, dtype=bool)
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {prediction.shape} and target {target.shape} differ in shape")
    if ignore is None:
        return int(np.count_nonzero(prediction & target)), int(np.count_nonzero(prediction | target))
    keep = ~np.asarray(ignore, dtype=bool)
    if keep.shape != target.shape:
        raise ValueError(f"ignore {keep.shape} and target {target.shape} differ in shape")
    return (int(np.count_nonzero(prediction & target & keep)),
            int(np.count_nonzero((prediction | target) & keep)))


def iou(intersection: int, union: int) -> float:
    """intersection / union; 1.0 for an empty union."""
    return 1.0 if union == 0 else intersection / union


def aggregate(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """gIoU and cIoU of records that carry `intersection` and `union`.

    Returns {"count", "giou", "ciou"}; giou and ciou are None when there are no records.
    """
    intersections, unions = [], []
    for record in records:
        intersections.append(int(record["intersection"]))
        unions.append(int(record["union"]))
    if not unions:
        return {"count": 0, "giou": None, "ciou": None}
    per_sample = [iou(i, u) for i, u in zip(intersections, unions)]
    return {
        "count": len(unions),
        "giou": float(np.mean(per_sample)),
        "ciou": iou(sum(intersections), sum(unions)),
    }


def summarize(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The report summary of per-sample records (each with intersection, union and optional
    reasoning_type and depth).

    Returns {"count", "giou", "ciou", "per_type": {type: {"count", "giou", "ciou"}},
    "per_depth": {str(depth): {...}}}; records without a type (or depth) are left out of that
    grouping; groups are sorted by key.
    """
    records = list(records)
    summary = aggregate(records)
    for key, field in (("per_type", "reasoning_type"), ("per_depth", "depth")):
        groups: dict[str, list[Mapping[str, Any]]] = {}
        for record in records:
            value = record.get(field)
            if value is not None:
                groups.setdefault(str(value), []).append(record)
        summary[key] = {name: aggregate(groups[name]) for name in sorted(groups)}
    return summary
