"""Parse a reasoner's answer text into objects (box, point, label) in original image pixels.

The expected text (DESIGN section 5) is

    <think> reasoning </think>
    <answer>[{"bbox_2d": [x1, y1, x2, y2], "point_2d": [x, y], "label": "knife"}, ...]</answer>

Rules, in the order they apply:
- The answer is the first `<answer>...</answer>` after the first `</think>` (anywhere when there is
  no `</think>`), so tags quoted inside the reasoning are not taken for the answer. The think block
  itself is optional here: the format reward checks it, the parser only reports its text.
  Whitespace around the JSON and text after `</answer>` are ignored.
- The content must be JSON. When it is not, the malformed endings that the StAR reference repairs
  (DESIGN section 5) are fixed once and parsing is retried: a number closing its array with `}`
  (`[x, y}]`, `[x, y}}]`, also between objects) and one closing brace too many (`}}]`, `}},`).
  Valid JSON is never rewritten.
- The JSON is a list of objects or a single object. `[]`, `{}` and a list of only empty objects
  mean "no target" (no objects). An empty object next to real ones is an error.
- Each object needs `bbox_2d` (4 numbers) and `point_2d` (2 numbers); numbers may be JSON numbers
  or quoted decimals ("12"), never booleans, NaN or inf. `label` is optional and defaults to "": the
  StAR format reward (DESIGN section 7) scores a missing label as a partial format, not as an
  unparseable answer, so the parser keeps the object; a present label must be a string (surrounding
  whitespace is stripped). Other keys are ignored. At most 120 objects.
- Coordinates map back to original pixels through `star_edge.geometry` (the reference rounding),
  box corners are ordered, boxes and points are clamped to the image; a box with zero width or
  height after that is an error. A point outside its box is kept (judging it is the reward's job).

Every failure raises `ParseError` with a message and a short `reason` code; `parse_safely` returns
it as data instead, since a failed sample is a recorded result, not an exception.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from star_edge import geometry
from star_edge.errors import StarEdgeError

MAX_OBJECTS = 120
"""Most objects one answer may hold (the StAR reference limit)."""

_THINK_END = "</think>"
_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_DECIMAL_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_REPAIRS = (
    # "[x, y}]", "[x, y}}]", "[x, y}, {": a number closes its array with "}" instead of "]}".
    (re.compile(r"(\d)\s*\}"), r"\1]}"),
    # "...}}]" or "...}}, {": one closing brace too many after an object.
    (re.compile(r"\}\s*\}(?=\s*[\],])"), "}"),
)
_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"')
"""A JSON string literal (escapes included): the repairs leave these as they are."""


class ParseError(StarEdgeError):
    """An answer text that cannot be read as objects.

    `reason` is a short code for counting failures: not_text, missing_answer, invalid_json,
    bad_structure, mixed_empty, too_many_objects, missing_key, bad_bbox, bad_point, bad_label,
    non_finite, degenerate_box.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type[ParseError], tuple[str, str]]:
        return (type(self), (str(self), self.reason))


@dataclass(frozen=True)
class AnswerObject:
    """One answered object in original image pixels.

    box (x1, y1, x2, y2) with x1 < x2 and y1 < y2, inside [0, W-1] x [0, H-1]; point (x, y) inside
    the image (not necessarily inside the box); label as answered, whitespace-stripped ("" when
    missing).
    """

    box: tuple[int, int, int, int]
    point: tuple[int, int]
    label: str


@dataclass(frozen=True)
class Answer:
    """A parsed answer: its objects (empty for "no target"), the think text and the raw text.

    `thinking` is the first `<think>` block's text, stripped ("" without one); `repaired` says
    whether the JSON needed one of the reference repairs. Derived, read-only: `boxes` (N, 4) int64
    and `points` (N, 2) int64 in original pixels, N = len(objects), ready for the mask decoder.
    """

    objects: list[AnswerObject]
    thinking: str
    raw: str
    repaired: bool = False
    boxes: np.ndarray = field(init=False, repr=False, compare=False)
    points: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        boxes = np.array([obj.box for obj in self.objects], dtype=np.int64).reshape(-1, 4)
        points = np.array([obj.point for obj in self.objects], dtype=np.int64).reshape(-1, 2)
        boxes.flags.writeable = False
        points.flags.writeable = False
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "points", points)

    @property
    def labels(self) -> list[str]:
        """The objects' labels, in order."""
        return [obj.label for obj in self.objects]


