"""The architectures of released Qwen-VL checkpoints, as their config.json files publish them.

These let tests build the real model classes at full size on the meta device (no weights, no
download) and push them through our code paths: model class selection, input-size checks, prompt
position ids, KV cache copies and decode steps, LoRA wrapping and merging. The values are those of
the `config.json` in each Hugging Face repository (the Qwen2.5-VL files keep the text fields at the
top level, as published with transformers 4.41; Qwen3-VL nests them in `text_config`), found with a
code search over public copies of those files; nothing here is downloaded at run time.

Parameter counts these configs give (tests check them): Qwen2.5-VL-3B 3.75e9 (embeddings tied),
Qwen2.5-VL-7B 8.29e9, Qwen3-VL-8B 8.77e9.
"""

from __future__ import annotations

import copy

from transformers import PreTrainedConfig, Qwen2_5_VLConfig, Qwen3VLConfig

_QWEN_TOKEN_IDS = {
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
}

_QWEN2_5_VL_VISION = {
    "depth": 32,
    "hidden_act": "silu",
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "in_chans": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "spatial_patch_size": 14,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
    "temporal_patch_size": 2,
}

#: Qwen/Qwen2.5-VL-3B-Instruct config.json.
QWEN2_5_VL_3B: dict = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    **_QWEN_TOKEN_IDS,
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 128000,
    "max_window_layers": 70,
    "num_attention_heads": 16,
    "num_hidden_layers": 36,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {**_QWEN2_5_VL_VISION, "out_hidden_size": 2048},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}

#: Qwen/Qwen2.5-VL-7B-Instruct config.json.
QWEN2_5_VL_7B: dict = {
    **QWEN2_5_VL_3B,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "max_window_layers": 28,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "tie_word_embeddings": False,
    "vision_config": {**_QWEN2_5_VL_VISION, "out_hidden_size": 3584},
    "vocab_size": 152064,
}

#: Qwen/Qwen3-VL-8B-Instruct config.json.
QWEN3_VL_8B: dict = {
    "architectures": ["Qwen3VLForConditionalGeneration"],
    "model_type": "qwen3_vl",
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
    "text_config": {
        "model_type": "qwen3_vl_text",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "dtype": "bfloat16",
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 12288,
        "max_position_embeddings": 262144,
        "num_attention_heads": 32,
        "num_hidden_layers": 36,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
        "rope_theta": 5000000,
        "use_cache": True,
        "vocab_size": 151936,
    },
    "vision_config": {
        "model_type": "qwen3_vl",
        "deepstack_visual_indexes": [8, 16, 24],
        "depth": 27,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1152,
        "in_channels": 3,
        "initializer_range": 0.02,
        "intermediate_size": 4304,
        "num_heads": 16,
        "num_position_embeddings": 2304,
        "out_hidden_size": 4096,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
}

#: name -> config.json content.
REAL_CONFIGS: dict[str, dict] = {
    "Qwen2.5-VL-3B-Instruct": QWEN2_5_VL_3B,
    "Qwen2.5-VL-7B-Instruct": QWEN2_5_VL_7B,
    "Qwen3-VL-8B-Instruct": QWEN3_VL_8B,
}


def real_config(name: str) -> PreTrainedConfig:
    """The transformers config object of a released checkpoint (a key of `REAL_CONFIGS`), parsed
    from its config.json content exactly as `from_pretrained` would."""
    content = copy.deepcopy(REAL_CONFIGS[name])
    config_class = {"qwen2_5_vl": Qwen2_5_VLConfig, "qwen3_vl": Qwen3VLConfig}[content["model_type"]]
    return config_class.from_dict(content)
