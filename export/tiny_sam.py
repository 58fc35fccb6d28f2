"""The demo model's tiny SAM: build it (untrained, deterministic per seed), write a sam/ folder.

Same architecture as the official SAM 1 (segment_anything's own classes), scaled down: ViT embed
128, depth 4 (global attention in blocks 1 and 3, 8x8 windows elsewhere), 256 px input, 16x16
embedding, decoder width 64; about 1.2 M parameters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from star_edge.sam.checkpoints import CONFIG_FILE, WEIGHTS_FILE
from star_edge.sam.official import build_sam_from_config, check_config

TINY_SAM_CONFIG: dict[str, Any] = {
    "kind": "sam1",
    "variant": "tiny",
    "image_size": 256,
    "patch_size": 16,
    "encoder_embed_dim": 128,
    "encoder_depth": 4,
    "encoder_num_heads": 4,
    "encoder_global_attn_indexes": [1, 3],
    "encoder_window_size": 8,
    "prompt_embed_dim": 64,
    "decoder_depth": 2,
    "decoder_mlp_dim": 256,
    "decoder_num_heads": 4,
    "iou_head_depth": 3,
    "iou_head_hidden_dim": 64,
    "num_multimask_outputs": 3,
    "pixel_mean": [123.675, 116.28, 103.53],
    "pixel_std": [58.395, 57.12, 57.375],
    "mask_threshold": 0.0,
}


def make_tiny_sam(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the untrained tiny SAM (eval mode, float32, CPU) and a copy of its config.

    The same seed gives the same weights; torch's global random state is left untouched.
    """
    config = json.loads(json.dumps(TINY_SAM_CONFIG))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device("cpu"):
            sam = build_sam_from_config(config)
    return sam, config


def write_sam_dir(
    sam: torch.nn.Module,
    config: dict[str, Any],
    directory: str | Path,
    dtype: torch.dtype = torch.float32,
) -> list[Path]:
    """Write `directory/config.json` and `directory/model.safetensors` (the state dict in `dtype`:
    torch.float32, float16 or bfloat16; the runtime loads each as float32).

    Creates the directory if needed and overwrites both files. Returns their paths
    [config.json, model.safetensors].

    Raises:
        InvalidInputError: `config` fails the sam/config.json schema.
    """
    check_config(config)
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / CONFIG_FILE
    weights_path = folder / WEIGHTS_FILE
    state = {
        key: tensor.detach().to("cpu", dtype).contiguous()
        for key, tensor in sam.state_dict().items()
    }
    save_file(state, str(weights_path), metadata={"format": "pt"})
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return [config_path, weights_path]
