"""Released Qwen2.5-VL-3B/7B and Qwen3-VL-8B architectures through our code paths, on the meta
device (full size, no weights): model classes, input sizes, prompt position ids, the shared-prefill
cache copy / row selection / decode step, and LoRA wrapping + merging at StAR's rank."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import DynamicCache

from star_edge.export.merge import DEFAULT_INPUT_SIZE, probe_inputs
from star_edge.export.real_configs import REAL_CONFIGS, real_config
from star_edge.reasoner import sampling
from star_edge.reasoner.torch_backend import FAMILIES

# peft's get_peft_model calls a transformers method deprecated in 5.x
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

PARAMETERS = {"Qwen2.5-VL-3B-Instruct": 3.7546e9, "Qwen2.5-VL-7B-Instruct": 8.2922e9, "Qwen3-VL-8B-Instruct": 8.7671e9}
STAR_LORA = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def _meta_model(name: str) -> torch.nn.Module:
    config = real_config(name)
    with torch.device("meta"):
        return FAMILIES[config.model_type][0](config).eval()


def _prompt(config, side: int, text_before: int = 12, text_after: int = 40) -> dict[str, torch.Tensor]:
    """A prompt the processor would build for a side x side image: input ids (1, L) on the CPU."""
    vision = config.vision_config
    grid = side // vision.patch_size
    image_tokens = (grid // vision.spatial_merge_size) ** 2
    ids = ([100] * text_before + [config.vision_start_token_id] + [config.image_token_id] * image_tokens
           + [config.vision_end_token_id] + [200] * text_after)
    input_ids = torch.tensor([ids])
    return {"input_ids": input_ids, "mm_token_type_ids": (input_ids == config.image_token_id).long(),
            "image_grid_thw": torch.tensor([[1, grid, grid]])}


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_released_architectures_build_with_their_published_sizes(name):
    model = _meta_model(name)
    assert type(model) is FAMILIES[model.config.model_type][0]
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(PARAMETERS[name], rel=1e-4)
    vision = model.config.vision_config
    assert DEFAULT_INPUT_SIZE[model.config.model_type] % (vision.patch_size * vision.spatial_merge_size) == 0
    probe = probe_inputs(model.config)
    assert probe["pixel_values"].shape == (16, 3 * 2 * vision.patch_size**2)
    assert int(probe["mm_token_type_ids"].sum()) == 4


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_prompt_positions_and_the_shared_prefill_decode_path(name):
    model = _meta_model(name)
    config = model.config
    side = DEFAULT_INPUT_SIZE[config.model_type]
    inputs = _prompt(config, side)
    grid = side // config.vision_config.patch_size // config.vision_config.spatial_merge_size
    length = inputs["input_ids"].shape[1]
    positions = sampling.prompt_position_ids(model, inputs)
    assert positions.shape == (4, 1, length)
    assert positions[0, 0].tolist() == list(range(length))
    # the image takes `grid` positions instead of grid**2: text after it is shifted by grid - grid**2
    assert positions[1:, 0, -1].tolist() == [length - 1 + grid - grid * grid] * 3
    assert positions[1:, 0, 13:13 + grid * grid].amax().item() == 13 + grid - 1

    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    cache = DynamicCache(config=config)
    with torch.inference_mode():
        prefill = model(input_ids=inputs["input_ids"].to("meta"), position_ids=positions.to("meta"), cache=cache,
                        use_cache=True, logits_to_keep=1)
        assert prefill.logits.shape == (1, 1, text.vocab_size)
        rows = sampling.copy_rows(prefill.cache, 8, config)
        assert rows.layers[0].keys.shape == (8, text.num_key_value_heads, length, head_dim)
        assert prefill.cache.layers[0].keys.shape[0] == 1, "the prefill's own cache stays batch 1"
        rows.batch_select_indices(torch.tensor([0, 3, 5], device="meta"))
        logits = sampling.decode_step(model, rows, torch.zeros(3, dtype=torch.long, device="meta"),
                                      positions[..., -1:].to("meta") + 1)
    assert logits.shape == (3, text.vocab_size) and logits.dtype == torch.float32
    assert rows.get_seq_length() == length + 1 and len(rows.layers) == text.num_hidden_layers


@pytest.mark.parametrize("name", ["Qwen2.5-VL-7B-Instruct", "Qwen3-VL-8B-Instruct"])
def test_star_lora_wraps_every_language_linear_and_merges_away(name):
    model = _meta_model(name)
    text = model.config.get_text_config()
    wrapped = get_peft_model(model, LoraConfig(r=64, lora_alpha=64, target_modules=STAR_LORA))
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    q, kv = text.num_attention_heads * head_dim, text.num_key_value_heads * head_dim
    width, mlp = text.hidden_size, text.intermediate_size
    per_layer = 64 * ((width + q) * 2 + (width + kv) * 2 + (width + mlp) * 3)
    lora = sum(p.numel() for n, p in wrapped.named_parameters() if "lora_" in n)
    assert lora == per_layer * text.num_hidden_layers
    merged = wrapped.merge_and_unload()
    assert not any("lora" in key for key in merged.state_dict())
    assert sum(p.numel() for p in merged.parameters()) == pytest.approx(PARAMETERS[name], rel=1e-4)
