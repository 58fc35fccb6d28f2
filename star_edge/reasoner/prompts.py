"""The question the reasoner is asked: StAR's "think, then answer boxes, points and labels" prompt.

A prompt template is identified by the id stored in the bundle manifest (`reasoner.prompt_template`),
so a model is always asked the question it was trained on. The wording is ours; what it asks for is
the StAR answer format of DESIGN.md section 5:

    <think> reasoning </think>
    <answer>[{"bbox_2d": [x1, y1, x2, y2], "point_2d": [x, y], "label": "knife"}, ...]</answer>

`build_messages` returns chat messages in the Hugging Face format (one user turn: the image, then the
text); the model's own chat template turns them into tokens. This module imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from star_edge.errors import InvalidInputError

#: Coordinate frames a reasoner may answer in: integer pixels of the resized input (Qwen2.5-VL) or
#: integers on a 0-1000 grid over width and height (Qwen3-VL).
FRAMES: tuple[str, ...] = ("pixels", "grid1000")


@dataclass(frozen=True)
class PromptTemplate:
    """One version of the question.

    Attributes:
        template_id: the id written into bundle manifests, e.g. "star_v1".
        question: the text after the image, with the fields `{query}` and `{frame_note}`.
        frame_notes: per coordinate frame, the sentence that says how coordinates are written.
    """

    template_id: str
    question: str
    frame_notes: Mapping[str, str]

    def render(self, query: str, frame: str) -> str:
        """The question text for `query`, answering in coordinate `frame`."""
        return self.question.format(query=query, frame_note=self.frame_notes[frame])


_STAR_V1 = PromptTemplate(
    template_id="star_v1",
    question=(
        'Request: "{query}"\n'
        "Look at the image and decide which objects the request refers to; compare the candidates "
        "and keep only those that really match. First write your reasoning between <think> and "
        "</think>. Then write the final answer between <answer> and </answer>: a JSON list with one "
        'entry per matching object, each {{"bbox_2d": [x1, y1, x2, y2], "point_2d": [x, y], '
        '"label": "name"}}, where bbox_2d is the box around the object, point_2d a point inside '
        "it and label a short name for it. {frame_note} If nothing in the image matches, answer []."
    ),
    frame_notes=MappingProxyType(
        {
            "pixels": "Coordinates are integer pixel positions in this image.",
            "grid1000": "Coordinates are integers from 0 to 1000, measured across the image width and height.",
        }
    ),
)

_STAR_COMPACT_V1 = PromptTemplate(
    template_id="star_compact_v1",
    question=(
        'Request: "{query}"\nReason in <think></think>, then answer in <answer></answer> a JSON list '
        "of the matching objects with bbox_2d, point_2d and label. {frame_note}"
    ),
    frame_notes=MappingProxyType({"pixels": "Pixel coordinates.", "grid1000": "Coordinates 0-1000."}),
)
"""The same request in a quarter of the tokens, for small models trained on it (the demo model):
on an edge device the prompt is prefilled on every call."""

_STAR_V1_NOLABEL = PromptTemplate(
    template_id="star_v1_nolabel",
    question=(
        'Request: "{query}"\n'
        "Look at the image and decide which objects the request refers to; compare the candidates "
        "and keep only those that really match. First write your reasoning between <think> and "
        "</think>. Then write the final answer between <answer> and </answer>: a JSON list with one "
        'entry per matching object, each {{"bbox_2d": [x1, y1, x2, y2], "point_2d": [x, y]}}, '
        "where bbox_2d is the box around the object and point_2d a point inside it. {frame_note} "
        "If nothing in the image matches, answer []."
    ),
    frame_notes=_STAR_V1.frame_notes,
)
_STAR_COMPACT_V1_NOLABEL = PromptTemplate(
    template_id="star_compact_v1_nolabel",
    question=(
        'Request: "{query}"\nReason in <think></think>, then answer in <answer></answer> a JSON list '
        "of the matching objects with bbox_2d and point_2d. {frame_note}"
    ),
    frame_notes=_STAR_COMPACT_V1.frame_notes,
)
"""The two templates above without labels: the label-prediction ablation (DESIGN section 8)."""

#: Registry of prompt templates by id.
PROMPT_TEMPLATES: Mapping[str, PromptTemplate] = MappingProxyType(
    {
        template.template_id: template
        for template in (_STAR_V1, _STAR_COMPACT_V1, _STAR_V1_NOLABEL, _STAR_COMPACT_V1_NOLABEL)
    }
)


def build_messages(query: str, frame: str = "pixels", template: str = "star_v1") -> list[dict]:
    """Chat messages asking the reasoner to find `query` in the (single) image.

    Args:
        query: what to segment, e.g. "the thing used for cutting"; surrounding whitespace is dropped.
        frame: the coordinate frame of the model, one of `FRAMES`.
        template: a key of `PROMPT_TEMPLATES`.

    Returns:
        `[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ...}]}]`; the
        image part carries no data: the processor receives the image separately.

    Raises:
        InvalidInputError: empty query, unknown frame or unknown template.
    """
    if not isinstance(query, str) or not query.strip():
        raise InvalidInputError(f"the query must be a non-empty string, got {query!r}")
    if frame not in FRAMES:
        raise InvalidInputError(f"unknown coordinate frame {frame!r}; expected one of {list(FRAMES)}")
    if template not in PROMPT_TEMPLATES:
        raise InvalidInputError(f"unknown prompt template {template!r}; expected one of {sorted(PROMPT_TEMPLATES)}")
    text = PROMPT_TEMPLATES[template].render(query.strip(), frame)
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def context_length(config: object) -> int | None:
    """The most positions a checkpoint's `config.json` (as a dict) allows: its text model's
    `max_position_embeddings` (Qwen3-VL nests it in `text_config`); None where it names none."""
    if not isinstance(config, Mapping):
        return None
    text = config.get("text_config")
    value = (text if isinstance(text, Mapping) else {}).get("max_position_embeddings",
                                                              config.get("max_position_embeddings"))
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def check_prompt_length(prompt_tokens: int, max_new_tokens: int, context: int | None) -> None:
    """Raise InvalidInputError when a prompt of `prompt_tokens` tokens (image tokens included) plus
    `max_new_tokens` answer tokens does not fit the model's `context` (None: no limit known)."""
    if context is not None and prompt_tokens + max_new_tokens > context:
        raise InvalidInputError(
            f"the query makes a prompt of {prompt_tokens} tokens; with up to {max_new_tokens} answer tokens "
            f"that passes the model's context of {context} tokens (shorten the query)")
