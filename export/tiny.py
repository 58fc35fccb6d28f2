"""Tiny bundles built from config in seconds: for tests, and the untrained default model.

A tiny bundle holds a real Qwen2.5-VL or Qwen3-VL checkpoint with a few small layers and our own
tokenizer (see `tiny_reasoner`), and a real segment_anything SAM at small dims (see `tiny_sam`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from star_edge.bundle import Bundle
from star_edge.export.bundle_writer import write_manifest
from star_edge.export.tiny_reasoner import TinyDims, write_tiny_reasoner
from star_edge.export.tiny_sam import make_tiny_sam, write_sam_dir
from star_edge.sam.checkpoints import read_sam_config


def make_tiny_bundle(
    path: str | Path,
    seed: int = 0,
    family: str = "qwen2_5_vl",
    scripted_answers: list[str] | None = None,
    dims: TinyDims = TinyDims(),
    sam_dir: str | Path | None = None,
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
        sam_dir: a sam/ folder (config.json + model.safetensors) to copy instead of a random
            tiny SAM, e.g. the trained one shipped with the package.

    Returns:
        The written bundle, verified by the runtime's reader.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    reasoner = write_tiny_reasoner(root / "reasoner", seed=seed, family=family,
                                   scripted_answers=scripted_answers, dims=dims)
    reasoner = {**reasoner, "path": "reasoner"}
    if sam_dir is None:
        sam_module, sam_config = make_tiny_sam(seed=seed)
        write_sam_dir(sam_module, sam_config, root / "sam")
    else:
        sam_config = read_sam_config(sam_dir)
        (root / "sam").mkdir(exist_ok=True)
        for name in ("config.json", "model.safetensors"):
            shutil.copyfile(Path(sam_dir) / name, root / "sam" / name)
    sam = {"kind": sam_config["kind"], "variant": sam_config["variant"], "path": "sam",
           "image_size": sam_config["image_size"]}
    name = f"tiny-{family}-seed{seed}" + ("-scripted" if scripted_answers else "")
    return write_manifest(root, name=name, reasoner=reasoner, sam=sam, trained=False)
