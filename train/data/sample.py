"""The evaluation sample every data source yields, and the error bad data files raise."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from star_edge.errors import StarEdgeError
from star_edge.images import load_image


class DataError(StarEdgeError):
    """A data set file that cannot be read (the message names the file and what was wrong)."""


@dataclass(frozen=True)
class SegSample:
    """One reasoning-segmentation example: an image, its queries and the ground truth.

    image: the image file, or (H, W, 3) uint8 RGB pixels. queries: one or more queries that all
    refer to the same target (ReasonSeg gives several phrasings per image). is_sentence: the
    queries are sentences rather than short phrases (ReasonSeg's long/short split). mask: (H, W)
    bool, the target. ignore: (H, W) bool, pixels excluded from the metrics. reasoning_type and
    depth: present for ReasonSeg-X style and synthetic data, else None.
    """

    image_id: str
    image: Path | np.ndarray = field(repr=False)
    queries: tuple[str, ...]
    is_sentence: bool
    mask: np.ndarray = field(repr=False)
    ignore: np.ndarray = field(repr=False)
    reasoning_type: str | None = None
    depth: int | None = None

    def pixels(self) -> np.ndarray:
        """The image as (H, W, 3) uint8 RGB."""
        return load_image(self.image)