def parse(
    text: str,
    image_size: Sequence[int],
    input_size: Sequence[int] = geometry.DEFAULT_INPUT_SIZE,
    frame: geometry.Frame | str = geometry.Frame.PIXELS,
) -> Answer:
    """Parse one answer text into objects in original pixels (rules in the module docstring).

    image_size (W, H) of the original image; input_size (w, h) of the reasoner input, used by the
    "pixels" frame (Qwen2.5-VL); frame "grid1000" (Qwen3-VL) reads coordinates on the 0-1000 grid.
    Raises ParseError for a bad answer and InvalidInputError for bad sizes or an unknown frame.
    """
    image_size = geometry.check_size(image_size, "image_size")
    geometry.frame_size(frame, input_size)
    if not isinstance(text, str):
        raise ParseError(f"answer text must be a str, got {type(text).__name__}", "not_text")

    think = _THINK_RE.search(text)
    thinking = think.group(1).strip() if think else ""
    think_end = text.find(_THINK_END)
    answer = _ANSWER_RE.search(text, think_end + len(_THINK_END) if think_end >= 0 else 0)
    if answer is None:
        raise ParseError("no <answer>...</answer> block", "missing_answer")
    data, repaired = _load_json(answer.group(1))

    items = _object_list(data)
    if len(items) > MAX_OBJECTS:
        raise ParseError(
            f"{len(items)} objects, more than the limit of {MAX_OBJECTS}", "too_many_objects"
        )
    if all(item == {} for item in items):
        return Answer(objects=[], thinking=thinking, raw=text, repaired=repaired)
    if any(item == {} for item in items):
        raise ParseError("an empty object ('no target') mixed with real objects", "mixed_empty")

    boxes = np.array([_numbers(item, i, "bbox_2d", 4) for i, item in enumerate(items)])
    points = np.array([_numbers(item, i, "point_2d", 2) for i, item in enumerate(items)])
    labels = [_label(item, i) for i, item in enumerate(items)]

    boxes = geometry.reasoner_to_original(boxes, image_size, frame, input_size)
    boxes = geometry.clamp_boxes(geometry.order_box_corners(boxes), image_size)
    points = geometry.reasoner_to_original(points, image_size, frame, input_size)
    points = geometry.clamp_points(points, image_size)
    flat = np.flatnonzero((boxes[:, 0] == boxes[:, 2]) | (boxes[:, 1] == boxes[:, 3]))
    if flat.size:
        i = int(flat[0])
        raise ParseError(
            f"object {i}: box {tuple(boxes[i].tolist())} has zero width or height in the image",
            "degenerate_box",
        )
    objects = [
        AnswerObject(box=tuple(box), point=tuple(point), label=label)
        for box, point, label in zip(boxes.tolist(), points.tolist(), labels)
    ]
    return Answer(objects=objects, thinking=thinking, raw=text, repaired=repaired)


def parse_safely(
    text: str,
    image_size: Sequence[int],
    input_size: Sequence[int] = geometry.DEFAULT_INPUT_SIZE,
    frame: geometry.Frame | str = geometry.Frame.PIXELS,
) -> Answer | ParseError:
    """`parse`, returning the ParseError instead of raising it (a failed sample is data).

    Bad sizes or an unknown frame are the caller's error and still raise InvalidInputError.
    """
    try:
        return parse(text, image_size, input_size, frame)
    except ParseError as error:
        return error


def _load_json(content: str) -> tuple[object, bool]:
    """The JSON value of the answer content and whether a repair was needed; else ParseError."""
    try:
        return json.loads(content), False
    except (ValueError, RecursionError):
        pass
    try:
        return json.loads(_repaired(content)), True
    except (ValueError, RecursionError) as error:
        raise ParseError(
            f"answer is not valid JSON, even after repair: {error}", "invalid_json"
        ) from None


def _repaired(content: str) -> str:
    """The content with _REPAIRS applied to the text between its string literals (a label such as
    "size 2}" stays as written)."""
    pieces, start = [], 0
    for literal in [*_STRING_RE.finditer(content), None]:
        end = len(content) if literal is None else literal.start()
        code = content[start:end]
        for pattern, replacement in _REPAIRS:
            code = pattern.sub(replacement, code)
        pieces.append(code)
        if literal is not None:
            pieces.append(literal.group())
            start = literal.end()
    return "".join(pieces)


def _object_list(data: object) -> list[dict]:
    """The answer's objects as a list of dicts: a lone object becomes a list of one."""
    items = [data] if isinstance(data, dict) else data
    if not isinstance(items, list):
        kind = type(data).__name__
        raise ParseError(f"answer must be a JSON list of objects, got {kind}", "bad_structure")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            kind = type(item).__name__
            raise ParseError(f"object {i} must be a JSON object, got {kind}", "bad_structure")
    return items


def _number(value: object) -> float | None:
    """A JSON number or quoted decimal as float; None for anything else (bools included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip()
        if not _DECIMAL_RE.fullmatch(value):
            return None
    if not isinstance(value, (int, float, str)):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _numbers(item: dict, index: int, key: str, count: int) -> list[float]:
    """`item[key]` as `count` finite floats, else ParseError naming the object and the key."""
    reason = "bad_bbox" if key == "bbox_2d" else "bad_point"
    if key not in item:
        raise ParseError(f"object {index}: missing {key!r}", "missing_key")
    values = item[key]
    if not isinstance(values, list) or len(values) != count:
        message = f"object {index}: {key!r} must be a list of {count} numbers, got {_short(values)}"
        raise ParseError(message, reason)
    numbers = [_number(value) for value in values]
    if any(number is None for number in numbers):
        raise ParseError(f"object {index}: {key!r} must hold numbers, got {_short(values)}", reason)
    if not all(math.isfinite(number) for number in numbers):
        message = f"object {index}: {key!r} holds NaN or inf: {_short(values)}"
        raise ParseError(message, "non_finite")
    return numbers


def _label(item: dict, index: int) -> str:
    """The object's label, stripped; "" when missing; ParseError when not a string."""
    label = item.get("label", "")
    if not isinstance(label, str):
        message = f"object {index}: 'label' must be a string, got {_short(label)}"
        raise ParseError(message, "bad_label")
    return label.strip()


def _short(value: object, limit: int = 60) -> str:
    """repr of a value for an error message, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
