"""The LISA ReasonSeg layout: one labelme-style JSON beside each image (DESIGN section 9).

    <image_id>.jpg   (or .jpeg / .png)
    <image_id>.json  {"text": [query, ...], "is_sentence": bool,
                      "shapes": [{"label": "target" | "ignore", "shape_type": "polygon",
                                  "points": [[x, y], ...]}, ...],
                      "reasoning_type": str, "depth": int}      (the last two: ReasonSeg-X, optional)

As LISA reads it: a shape whose label contains "ignore" is an ignore region, a "flag" shape is
skipped, any other shape is a target; every shape's points are a polygon, rasterised with the
convention of `polygons` (pixel centres, LISA's painting order). A polygon with fewer than 3 points
is skipped with a warning; a file that cannot be read raises DataError naming it.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from star_edge.images import MAX_PIXELS
from star_edge.train.data.polygons import IGNORE, TARGET, paint_polygons
from star_edge.train.data.sample import DataError, SegSample

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
_EXIF_ORIENTATION = 0x0112


class ReasonSegFolder(Sequence[SegSample]):
    """The samples of a ReasonSeg-layout folder, sorted by image id, read on access."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"data folder not found: {self.root}")
        self.json_paths = sorted(self.root.glob("*.json"))
        if not self.json_paths:
            raise DataError(f"no ReasonSeg JSON files in {self.root}")

    def __len__(self) -> int:
        return len(self.json_paths)

    def __getitem__(self, index: int) -> SegSample:  # type: ignore[override]
        return read_sample(self.json_paths[index])


def load(root: str | Path) -> Iterator[SegSample]:
    """Yield the samples of a ReasonSeg-layout folder, in image id order (see ReasonSegFolder)."""
    return iter(ReasonSegFolder(root))


def read_sample(json_path: str | Path) -> SegSample:
    """Read one annotation and rasterise its polygons.

    Returns a SegSample whose image is the path of the image beside the JSON; mask and ignore are
    (H, W) bool and disjoint.
    """
    json_path = Path(json_path)
    record = _read_json(json_path)
    image_path = _image_beside(json_path)
    size = _displayed_size(image_path)
    queries = _queries(record, json_path)
    polygons, values = _polygons(record, json_path)
    labels = paint_polygons(polygons, values, size)
    return SegSample(
        image_id=json_path.stem,
        image=image_path,
        queries=queries,
        is_sentence=bool(record.get("is_sentence", False)),
        mask=labels == TARGET,
        ignore=labels == IGNORE,
        reasoning_type=_optional(record, "reasoning_type", str, json_path),
        depth=_optional(record, "depth", int, json_path),
    )


