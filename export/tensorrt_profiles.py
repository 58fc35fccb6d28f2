"""TensorRT optimisation profiles for a bundle's ONNX graphs, derived without TensorRT.

Every dynamic axis of the exported graphs is declared by name in their descriptions
(reasoner_onnx.json, sam_onnx.json); a profile gives each axis name a range (min, opt, max) and an
input's shapes follow from its declared shape (an axis "a + b" is the sum of both). The ranges:

- reasoner, prefill profile: batch 1; sequence = the prompt length, from the prompt's own tokens
  (template and image tokens, counted with the bundle's tokenizer) plus 1 .. `max_query_tokens`
  query tokens (opt `opt_query_tokens`); past 0.
- reasoner, decode profile: batch 1 .. `max_samples` (opt `opt_samples`); sequence 1; past from
  the shortest prompt to the longest prompt plus max_new_tokens (opt: a typical prompt plus half
  the answer).
- SAM decoder: prompts 1 .. `max_prompts` (opt `opt_prompts`); points 2 .. 3 (a box or a point
  with its padding: 2; box and point: 3; `sam.inputs.labelled_points`).
- graphs without dynamic axes (the vision tower, the SAM encoder) need no profile.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from star_edge.errors import BundleError, InvalidInputError
from star_edge.reasoner.onnx_backend import read_description as read_reasoner_description
from star_edge.reasoner.preprocess import PromptText, PromptTokenizer
from star_edge.sam.onnx_backend import read_description as read_sam_description
from star_edge.segmenter import MAX_SAMPLES

Shape = tuple[int, ...]
#: (min, opt, max) of one axis or one input shape.
AxisRange = tuple[int, int, int]
ShapeRange = tuple[Shape, Shape, Shape]
#: input name -> its (min, opt, max) shapes under one profile.
Profile = dict[str, ShapeRange]

#: Points per SAM prompt (`sam.inputs.labelled_points`): 2 for a box or a point, 3 for both.
SAM_POINTS: AxisRange = (2, 3, 3)


@dataclass(frozen=True)
class ProfileSettings:
    """The sizes the engines are built for.

    Attributes:
        max_samples: most sample rows decoded at once (the Segmenter's largest N).
        opt_samples: the N TensorRT tunes the decoder for.
        max_query_tokens: longest query, in tokens, the prefill takes.
        opt_query_tokens: the query length TensorRT tunes the prefill for.
        max_prompts: most SAM prompts decoded at once.
        opt_prompts: the prompt count TensorRT tunes the SAM decoder for.
        workspace_bytes: TensorRT's scratch memory limit while building and running.
    """

    max_samples: int = MAX_SAMPLES
    opt_samples: int = 8
    max_query_tokens: int = 256
    opt_query_tokens: int = 16
    max_prompts: int = 64
    opt_prompts: int = 24
    workspace_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        values = asdict(self)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values.values()):
            raise InvalidInputError(f"profile settings must be positive integers, got {values}")
        for name in ("samples", "query_tokens", "prompts"):
            if values[f"opt_{name}"] > values[f"max_{name}"]:
                raise InvalidInputError(f"opt_{name} must be <= max_{name}, got {values}")


@dataclass(frozen=True)
class GraphPlan:
    """What one engine is built from: the ONNX file (in onnx/) and its optimisation profiles
    (empty for a graph without dynamic axes)."""

    onnx_file: str
    profiles: list[Profile]


def axis_range(name: str, axes: dict[str, AxisRange]) -> AxisRange:
    """The range of a declared axis name: a name of `axes`, or names joined by " + " (summed).

    Raises:
        BundleError: a name without a range.
    """
    parts = [part.strip() for part in name.split("+")]
    unknown = [part for part in parts if part not in axes]
    if unknown:
        raise BundleError(f"axis {name!r}: no range for {unknown} (the profiles cover {sorted(axes)})")
    return tuple(sum(axes[part][i] for part in parts) for i in range(3))  # type: ignore[return-value]


def shape_range(shape: list[int | str], axes: dict[str, AxisRange]) -> ShapeRange:
    """The (min, opt, max) shapes of a tensor whose declared shape is `shape` (ints and axis names)."""
    ranges = [(size, size, size) if isinstance(size, int) else axis_range(size, axes) for size in shape]
    return tuple(tuple(r[i] for r in ranges) for i in range(3))  # type: ignore[return-value]


def graph_profiles(graph: dict[str, Any], axis_sets: list[dict[str, AxisRange]]) -> list[Profile]:
    """One profile per axis set for the dynamic inputs of a described graph ({"inputs": [{"name",
    "shape"}, ...]}); [] when no input has a named axis."""
    dynamic = [tensor for tensor in graph["inputs"] if any(isinstance(size, str) for size in tensor["shape"])]
    if not dynamic:
        return []
    return [{tensor["name"]: shape_range(tensor["shape"], axes) for tensor in dynamic} for axes in axis_sets]


def prompt_lengths(description: dict[str, Any], tokenizer_file: Path, settings: ProfileSettings) -> AxisRange:
    """(min, opt, max) prompt tokens: the rendered prompt with an empty query (image tokens
    included) plus 1, `opt_query_tokens` and `max_query_tokens` query tokens."""
    spec = description["reasoner"]
    prompt = PromptText(spec["prompt"]["prefix"], spec["prompt"]["suffix"], spec["prompt"]["image_token"])
    base = len(PromptTokenizer(tokenizer_file).encode(prompt.render("", int(spec["image"]["image_tokens"]))))
    return base + 1, base + settings.opt_query_tokens, base + settings.max_query_tokens


def reasoner_axes(prompt: AxisRange, max_new_tokens: int, settings: ProfileSettings) -> list[dict[str, AxisRange]]:
    """The prefill and decode axis sets of the reasoner's graphs (see the module doc)."""
    shortest, typical, longest = prompt
    prefill = {"batch": (1, 1, 1), "sequence": prompt, "past": (0, 0, 0)}
    decode = {"batch": (1, settings.opt_samples, settings.max_samples), "sequence": (1, 1, 1),
              "past": (shortest, typical + max_new_tokens // 2, longest + max_new_tokens)}
    return [prefill, decode]


def sam_axes(settings: ProfileSettings) -> list[dict[str, AxisRange]]:
    """The SAM decoder's one axis set (see the module doc)."""
    return [{"prompts": (1, settings.opt_prompts, settings.max_prompts), "points": SAM_POINTS}]


def bundle_plans(
    onnx_dir: Path, reasoner_dir: Path, max_new_tokens: int, settings: ProfileSettings
) -> dict[str, GraphPlan]:
    """The engines of a bundle by graph name (`tensorrt_runtime.GRAPHS`): each from its fp32 ONNX
    graph, with the profiles of the module doc.

    Raises:
        BundleError: a description or the tokenizer is missing; a graph declares an axis without a range.
    """
    reasoner = read_reasoner_description(onnx_dir)
    sam = read_sam_description(onnx_dir)
    reasoner_sets = reasoner_axes(prompt_lengths(reasoner, reasoner_dir / "tokenizer.json", settings),
                                  max_new_tokens, settings)
    graphs = {
        "reasoner_vision": (reasoner["vision"], reasoner_sets),
        "reasoner_embed": (reasoner["embed"], reasoner_sets),
        "reasoner_decoder": (reasoner["decoders"]["fp32"], reasoner_sets),
        "sam_encoder": (sam["encoder"], sam_axes(settings)),
        "sam_decoder": (sam["decoders"]["fp32"], sam_axes(settings)),
    }
    plans = {name: GraphPlan(str(graph["file"]), graph_profiles(graph, axis_sets))
             for name, (graph, axis_sets) in graphs.items()}
    for name, plan in plans.items():  # the runtime finds an engine by its graph file's name
        if Path(plan.onnx_file).stem != name:
            raise BundleError(f"{onnx_dir}: graph {name} is described with file {plan.onnx_file}")
    return plans
