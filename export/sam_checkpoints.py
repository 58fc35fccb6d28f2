"""Import official SAM 1 checkpoints (sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth,
sam_vit_h_4b8939.pth) into a bundle's sam/ folder: config.json + model.safetensors.

The official files are `Sam.state_dict()` pickles; they are read with
`torch.load(weights_only=True)` (no arbitrary code runs) and written as safetensors under the same
key names, which is what `star_edge.sam.checkpoints.load_sam` reads. The variant is detected from
the tensor shapes (ViT width and depth), never from the file name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from star_edge.errors import BundleError
from star_edge.sam.checkpoints import CONFIG_FILE, WEIGHTS_FILE, check_sam_dir
from star_edge.sam.official import OFFICIAL_CONFIGS, build_sam_from_config

_PATCH_WEIGHT = "image_encoder.patch_embed.proj.weight"
_BLOCK_KEY = re.compile(r"image_encoder\.blocks\.(\d+)\.")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .pth checkpoint: a state dict, or one wrapped as {"model": state dict}.

    Raises:
        BundleError: missing, truncated or unreadable file, pickled objects other than tensors,
            or anything but a mapping of names to tensors; the message names the file.
    """
    if not path.is_file():
        raise BundleError(f"{path} is missing (expected an official SAM checkpoint .pth)")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for a bad file; all mean the same here
        message = f"{path} is not a readable PyTorch checkpoint (truncated?): {exc}"
        raise BundleError(message) from exc
    if isinstance(loaded, Mapping) and isinstance(loaded.get("model"), Mapping):
        loaded = loaded["model"]
    if not isinstance(loaded, Mapping) or not loaded:
        kind = type(loaded).__name__
        raise BundleError(f"{path} does not hold a state dict (a mapping of tensors), got {kind}")
    not_tensors = [key for key, value in loaded.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise BundleError(f"{path}: entries that are not tensors: {not_tensors[:5]}")
    return dict(loaded)


def detect_sam1_variant(shapes: Mapping[str, Sequence[int]], source: str = "checkpoint") -> str:
    """The official SAM 1 variant ("vit_b", "vit_l", "vit_h") whose layout `shapes` has.

    shapes: tensor name -> shape, for every tensor of the checkpoint (a state dict's shapes, or a
    meta-device state dict). The ViT width (patch embedding) and depth (number of blocks) pick
    the candidate; then every key and shape must equal that variant's `Sam.state_dict()`.

    Raises:
        BundleError: no official variant has this layout; the message names `source` and the
            first difference.
    """
    if _PATCH_WEIGHT not in shapes:
        raise BundleError(f"{source} is not a SAM 1 state dict: no tensor {_PATCH_WEIGHT}")
    width = int(shapes[_PATCH_WEIGHT][0])
    depth = 1 + max((int(m.group(1)) for k in shapes if (m := _BLOCK_KEY.match(k))), default=-1)
    candidates = [
        name
        for name, config in OFFICIAL_CONFIGS.items()
        if (config["encoder_embed_dim"], config["encoder_depth"]) == (width, depth)
    ]
    if not candidates:
        raise BundleError(
            f"{source} is no official SAM 1 variant: ViT width {width}, depth {depth} "
            "(vit_b 768/12, vit_l 1024/24, vit_h 1280/32)"
        )
    variant = candidates[0]
    with torch.device("meta"):
        expected = build_sam_from_config(OFFICIAL_CONFIGS[variant]).state_dict()
    missing = sorted(expected.keys() - shapes.keys())
    unexpected = sorted(shapes.keys() - expected.keys())
    if missing or unexpected:
        raise BundleError(
            f"{source} does not match the {variant} layout: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for key, tensor in expected.items():
        if tuple(shapes[key]) != tuple(tensor.shape):
            raise BundleError(
                f"{source}: tensor {key} has shape {list(shapes[key])}, "
                f"expected {list(tensor.shape)} for {variant}"
            )
    return variant


def import_official_sam(pth_path: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Convert an official SAM 1 checkpoint into `out_dir` (config.json + model.safetensors).

    The folder is created if needed; both files are overwritten. Tensors keep their float dtype
    (the official files are float32). The written folder is checked by the runtime's own reader
    (header against config) before returning.

    Returns:
        The manifest's sam section: {"kind": "sam1", "variant": "vit_b" | "vit_l" | "vit_h",
        "path": <out_dir's folder name, "sam" in a bundle>, "image_size": 1024}.

    Raises:
        BundleError: missing, truncated or unreadable file, not a state dict, non-float tensors,
            or a layout that is no official variant; the message names the file.
    """
    source = Path(pth_path)
    state = _read_state_dict(source)
    variant = detect_sam1_variant({k: tuple(v.shape) for k, v in state.items()}, str(source))
    not_float = [key for key, value in state.items() if not value.is_floating_point()]
    if not_float:
        raise BundleError(f"{source}: tensors with a non-float dtype: {not_float[:5]}")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.contiguous() for key, value in state.items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt", "source": source.name})
    config = OFFICIAL_CONFIGS[variant]
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    check_sam_dir(folder)
    image_size = config["image_size"]
    return {"kind": "sam1", "variant": variant, "path": folder.name, "image_size": image_size}
