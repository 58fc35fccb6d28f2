"""Read a bundle's sam/ folder (config.json + model.safetensors) into a segment_anything `Sam`
(kind "sam1") or a `sam2_model.Sam2Image` (kind "sam2": SAM 2 / 2.1, schema in `sam2_config`).

sam/config.json of kind "sam1" (all keys required, no others; checked by `official.check_config`)::

    {
      "kind": "sam1",                       SAM 1 (segment_anything)
      "variant": "vit_b",                   "vit_b" | "vit_l" | "vit_h" | "tiny"
      "image_size": 1024,                   square encoder input (px), longest side resized to it
      "patch_size": 16,                     ViT patch; embedding grid = image_size / patch_size
      "encoder_embed_dim": 768,             ViT width
      "encoder_depth": 12,                  ViT blocks
      "encoder_num_heads": 12,
      "encoder_global_attn_indexes": [2, 5, 8, 11],   blocks with global attention
      "encoder_window_size": 14,            window of the other blocks
      "prompt_embed_dim": 256,              encoder output channels = prompt/decoder width
      "decoder_depth": 2,                   TwoWayTransformer layers
      "decoder_mlp_dim": 2048,
      "decoder_num_heads": 8,
      "iou_head_depth": 3,
      "iou_head_hidden_dim": 256,
      "num_multimask_outputs": 3,
      "pixel_mean": [123.675, 116.28, 103.53],        RGB, 0-255 scale
      "pixel_std": [58.395, 57.12, 57.375],
      "mask_threshold": 0.0                 logit threshold of the final masks
    }

`official.OFFICIAL_CONFIGS` holds the vit_b / vit_l / vit_h values. model.safetensors holds the
`Sam.state_dict()` tensors (float32 or float16/bfloat16, loaded as float32) under the official key
names, so a converted official checkpoint loads unchanged. For kind "sam2" it holds the
`Sam2Image.state_dict()` tensors: the image-path subset of an official SAM 2.1 checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from star_edge.descriptions import read_json
from star_edge.errors import BackendUnavailableError, BundleError, InvalidInputError
from star_edge.sam.official import build_sam_from_config, check_config
from star_edge.sam.sam2_config import check_sam2_config
from star_edge.sam.sam2_model import build_sam2_from_config

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_LISTED_KEYS = 5


def resolve_device(device: str | torch.device) -> torch.device:
    """Parse a device name ("cpu", "cuda", "cuda:1") and check that it can run here.

    "cuda" resolves to the current CUDA device with its index ("cuda:0"), so that it compares
    equal to the device of the tensors placed there.

    Raises:
        InvalidInputError: not a device name torch knows.
        BackendUnavailableError: a CUDA device without CUDA, or an index past the device count.
    """
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        message = f"device must be a torch device name such as 'cpu' or 'cuda', got {device!r}"
        raise InvalidInputError(message) from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"device {device!r} needs CUDA, which this torch build or machine lacks; "
                "install a CUDA build of torch (https://pytorch.org/get-started/locally/) "
                "or use device='cpu'"
            )
        if resolved.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        if resolved.index >= torch.cuda.device_count():
            raise BackendUnavailableError(
                f"device {device!r} does not exist: "
                f"{torch.cuda.device_count()} CUDA device(s) present"
            )
    elif resolved.type != "cpu":
        raise InvalidInputError(f"device must be 'cpu' or 'cuda[:index]', got {device!r}")
    return resolved


def read_sam_config(directory: str | Path) -> dict[str, Any]:
    """Read and check `directory/config.json`.

    Raises:
        BundleError: the folder or file is missing, is not JSON, or fails the schema; the message
            names the file.
    """
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        expected = f"{CONFIG_FILE} + {WEIGHTS_FILE}"
        raise BundleError(f"SAM folder {directory} is missing (expected {expected})")
    config = read_json(path, "the SAM config")
    try:
        if isinstance(config, dict) and config.get("kind") == "sam2":
            check_sam2_config(config)
        else:
            check_config(config)
    except InvalidInputError as exc:
        raise BundleError(f"{path}: {exc}") from exc
    return config


def _build(config: dict[str, Any]) -> torch.nn.Module:
    """The untrained model a checked config describes, on torch's current default device."""
    if config["kind"] == "sam2":
        return build_sam2_from_config(config)
    return build_sam_from_config(config)


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED_KEYS])
    return shown + (f" and {len(names) - _LISTED_KEYS} more" if len(names) > _LISTED_KEYS else "")


