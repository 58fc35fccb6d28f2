"""star-edge: reasoning segmentation on the edge.

A vision-language model reasons about an implicit query and answers boxes, points and labels; SAM
turns them into masks; N sampled answers vote at the mask level.

    import star_edge
    seg = star_edge.Segmenter.from_pretrained()          # the bundled default model
    res = seg.segment("kitchen.jpg", "what could I cut the rope with?", samples=8, seed=0)
    res.mask, res.objects, res.to_json()
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Segmenter": "star_edge.segmenter",
    "Result": "star_edge.result",
    "ObjectMask": "star_edge.result",
    "Sample": "star_edge.result",
    "VoteConfig": "star_edge.vote",
    "StarEdgeError": "star_edge.errors",
    "InvalidInputError": "star_edge.errors",
    "BundleError": "star_edge.errors",
    "BackendUnavailableError": "star_edge.errors",
    "NumericalError": "star_edge.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    """Import public names on first use, so `import star_edge` stays light (no torch, no numba)."""
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'star_edge' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module_name), name)
