"""ReasonSeg data saved as a Hugging Face `datasets` folder (`Dataset.save_to_disk`).

One row per (image, query), as the public ReasonSeg conversions store it. Columns:
- `image`: an Image feature (PIL) or an (H, W, 3) array; `mask`: an Image feature or an (H, W)
  array (also (H, W, C): the first channel), nonzero = target;
- `text`: a query string or a list of queries;
- optional: `ignore` (like `mask`, nonzero = excluded from the metrics), `image_id` (else the row
  number), `is_sentence`, `reasoning_type`, `depth`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from star_edge.train.data.sample import DataError, SegSample

REQUIRED_COLUMNS = ("image", "mask", "text")


def is_hf_folder(path: str | Path) -> bool:
    """Whether `path` looks like a `save_to_disk` folder (a Dataset or a DatasetDict)."""
    return is_dataset_dict(path) or (Path(path) / "state.json").is_file()


def is_dataset_dict(path: str | Path) -> bool:
    """Whether `path` is a `save_to_disk` folder of a DatasetDict (one with named splits)."""
    return (Path(path) / "dataset_dict.json").is_file()


class HFReasonSeg(Sequence[SegSample]):
    """The rows of a `datasets.Dataset` as SegSamples, converted on access."""

    def __init__(self, dataset: Any, name: str = "dataset") -> None:
        missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
        if missing:
            raise DataError(f"{name}: missing column(s) {', '.join(missing)} "
                            f"(it has: {', '.join(dataset.column_names)})")
        self.dataset = dataset
        self.name = name

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> SegSample:  # type: ignore[override]
        row = self.dataset[int(index)]
        where = f"{self.name} row {index}"
        image = _array(row["image"], where, "image")
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        image = np.ascontiguousarray(image[:, :, :3].astype(np.uint8))
        mask = _plane(row["mask"], where, "mask")
        ignore = _plane(row["ignore"], where, "ignore") if row.get("ignore") is not None else np.zeros_like(mask)
        for name, plane in (("mask", mask), ("ignore", ignore)):
            if plane.shape != image.shape[:2]:
                raise DataError(f"{where}: {name} is {plane.shape[1]}x{plane.shape[0]}, "
                                f"the image {image.shape[1]}x{image.shape[0]}")
        text = row["text"]
        queries = (text,) if isinstance(text, str) else tuple(text)
        if not queries or not all(isinstance(q, str) and q.strip() for q in queries):
            raise DataError(f"{where}: 'text' must be a non-empty string or list of strings")
        depth = row.get("depth")
        return SegSample(
            image_id=str(row.get("image_id") if row.get("image_id") is not None else index),
            image=image,
            queries=tuple(q.strip() for q in queries),
            is_sentence=bool(row.get("is_sentence") or False),
            mask=mask,
            ignore=ignore,
            reasoning_type=row.get("reasoning_type"),
            depth=None if depth is None else int(depth),
        )


def load_hf(path: str | Path, split: str | None = None) -> HFReasonSeg:
    """Open a `save_to_disk` folder.

    Args:
        path: the folder of a Dataset or a DatasetDict.
        split: the split of a DatasetDict; may be None when it has exactly one.
    """
    from datasets import DatasetDict, load_from_disk

    path = Path(path)
    try:
        loaded = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{path}: not a Hugging Face dataset folder ({exc})") from None
    if isinstance(loaded, DatasetDict):
        names = list(loaded.keys())
        if split is None and len(names) == 1:
            split = names[0]
        if split not in loaded:
            raise DataError(f"{path}: choose a split with --split ({', '.join(names)})")
        return HFReasonSeg(loaded[split], name=f"{path} [{split}]")
    if split is not None:
        raise DataError(f"{path}: a single Dataset has no splits (got --split {split})")
    return HFReasonSeg(loaded, name=str(path))


def _array(value: Any, where: str, column: str) -> np.ndarray:
    if hasattr(value, "convert") and hasattr(value, "mode"):  # a PIL image
        value = value.convert("RGB") if column == "image" else value
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: column '{column}' is not an image or array ({exc})") from None


def _plane(value: Any, where: str, column: str) -> np.ndarray:
    """A mask column as (H, W) bool: nonzero = set; (H, W, C) takes the first channel."""
    plane = _array(value, where, column)
    if plane.ndim == 3:
        plane = plane[:, :, 0]
    if plane.ndim != 2:
        raise DataError(f"{where}: column '{column}' must be 2-D, got shape {plane.shape}")
    return plane != 0
