"""segment_anything's SAM 1 architecture, imported without torchvision and built from a config dict.

segment_anything/__init__.py imports its predictor, which imports torchvision; the model classes
(`segment_anything.modeling`) need only torch. `import_segment_anything` registers a bare
`segment_anything` package (its __init__ not run) and imports the modeling subpackage from it.

This module imports torch only inside `import_segment_anything` and `build_sam_from_config`, so the
config schema (`check_config`, `OFFICIAL_CONFIGS`) is usable without torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from functools import partial
from numbers import Real
from typing import TYPE_CHECKING, Any

from star_edge.errors import BackendUnavailableError, InvalidInputError
from star_edge.sam.config_checks import check_header, is_int

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

VARIANTS = ("vit_b", "vit_l", "vit_h", "tiny")

_SHARED_OFFICIAL = {
    "kind": "sam1",
    "image_size": 1024,
    "patch_size": 16,
    "encoder_window_size": 14,
    "prompt_embed_dim": 256,
    "decoder_depth": 2,
    "decoder_mlp_dim": 2048,
    "decoder_num_heads": 8,
    "iou_head_depth": 3,
    "iou_head_hidden_dim": 256,
    "num_multimask_outputs": 3,
    "pixel_mean": [123.675, 116.28, 103.53],
    "pixel_std": [58.395, 57.12, 57.375],
    "mask_threshold": 0.0,
}

OFFICIAL_CONFIGS: dict[str, dict[str, Any]] = {
    "vit_b": {
        **_SHARED_OFFICIAL,
        "variant": "vit_b",
        "encoder_embed_dim": 768,
        "encoder_depth": 12,
        "encoder_num_heads": 12,
        "encoder_global_attn_indexes": [2, 5, 8, 11],
    },
    "vit_l": {
        **_SHARED_OFFICIAL,
        "variant": "vit_l",
        "encoder_embed_dim": 1024,
        "encoder_depth": 24,
        "encoder_num_heads": 16,
        "encoder_global_attn_indexes": [5, 11, 17, 23],
    },
    "vit_h": {
        **_SHARED_OFFICIAL,
        "variant": "vit_h",
        "encoder_embed_dim": 1280,
        "encoder_depth": 32,
        "encoder_num_heads": 16,
        "encoder_global_attn_indexes": [7, 15, 23, 31],
    },
}
"""The hyper-parameters of segment_anything's build_sam_vit_b / _l / _h, in sam/config.json form."""

# Fixed by the SAM 1 architecture (segment_anything/build_sam.py), not part of the config.
_MLP_RATIO = 4.0
_LAYER_NORM_EPS = 1e-6
_MASK_IN_CHANS = 16

_POSITIVE_INT_KEYS = (
    "image_size",
    "patch_size",
    "encoder_embed_dim",
    "encoder_depth",
    "encoder_num_heads",
    "prompt_embed_dim",
    "decoder_depth",
    "decoder_mlp_dim",
    "decoder_num_heads",
    "iou_head_depth",
    "iou_head_hidden_dim",
    "num_multimask_outputs",
)
CONFIG_KEYS = frozenset(
    _POSITIVE_INT_KEYS
    + (
        "kind",
        "variant",
        "encoder_global_attn_indexes",
        "encoder_window_size",
        "pixel_mean",
        "pixel_std",
        "mask_threshold",
    )
)


def import_segment_anything() -> types.ModuleType:
    """Return `segment_anything.modeling` (ImageEncoderViT, PromptEncoder, MaskDecoder,
    TwoWayTransformer, Sam) without importing torchvision.

    If `segment_anything` is already imported (the real package or our bare one), it is reused.
    Otherwise a bare package module is registered in sys.modules, so that later imports of its
    torch-only submodules (`segment_anything.modeling`, `.build_sam`) work; the names its
    __init__ would define (`SamPredictor`, `sam_model_registry`) are then absent.

    Raises:
        BackendUnavailableError: segment-anything is not installed.
    """
    if "segment_anything" not in sys.modules:
        spec = importlib.util.find_spec("segment_anything")
        if spec is None or spec.submodule_search_locations is None:
            raise BackendUnavailableError(
                "segment-anything is not installed; install it with: pip install 'star-edge[torch]'"
            )
        sys.modules["segment_anything"] = importlib.util.module_from_spec(spec)
    return importlib.import_module("segment_anything.modeling")


def _fail(message: str) -> InvalidInputError:
    return InvalidInputError(f"SAM config: {message}")


