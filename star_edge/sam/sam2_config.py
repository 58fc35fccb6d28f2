"""The sam/config.json schema of SAM 2 / 2.1 (the `sam2` package's image path) and the official
hiera tiny / small / base+ / large hyper-parameters. No torch: usable by bundle checks and the CLI.

sam/config.json of kind "sam2" (all keys required, no others)::

    {
      "kind": "sam2",
      "variant": "hiera_tiny",            "hiera_tiny" | "hiera_small" | "hiera_base_plus"
                                          | "hiera_large"
      "image_size": 1024,                 square encoder input (px): the image is stretched to it
      "hiera_embed_dim": 96,              Hiera width of stage 1 (doubled at each later stage)
      "hiera_num_heads": 1,               heads of stage 1 (doubled at each later stage)
      "hiera_stages": [1, 2, 7, 2],       blocks per stage
      "hiera_global_attn_blocks": [5, 7, 9],    blocks with global attention
      "hiera_window_spec": [8, 4, 14, 7], window of the other blocks, per stage
      "hiera_pos_embed_size": [7, 7],     background position embedding (interpolated to the grid)
      "pixel_mean": [0.485, 0.456, 0.406],      RGB, 0-1 scale
      "pixel_std": [0.229, 0.224, 0.225],
      "mask_threshold": 0.0               logit threshold of the final masks
    }

The values come from the official configs (sam2/configs/sam2.1/sam2.1_hiera_{t,s,b+,l}.yaml); the
rest of the image path is the same for every variant and fixed in `star_edge.sam.sam2_model`.
SAM 2.0 and 2.1 share this image path: they differ in the video-memory modules only.
"""

from __future__ import annotations

from numbers import Real
from typing import Any

from star_edge.errors import InvalidInputError
from star_edge.sam.config_checks import check_header, is_int

VARIANTS = ("hiera_tiny", "hiera_small", "hiera_base_plus", "hiera_large")
STAGE_COUNT = 4
"""Hiera stages; each later one halves the grid and doubles width and heads."""
FEATURE_STRIDE = 32
"""Total downsampling of the last Hiera stage: image_size must be a multiple of it."""
PATCH_STRIDE = 4
"""Downsampling of the patch embedding (the grid of stage 1 is image_size / 4)."""

_SHARED_OFFICIAL = {
    "kind": "sam2",
    "image_size": 1024,
    "hiera_window_spec": [8, 4, 14, 7],
    "hiera_pos_embed_size": [7, 7],
    "pixel_mean": [0.485, 0.456, 0.406],
    "pixel_std": [0.229, 0.224, 0.225],
    "mask_threshold": 0.0,
}

SAM2_CONFIGS: dict[str, dict[str, Any]] = {
    "hiera_tiny": {
        **_SHARED_OFFICIAL,
        "variant": "hiera_tiny",
        "hiera_embed_dim": 96,
        "hiera_num_heads": 1,
        "hiera_stages": [1, 2, 7, 2],
        "hiera_global_attn_blocks": [5, 7, 9],
    },
    "hiera_small": {
        **_SHARED_OFFICIAL,
        "variant": "hiera_small",
        "hiera_embed_dim": 96,
        "hiera_num_heads": 1,
        "hiera_stages": [1, 2, 11, 2],
        "hiera_global_attn_blocks": [7, 10, 13],
    },
    "hiera_base_plus": {
        **_SHARED_OFFICIAL,
        "variant": "hiera_base_plus",
        "hiera_embed_dim": 112,
        "hiera_num_heads": 2,
        "hiera_stages": [2, 3, 16, 3],
        "hiera_global_attn_blocks": [12, 16, 20],
        "hiera_pos_embed_size": [14, 14],
    },
    "hiera_large": {
        **_SHARED_OFFICIAL,
        "variant": "hiera_large",
        "hiera_embed_dim": 144,
        "hiera_num_heads": 2,
        "hiera_stages": [2, 6, 36, 4],
        "hiera_global_attn_blocks": [23, 33, 43],
        "hiera_window_spec": [8, 4, 16, 8],
    },
}
"""The official SAM 2.1 image-path hyper-parameters, in sam/config.json form."""

CONFIG_KEYS = frozenset(
    (
        "kind",
        "variant",
        "image_size",
        "hiera_embed_dim",
        "hiera_num_heads",
        "hiera_stages",
        "hiera_global_attn_blocks",
        "hiera_window_spec",
        "hiera_pos_embed_size",
        "pixel_mean",
        "pixel_std",
        "mask_threshold",
    )
)


def _fail(message: str) -> InvalidInputError:
    return InvalidInputError(f"SAM 2 config: {message}")


def _is_number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _int_list(config: dict[str, Any], key: str, length: int | None, low: int) -> list[int]:
    """config[key] as a list of ints >= low (of `length` entries when given), else raise."""
    value = config[key]
    fits = isinstance(value, list) and all(is_int(v) and v >= low for v in value)
    if not fits or (length is not None and len(value) != length):
        size = f"{length} " if length is not None else ""
        raise _fail(f"{key} must be a list of {size}ints >= {low}, got {value!r}")
    return value


def _check_vector3(config: dict[str, Any], key: str, positive: bool) -> None:
    value = config[key]
    if not (isinstance(value, list) and len(value) == 3 and all(_is_number(v) for v in value)):
        raise _fail(f"{key} must be a list of 3 numbers, got {value!r}")
    if positive and not all(v > 0 for v in value):
        raise _fail(f"{key} must be positive, got {value!r}")


def check_sam2_config(config: dict[str, Any]) -> None:
    """Check a sam/config.json dict of kind "sam2": exact key set, types, and the divisibility
    the Hiera encoder needs (image_size a multiple of 32, the stage-1 grid a multiple of its
    window, the width a multiple of the heads).

    Raises:
        InvalidInputError: naming the first offending key and its value.
    """
    check_header(config, CONFIG_KEYS, "sam2", VARIANTS, _fail)
    for key in ("image_size", "hiera_embed_dim", "hiera_num_heads"):
        if not (is_int(config[key]) and config[key] > 0):
            raise _fail(f"{key} must be a positive int, got {config[key]!r}")
    depth = sum(_int_list(config, "hiera_stages", STAGE_COUNT, 1))
    blocks = _int_list(config, "hiera_global_attn_blocks", None, 0)
    if any(block >= depth for block in blocks):
        raise _fail(f"hiera_global_attn_blocks must be in [0, {depth}), got {blocks!r}")
    windows = _int_list(config, "hiera_window_spec", STAGE_COUNT, 1)
    _int_list(config, "hiera_pos_embed_size", 2, 1)
    _check_vector3(config, "pixel_mean", positive=False)
    _check_vector3(config, "pixel_std", positive=True)
    if not _is_number(config["mask_threshold"]):
        raise _fail(f"mask_threshold must be a number, got {config['mask_threshold']!r}")
    image_size = config["image_size"]
    if image_size % FEATURE_STRIDE:
        raise _fail(f"image_size must be a multiple of {FEATURE_STRIDE}, got {image_size}")
    if (image_size // PATCH_STRIDE) % windows[0]:
        raise _fail(
            f"image_size / {PATCH_STRIDE} = {image_size // PATCH_STRIDE} is not a multiple of "
            f"the first window {windows[0]} (hiera_window_spec[0])"
        )
    if config["hiera_embed_dim"] % config["hiera_num_heads"]:
        raise _fail(
            f"hiera_embed_dim {config['hiera_embed_dim']} is not a multiple of "
            f"hiera_num_heads {config['hiera_num_heads']}"
        )
