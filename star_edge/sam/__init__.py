"""SAM: box and point prompts -> masks (`MaskDecoder.embed` once per image, `decode` many prompts).

Importing this package does not import torch; `MaskDecoder`, `ImageEmbedding` and `load_sam` load
the torch backend on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from star_edge.sam.checkpoints import load_sam
    from star_edge.sam.torch_backend import ImageEmbedding, MaskDecoder

__all__ = ["ImageEmbedding", "MaskDecoder", "load_sam"]


def __getattr__(name: str) -> Any:
    if name in ("ImageEmbedding", "MaskDecoder"):
        from star_edge.sam import torch_backend

        return getattr(torch_backend, name)
    if name == "load_sam":
        from star_edge.sam.checkpoints import load_sam

        return load_sam
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