def _check_tensor_layout(path: Path, expected: dict[str, torch.Tensor]) -> None:
    """Compare the header of a safetensors file with the expected keys, shapes and float dtypes."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            found = {key: handle.get_slice(key) for key in handle.keys()}
            layout = {key: (tuple(s.get_shape()), s.get_dtype()) for key, s in found.items()}
    except (SafetensorError, OSError) as exc:
        raise BundleError(f"{path} is truncated or corrupt: {exc}") from exc
    mismatch = f"{path} does not match {CONFIG_FILE}"
    missing = sorted(expected.keys() - layout.keys())
    unexpected = sorted(layout.keys() - expected.keys())
    if missing:
        raise BundleError(f"{mismatch}: missing tensors {_listed(missing)}")
    if unexpected:
        raise BundleError(f"{mismatch}: unexpected tensors {_listed(unexpected)}")
    for key, tensor in expected.items():
        shape, dtype = layout[key]
        if shape != tuple(tensor.shape):
            raise BundleError(
                f"{mismatch}: tensor {key} has shape {list(shape)}, expected {list(tensor.shape)}"
            )
        if dtype not in ("F32", "F16", "BF16"):
            raise BundleError(f"{path}: tensor {key} has dtype {dtype}, expected a float dtype")


def check_sam_dir(directory: str | Path) -> dict[str, Any]:
    """Check a sam/ folder without loading its tensors: the config schema, and the safetensors
    header (keys, shapes, float dtypes) against the architecture the config describes.

    Returns the config.

    Raises:
        BundleError: as `load_sam`, naming the file.
    """
    config = read_sam_config(directory)
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise BundleError(f"{weights} is missing (expected the SAM weights)")
    with torch.device("meta"):
        sam = _build(config)
    _check_tensor_layout(weights, sam.state_dict())
    return config


def load_sam(directory: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load a bundle's sam/ folder as a segment_anything `Sam` (kind "sam1") or a `Sam2Image`
    (kind "sam2") in eval mode, float32, on `device`.

    The model is built on the meta device (no random initialisation), the safetensors header is
    checked against it, and the tensors are then assigned in place.

    Raises:
        BundleError: missing, unreadable, truncated or mismatched config.json / model.safetensors;
            the message names the file and what was expected.
        InvalidInputError, BackendUnavailableError: see `resolve_device`.
    """
    target = resolve_device(device)
    config = check_sam_dir(directory)
    weights = Path(directory) / WEIGHTS_FILE
    with torch.device("meta"):
        sam = _build(config)
    try:
        with safe_open(str(weights), framework="pt", device=str(target)) as handle:
            state = {key: handle.get_tensor(key).float() for key in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise BundleError(f"{weights} is truncated or corrupt: {exc}") from exc
    sam.load_state_dict(state, strict=True, assign=True)
    if config["kind"] == "sam2":
        return sam.eval()
    # Not in the state dict (non-persistent buffers): the pixel statistics come from the config.
    sam.register_buffer("pixel_mean", _column(config["pixel_mean"], target), persistent=False)
    sam.register_buffer("pixel_std", _column(config["pixel_std"], target), persistent=False)
    return sam.eval()


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    """(3,) numbers -> (3, 1, 1) float32 tensor on `device`."""
    return torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1)
