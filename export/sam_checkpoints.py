"""Import official SAM 1 checkpoints (sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth,
sam_vit_h_4b8939.pth) and SAM 2.1 checkpoints (sam2.1_hiera_tiny.pt, _small, _base_plus, _large)
into a bundle's sam/ folder: config.json + model.safetensors.

The official SAM 1 files are `Sam.state_dict()` pickles, the SAM 2.1 files {"model": state dict};
they are read with `torch.load(weights_only=True)` (no arbitrary code runs) and written as
safetensors under the same key names, which is what `star_edge.sam.checkpoints.load_sam` reads.
Of a SAM 2.1 file only the image path is kept (`Sam2Image.state_dict()`): the video-memory
modules, the mask-prompt encoder and the object-score head are dropped. The family and variant
are detected from the tensor names and shapes, never from the file name. SAM 2.0 files
(sam2_hiera_*.pt) have the same image path and import the same way.
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
from star_edge.sam.sam2_config import SAM2_CONFIGS
from star_edge.sam.sam2_model import build_sam2_from_config

_PATCH_WEIGHT = "image_encoder.patch_embed.proj.weight"
_BLOCK_KEY = re.compile(r"image_encoder\.blocks\.(\d+)\.")
_SAM2_PATCH_WEIGHT = "image_encoder.trunk.patch_embed.proj.weight"
_SAM2_STAGE_START = re.compile(r"image_encoder\.trunk\.blocks\.(\d+)\.proj\.weight")
_SAM2_BLOCK_KEY = re.compile(r"image_encoder\.trunk\.blocks\.(\d+)\.")
# Tensors of an official SAM 2 / 2.1 checkpoint that box/point prompts on one image never use.
_SAM2_UNUSED_NAMES = frozenset(
    ("maskmem_tpos_enc", "no_mem_pos_enc", "no_obj_ptr", "no_obj_embed_spatial")
)
_SAM2_UNUSED_PREFIXES = (
    "memory_attention.",
    "memory_encoder.",
    "obj_ptr_proj.",
    "obj_ptr_tpos_proj.",
    "mask_downsample.",
    "sam_prompt_encoder.mask_downscaling.",
    "sam_mask_decoder.pred_obj_score_head.",
)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .pth checkpoint: a state dict, or one wrapped as {"model": state dict}.

    Raises:
        BundleError: missing, truncated or unreadable file, pickled objects other than tensors,
            or anything but a mapping of names to tensors; the message names the file.
    """
    if not path.is_file():
        raise BundleError(f"{path} is missing (expected an official SAM checkpoint .pth / .pt)")
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


def _sam2_stages(shapes: Mapping[str, Sequence[int]]) -> list[int]:
    """Blocks per Hiera stage: a stage starts at each block with a widening `proj`."""
    blocks = [int(m.group(1)) for key in shapes if (m := _SAM2_BLOCK_KEY.match(key))]
    depth = 1 + max(blocks, default=-1)
    starts = sorted(int(m.group(1)) for key in shapes if (m := _SAM2_STAGE_START.fullmatch(key)))
    bounds = [0, *starts, depth]
    return [end - start for start, end in zip(bounds[:-1], bounds[1:])]


def _is_unused_sam2_key(key: str) -> bool:
    return key in _SAM2_UNUSED_NAMES or key.startswith(_SAM2_UNUSED_PREFIXES)


def detect_sam2_variant(shapes: Mapping[str, Sequence[int]], source: str = "checkpoint") -> str:
    """The official SAM 2.1 variant ("hiera_tiny", "hiera_small", "hiera_base_plus",
    "hiera_large") whose layout `shapes` has.

    shapes: tensor name -> shape, for every tensor of the checkpoint's state dict. The Hiera
    width (patch embedding) and blocks per stage pick the candidate; then every image-path key
    and shape must equal that variant's `Sam2Image.state_dict()`, and every other key must be one
    of the official video-memory / unused tensors.

    Raises:
        BundleError: no official variant has this layout; the message names `source` and the
            first difference.
    """
    if _SAM2_PATCH_WEIGHT not in shapes:
        raise BundleError(f"{source} is not a SAM 2 state dict: no tensor {_SAM2_PATCH_WEIGHT}")
    width = int(shapes[_SAM2_PATCH_WEIGHT][0])
    stages = _sam2_stages(shapes)
    candidates = [
        name
        for name, config in SAM2_CONFIGS.items()
        if (config["hiera_embed_dim"], config["hiera_stages"]) == (width, stages)
    ]
    if not candidates:
        known = ", ".join(
            f"{name} {c['hiera_embed_dim']}/{c['hiera_stages']}" for name, c in SAM2_CONFIGS.items()
        )
        raise BundleError(
            f"{source} is no official SAM 2.1 variant: Hiera width {width}, stages {stages} "
            f"({known})"
        )
    variant = candidates[0]
    with torch.device("meta"):
        expected = build_sam2_from_config(SAM2_CONFIGS[variant]).state_dict()
    missing = sorted(expected.keys() - shapes.keys())
    unexpected = sorted(k for k in shapes.keys() - expected.keys() if not _is_unused_sam2_key(k))
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


def import_official_sam(checkpoint_path: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Convert an official SAM 1 (.pth) or SAM 2 / 2.1 (.pt) checkpoint into `out_dir`
    (config.json + model.safetensors).

    The folder is created if needed; both files are overwritten. Tensors keep their float dtype
    (the official files are float32); of a SAM 2 checkpoint only the image-path tensors are
    written. The written folder is checked by the runtime's own reader (header against config)
    before returning.

    Returns:
        The manifest's sam section: {"kind": "sam1" | "sam2", "variant": "vit_b" | "vit_l" |
        "vit_h" | "hiera_tiny" | "hiera_small" | "hiera_base_plus" | "hiera_large",
        "path": <out_dir's folder name, "sam" in a bundle>, "image_size": 1024}.

    Raises:
        BundleError: missing, truncated or unreadable file, not a state dict, non-float tensors,
            or a layout that is no official variant; the message names the file.
    """
    source = Path(checkpoint_path)
    state = _read_state_dict(source)
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    if _SAM2_PATCH_WEIGHT in state:
        variant = detect_sam2_variant(shapes, str(source))
        config = SAM2_CONFIGS[variant]
        with torch.device("meta"):
            kept = build_sam2_from_config(config).state_dict().keys()
        state = {key: state[key] for key in kept}
    elif _PATCH_WEIGHT in state:
        variant = detect_sam1_variant(shapes, str(source))
        config = OFFICIAL_CONFIGS[variant]
    else:
        raise BundleError(
            f"{source} is not a SAM 1 or SAM 2 state dict: no tensor {_PATCH_WEIGHT} "
            f"or {_SAM2_PATCH_WEIGHT}"
        )
    not_float = [key for key, value in state.items() if not value.is_floating_point()]
    if not_float:
        raise BundleError(f"{source}: tensors with a non-float dtype: {not_float[:5]}")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.contiguous() for key, value in state.items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt", "source": source.name})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    check_sam_dir(folder)
    return {
        "kind": config["kind"],
        "variant": variant,
        "path": folder.name,
        "image_size": config["image_size"],
    }
