"""The reasoner: a vision-language model that thinks, then answers boxes, points and labels.

Backends (`torch_backend.TorchReasoner`, later ONNX and TensorRT) all return a `ReasonerOutput`.
This package imports no backend: `import star_edge.reasoner` loads neither torch nor transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from star_edge.reasoner.prompts import FRAMES, PROMPT_TEMPLATES, PromptTemplate, build_messages

__all__ = ["FRAMES", "PROMPT_TEMPLATES", "PromptTemplate", "ReasonerOutput", "build_messages"]


@dataclass
class ReasonerOutput:
    """The answers of one `generate` (or `sample`) call.

    Attributes:
        texts: one decoded answer per sample, special tokens removed (`<think>`/`<answer>` tags are
            plain text and stay).
        token_ids: per sample, the generated token ids up to and including the end token (when one
            was generated), without padding.
        timings: stage name -> milliseconds (see the backend for the stages it reports).
        token_counts: "prompt" (tokens of the prompt, image tokens included), "image" (image
            tokens), "generated" (generated tokens summed over the samples).
        rows: the sample row of each answer (0..n-1 for `generate`); rows a caller stopped early
            are absent.
    """

    texts: list[str]
    token_ids: list[list[int]]
    timings: dict[str, float] = field(default_factory=dict)
    token_counts: dict[str, int] = field(default_factory=dict)
    rows: list[int] = field(default_factory=list)