def write_sample(
    root: str | Path,
    image_id: str,
    image: np.ndarray,
    queries: Sequence[str],
    is_sentence: bool,
    targets: Sequence[np.ndarray],
    ignores: Sequence[np.ndarray] = (),
    extra: dict[str, Any] | None = None,
    group_ids: Sequence[int] | None = None,
) -> Path:
    """Write `<image_id>.jpg` (quality 95) and `<image_id>.json` in the ReasonSeg layout.

    Args:
        root: the folder (created if absent).
        image: (H, W, 3) uint8 RGB.
        targets, ignores: polygons, each (k, 2) x, y integer vertices (k >= 3).
        extra: more top-level JSON keys (e.g. reasoning_type, depth).
        group_ids: labelme's group_id per target polygon (e.g. the instance it belongs to).

    Returns:
        The JSON path.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    shapes = [
        {"label": "target", "shape_type": "polygon", "points": np.asarray(p).tolist(),
         "group_id": None if group_ids is None else int(group_ids[i])}
        for i, p in enumerate(targets)
    ] + [
        {"label": "ignore", "shape_type": "polygon", "points": np.asarray(p).tolist(), "group_id": None}
        for p in ignores
    ]
    record = {"text": list(queries), "is_sentence": bool(is_sentence), "shapes": shapes, **(extra or {})}
    Image.fromarray(image).save(root / f"{image_id}.jpg", quality=95)
    json_path = root / f"{image_id}.json"
    json_path.write_text(json.dumps(record, separators=(",", ":")))
    return json_path


def _displayed_size(image_path: Path) -> tuple[int, int]:
    """(W, H) of the image as shown, i.e. after its EXIF orientation (as labelme, LISA's cv2 and
    `star_edge.images.load_image` see it). An image over MAX_PIXELS is refused from its header,
    before its EXIF is read (a PNG decodes to find it) or a mask is painted at that size."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit is ours, below
            with Image.open(image_path) as opened:
                width, height = opened.size
                if width * height > MAX_PIXELS:
                    raise DataError(f"{image_path}: image is {width}x{height} = {width * height} pixels; "
                                    f"the limit is {MAX_PIXELS}")
                orientation = opened.getexif().get(_EXIF_ORIENTATION, 1)
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{image_path}: not a readable image ({exc})") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    for encoding in ("utf-8", "cp1252"):  # LISA falls back to cp1252 too
        try:
            record = json.loads(raw.decode(encoding))
            break
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            error = exc
    else:
        raise DataError(f"{path}: not valid JSON ({error})")
    if not isinstance(record, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(record).__name__}")
    return record


def _image_beside(json_path: Path) -> Path:
    for suffix in IMAGE_SUFFIXES:
        candidate = json_path.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    raise DataError(f"{json_path}: no image beside it ({json_path.stem}.jpg, .jpeg or .png)")


def _queries(record: dict[str, Any], path: Path) -> tuple[str, ...]:
    text = record.get("text")
    queries = [text] if isinstance(text, str) else text
    if not isinstance(queries, list) or not queries or not all(isinstance(q, str) and q.strip() for q in queries):
        raise DataError(f"{path}: 'text' must be a non-empty string or list of non-empty strings")
    return tuple(q.strip() for q in queries)


def _polygons(record: dict[str, Any], path: Path) -> tuple[list[np.ndarray], list[int]]:
    shapes = record.get("shapes")
    if not isinstance(shapes, list):
        raise DataError(f"{path}: 'shapes' must be a list")
    polygons, values = [], []
    for index, shape in enumerate(shapes):
        if not isinstance(shape, dict) or not isinstance(shape.get("label"), str):
            raise DataError(f"{path}: shape {index} must be an object with a string 'label'")
        label = shape["label"].lower()
        if label == "flag":  # LISA: a deprecated annotation
            continue
        points = _points(shape.get("points"))
        if points is None:
            raise DataError(f"{path}: shape {index} 'points' must be a list of [x, y] numbers within "
                            f"+-{_LARGEST_COORDINATE:g}")
        if len(points) < 3:
            warnings.warn(f"{path}: shape {index} has {len(points)} point(s), fewer than 3; skipped",
                          stacklevel=3)
            continue
        polygons.append(points)
        values.append(IGNORE if "ignore" in label else TARGET)
    return polygons, values


_LARGEST_COORDINATE = 1e6
"""Polygon coordinates beyond this (pixels) are refused: no image is that large, and they would
overflow when rasterised."""


def _points(raw: Any) -> np.ndarray | None:
    """Shape points as (k, 2) float64 (k may be 0), or None when they are not [x, y] numbers of at
    most _LARGEST_COORDINATE in size."""
    if isinstance(raw, list) and not raw:
        return np.empty((0, 2), dtype=np.float64)
    try:
        points = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if points.ndim != 2 or points.shape[1] != 2 or not (np.abs(points) <= _LARGEST_COORDINATE).all():
        return None
    return points


def _optional(record: dict[str, Any], key: str, kind: type, path: Path) -> Any:
    value = record.get(key)
    if value is None:
        return None
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise DataError(f"{path}: '{key}' must be an integer, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise DataError(f"{path}: '{key}' must be a string, got {value!r}")
    return value