def _is_number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _check_vector3(config: dict[str, Any], key: str, positive: bool) -> None:
    value = config[key]
    if not (isinstance(value, list) and len(value) == 3 and all(_is_number(v) for v in value)):
        raise _fail(f"{key} must be a list of 3 numbers, got {value!r}")
    if positive and not all(v > 0 for v in value):
        raise _fail(f"{key} must be positive, got {value!r}")


def check_config(config: dict[str, Any]) -> None:
    """Check a sam/config.json dict: exact key set, types, and the divisibility SAM needs.

    Raises:
        InvalidInputError: naming the first offending key and its value.
    """
    check_header(config, CONFIG_KEYS, "sam1", VARIANTS, _fail)
    for key in _POSITIVE_INT_KEYS:
        if not (is_int(config[key]) and config[key] > 0):
            raise _fail(f"{key} must be a positive int, got {config[key]!r}")
    window = config["encoder_window_size"]
    if not (is_int(window) and window >= 0):
        raise _fail(f"encoder_window_size must be an int >= 0, got {window!r}")
    depth = config["encoder_depth"]
    indexes = config["encoder_global_attn_indexes"]
    if not (isinstance(indexes, list) and all(is_int(i) and 0 <= i < depth for i in indexes)):
        raise _fail(
            f"encoder_global_attn_indexes must be a list of ints in [0, {depth}), got {indexes!r}"
        )
    _check_vector3(config, "pixel_mean", positive=False)
    _check_vector3(config, "pixel_std", positive=True)
    if not _is_number(config["mask_threshold"]):
        raise _fail(f"mask_threshold must be a number, got {config['mask_threshold']!r}")
    image_size, patch_size = config["image_size"], config["patch_size"]
    if image_size % patch_size:
        raise _fail(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    if config["encoder_embed_dim"] % config["encoder_num_heads"]:
        raise _fail(
            f"encoder_embed_dim {config['encoder_embed_dim']} is not a multiple of "
            f"encoder_num_heads {config['encoder_num_heads']}"
        )
    dim = config["prompt_embed_dim"]
    if dim % 8:
        raise _fail(f"prompt_embed_dim must be a multiple of 8, got {dim}")
    # The decoder's cross-attention runs at half width (TwoWayTransformer's downsample rate 2).
    if (dim // 2) % config["decoder_num_heads"]:
        raise _fail(f"prompt_embed_dim / 2 = {dim // 2} is not a multiple of decoder_num_heads")


def build_sam_from_config(config: dict[str, Any]) -> Sam:
    """Build an untrained segment_anything `Sam` (eval mode) from a checked sam/config.json dict.

    Parameters are created on torch's current default device (use `with torch.device("meta")` to
    build without allocating or initialising weights). The official hyper-parameters not in the
    config are fixed as in segment_anything/build_sam.py: MLP ratio 4, qkv bias, relative position
    embeddings, LayerNorm eps 1e-6, mask-prompt channels 16.

    Raises:
        InvalidInputError: the config fails `check_config`.
        BackendUnavailableError: segment-anything is not installed.
    """
    check_config(config)
    import torch

    modeling = import_segment_anything()
    dim = config["prompt_embed_dim"]
    grid = config["image_size"] // config["patch_size"]
    sam = modeling.Sam(
        image_encoder=modeling.ImageEncoderViT(
            img_size=config["image_size"],
            patch_size=config["patch_size"],
            embed_dim=config["encoder_embed_dim"],
            depth=config["encoder_depth"],
            num_heads=config["encoder_num_heads"],
            mlp_ratio=_MLP_RATIO,
            out_chans=dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=_LAYER_NORM_EPS),
            use_rel_pos=True,
            window_size=config["encoder_window_size"],
            global_attn_indexes=tuple(config["encoder_global_attn_indexes"]),
        ),
        prompt_encoder=modeling.PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(config["image_size"], config["image_size"]),
            mask_in_chans=_MASK_IN_CHANS,
        ),
        mask_decoder=modeling.MaskDecoder(
            transformer_dim=dim,
            transformer=modeling.TwoWayTransformer(
                depth=config["decoder_depth"],
                embedding_dim=dim,
                mlp_dim=config["decoder_mlp_dim"],
                num_heads=config["decoder_num_heads"],
            ),
            num_multimask_outputs=config["num_multimask_outputs"],
            iou_head_depth=config["iou_head_depth"],
            iou_head_hidden_dim=config["iou_head_hidden_dim"],
        ),
        pixel_mean=[float(v) for v in config["pixel_mean"]],
        pixel_std=[float(v) for v in config["pixel_std"]],
    )
    sam.mask_threshold = float(config["mask_threshold"])
    return sam.eval()
