"""Assemble the default bundle that ships in `star_edge/demo/bundle/` from trained weights.

`python -m star_edge.train.demo_bundle --reasoner-weights W.safetensors --sam-dir DIR --out DIR
[--card card.json]` writes the demo reasoner's folder (the files `init_reasoner` writes, with the
trained weights in float16 in place of the initial ones), copies the tiny SAM's folder, and writes
the manifest (`trained: true`, the model card as its "card" field), then exports the ONNX graphs
(fp32, weights read from the checkpoints) so that the default bundle loads without torch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from star_edge.bundle import Bundle
from star_edge.errors import BundleError
from star_edge.export.bundle_export import export_bundle
from star_edge.export.bundle_writer import write_manifest
from star_edge.sam.checkpoints import read_sam_config
from star_edge.train.demo import init_reasoner

BUNDLE_NAME = "star-edge-demo-tiny-qwen3_vl"


def write_demo_bundle(out: str | Path, reasoner_weights: str | Path, sam_dir: str | Path,
                      card: dict[str, Any] | None = None, onnx: bool = True, with_labels: bool = True) -> Bundle:
    """Write the demo bundle into `out` (replaced whole); returns it as the runtime reads it.

    `onnx` adds the fp32 ONNX graphs (onnx/, their weights linked to the checkpoints: a few MB),
    which load without torch or transformers. `with_labels` False: a reasoner trained without labels
    (`python -m star_edge.train.demo --no-labels`), asked with the no-label prompt template.

    Raises:
        BundleError: `reasoner_weights` is missing, unreadable or does not fit the demo reasoner
            (missing, extra or differently shaped tensors); `sam_dir` is not a SAM folder.
    """
    out = Path(out)
    sam_config = read_sam_config(sam_dir)
    with tempfile.TemporaryDirectory() as scratch:
        section = init_reasoner(Path(scratch) / "reasoner", demo_init=False, with_labels=with_labels)
        initial = load_file(str(Path(scratch) / "reasoner" / "model.safetensors"))
        try:
            trained = load_file(str(reasoner_weights))
        except (OSError, SafetensorError) as exc:
            raise BundleError(f"{reasoner_weights}: not a readable safetensors file ({exc})") from exc
        shapes = {name: tuple(t.shape) for name, t in initial.items()}
        if shapes != {name: tuple(t.shape) for name, t in trained.items()}:
            raise BundleError(f"{reasoner_weights}: the tensors do not match the demo reasoner's")
        save_file({name: t.to(torch.float16).contiguous() for name, t in trained.items()},
                  str(Path(scratch) / "reasoner" / "model.safetensors"), metadata={"format": "pt"})
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        shutil.copytree(Path(scratch) / "reasoner", out / "reasoner")
    (out / "sam").mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(Path(sam_dir) / name, out / "sam" / name)
    sam = {"kind": sam_config["kind"], "variant": sam_config["variant"], "path": "sam",
           "image_size": sam_config["image_size"]}
    bundle = write_manifest(out, name=BUNDLE_NAME, reasoner={**section, "path": "reasoner"}, sam=sam,
                            trained=True, extra={"card": card} if card else None)
    return export_bundle(out, out, onnx=True) if onnx else bundle


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry (module docstring)."""
    parser = argparse.ArgumentParser(description="Assemble the shipped demo bundle from trained weights.")
    parser.add_argument("--reasoner-weights", type=Path, required=True)
    parser.add_argument("--sam-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--card", type=Path, default=None, help="a JSON model card stored in the manifest")
    parser.add_argument("--no-labels", action="store_true", help="the reasoner was trained without labels")
    args = parser.parse_args(argv)
    card = json.loads(args.card.read_text()) if args.card else None
    try:
        bundle = write_demo_bundle(args.out, args.reasoner_weights, args.sam_dir, card, with_labels=not args.no_labels)
    except BundleError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"wrote {bundle.root}")


if __name__ == "__main__":
    main()
