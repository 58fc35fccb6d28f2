"""SAM: box and point prompts -> masks (`embed` once per image, `decode` many prompts at once).

Backends with one interface: `MaskDecoder` (torch) and `OnnxMaskDecoder` (onnxruntime, no torch).
Importing this package imports neither; each name loads its backend on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from star_edge.sam.checkpoints import load_sam
    from star_edge.sam.onnx_backend import OnnxImageEmbedding, OnnxMaskDecoder
    from star_edge.sam.torch_backend import ImageEmbedding, MaskDecoder

__all__ = ["ImageEmbedding", "MaskDecoder", "OnnxImageEmbedding", "OnnxMaskDecoder", "load_sam"]


def __getattr__(name: str) -> Any:
    if name in ("ImageEmbedding", "MaskDecoder"):
        from star_edge.sam import torch_backend

        return getattr(torch_backend, name)
    if name in ("OnnxImageEmbedding", "OnnxMaskDecoder"):
        from star_edge.sam import onnx_backend

        return getattr(onnx_backend, name)
    if name == "load_sam":
        from star_edge.sam.checkpoints import load_sam

        return load_sam
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
