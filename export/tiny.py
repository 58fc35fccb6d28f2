"""Tiny bundles built from config in seconds: for tests, and the untrained default model.

A tiny bundle holds a real Qwen2.5-VL or Qwen3-VL checkpoint with a few small layers and our own
tokenizer (see `tiny_reasoner`), and a real segment_anything SAM at small dims (see `tiny_sam`).
"""

from __future__ import annotations

from pathlib import Path

from star_edge.bundle import Bundle
from star_edge.export.bundle_writer import write_manifest
from star_edge.export.tiny_reasoner import TinyDims, write_tiny_reasoner
from star_edge.export.tiny_sam import TINY_SAM_CONFIG, make_tiny_sam, write_sam_dir


def make_tiny_bundle(
    path: str | Path,
    seed: int = 0,
    family: str = "qwen2_5_vl",
    scripted_answers: list[str] | None = None,
    dims: TinyDims = TinyDims(),
) -> Bundle:
    """Write a complete tiny bundle to `path` (created if absent); deterministic for a seed.

    Args:
        path: the bundle folder to write.
        seed: seeds every random weight.
        family: "qwen2_5_vl" (pixel coordinates) or "qwen3_vl" (0-1000 grid).
        scripted_answers: if given, the reasoner's weights are crafted so that it answers with
            these texts (greedy: the first; sampling: any of them). A test fixture: the model
            classes and code paths are real, the answers known in advance.
        dims: the reasoner's sizes.

    Returns:
        The written bundle, verified by the runtime's reader.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    reasoner = write_tiny_reasoner(root / "reasoner", seed=seed, family=family,
                                   scripted_answers=scripted_answers, dims=dims)
    reasoner = {**reasoner, "path": "reasoner"}
    sam_module, sam_config = make_tiny_sam(seed=seed)
    write_sam_dir(sam_module, sam_config, root / "sam")
    sam = {"kind": "sam1", "variant": "tiny", "path": "sam", "image_size": TINY_SAM_CONFIG["image_size"]}
    name = f"tiny-{family}-seed{seed}" + ("-scripted" if scripted_answers else "")
    return write_manifest(root, name=name, reasoner=reasoner, sam=sam, trained=False)
