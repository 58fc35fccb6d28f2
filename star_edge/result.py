"""What one `Segmenter.segment` call returns: the final objects, the union mask, every sample's
text and parse outcome, and per-stage timings; JSON (COCO RLE masks) and an overlay picture."""

from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from star_edge.answer import Answer
from star_edge.errors import InvalidInputError
from star_edge.kernels import rle_encode

_PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
)


@dataclass(frozen=True)
class ObjectMask:
    """One final object.

    mask: (H, W) bool in original image pixels. box: (x1, y1, x2, y2) and point: (x, y), integer
    original pixels (the prompts SAM was given for the chosen mask). votes: number of samples that
    agreed on it (1 with a single sample). score: SAM's predicted IoU (mean over the cluster when
    voting).
    """

    mask: np.ndarray
    box: tuple[int, int, int, int]
    point: tuple[int, int]
    label: str
    votes: int
    score: float

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "box": list(self.box),
            "point": list(self.point),
            "votes": self.votes,
            "score": round(float(self.score), 6),
            "area": int(self.mask.sum()),
            "mask": rle_encode(self.mask[None])[0],
        }


@dataclass(frozen=True)
class Sample:
    """One sampled reasoner answer: its text and either the parsed answer or why it failed."""

    text: str
    answer: Answer | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.answer is not None

    def to_json(self) -> dict[str, Any]:
        objects = [] if self.answer is None else [
            {"box": list(o.box), "point": list(o.point), "label": o.label} for o in self.answer.objects
        ]
        return {"text": self.text, "ok": self.ok, "error": self.error, "objects": objects}


@dataclass(frozen=True)
class Result:
    """The outcome of one segment call.

    image: (H, W, 3) uint8, the input as segmented. mask: (H, W) bool, the union of the objects
    (all False when the answer is "nothing"). timings: stage -> milliseconds.
    """

    query: str
    image: np.ndarray = field(repr=False)
    objects: list[ObjectMask]
    mask: np.ndarray = field(repr=False)
    samples: list[Sample]
    timings: dict[str, float]

    @property
    def image_size(self) -> tuple[int, int]:
        """(W, H) of the input image."""
        return (self.image.shape[1], self.image.shape[0])

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; masks as COCO compressed RLE (pycocotools-compatible `counts`)."""
        return {
            "query": self.query,
            "image_size": list(self.image_size),
            "objects": [obj.to_json() for obj in self.objects],
            "mask": rle_encode(self.mask[None])[0],
            "samples": [sample.to_json() for sample in self.samples],
            "timings_ms": {stage: round(ms, 3) for stage, ms in self.timings.items()},
        }

    def overlay(self, alpha: float = 0.5) -> Image.Image:
        """The input image with each object's mask tinted, its box, point and label drawn.

        alpha: the tint's opacity, a number in [0, 1].
        """
        if isinstance(alpha, bool) or not isinstance(alpha, Real) or not 0.0 <= alpha <= 1.0:
            raise InvalidInputError(f"alpha must be a number in [0, 1], got {alpha!r}")
        canvas = self.image.astype(np.float32)
        for index, obj in enumerate(self.objects):
            colour = np.array(_PALETTE[index % len(_PALETTE)], dtype=np.float32)
            canvas[obj.mask] = (1.0 - alpha) * canvas[obj.mask] + alpha * colour
        picture = Image.fromarray(canvas.round().astype(np.uint8))
        draw = ImageDraw.Draw(picture)
        for index, obj in enumerate(self.objects):
            colour = _PALETTE[index % len(_PALETTE)]
            draw.rectangle(obj.box, outline=colour, width=2)
            x, y = obj.point
            draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=colour, outline=(255, 255, 255))
            caption = f"{obj.label or 'object'} ({obj.votes})"
            draw.text((obj.box[0] + 3, obj.box[1] + 2), caption, fill=(255, 255, 255))
        return picture
