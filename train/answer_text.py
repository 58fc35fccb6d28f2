"""The answer text a reasoner is trained to write (DESIGN section 5), from targets in original pixels.

    <think> trace </think><answer>[{"bbox_2d": [x1, y1, x2, y2], "point_2d": [x, y], "label": "cup"}]</answer>

Coordinates go to the model's frame through star_edge.geometry (integer pixels of the reasoner
input for Qwen2.5-VL, the 0-1000 grid for Qwen3-VL), so `star_edge.answer.parse` maps them back.
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np

from star_edge.geometry import DEFAULT_INPUT_SIZE, original_to_reasoner


def format_answer(
    boxes: np.ndarray,
    points: np.ndarray,
    labels: Sequence[str],
    image_size: tuple[int, int],
    frame: str,
    input_size: tuple[int, int] = DEFAULT_INPUT_SIZE,
    trace: str = "",
    with_labels: bool = True,
) -> str:
    """The training answer for one sample.

    Args:
        boxes: (n, 4) x1, y1, x2, y2 in original pixels (n = 0 for "no target").
        points: (n, 2) x, y in original pixels.
        labels: n short names.
        image_size: (W, H) of the original image.
        frame: "pixels" or "grid1000".
        input_size: (w, h) of the reasoner input (used by the "pixels" frame).
        trace: the worded reasoning that goes inside <think>.
        with_labels: False drops the "label" field (the label-prediction ablation).

    Returns:
        The answer text, with one space-separated JSON list and no trailing newline.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(boxes) != len(points) or len(boxes) != len(labels):
        raise ValueError(f"{len(boxes)} boxes, {len(points)} points and {len(labels)} labels")
    frame_boxes = original_to_reasoner(boxes, image_size, frame, input_size) if len(boxes) else boxes
    frame_points = original_to_reasoner(points, image_size, frame, input_size) if len(points) else points
    objects = []
    for box, point, label in zip(frame_boxes, frame_points, labels):
        entry: dict[str, object] = {"bbox_2d": [int(v) for v in box], "point_2d": [int(v) for v in point]}
        if with_labels:
            entry["label"] = label
        objects.append(entry)
    return f"<think>{trace.strip()}</think><answer>{json.dumps(objects)}</answer>"
