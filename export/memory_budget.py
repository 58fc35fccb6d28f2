"""Memory a deployment needs per model size, computed from the released architectures (not measured).

`python -m star_edge.export.memory_budget` prints the README's table ("TensorRT and Jetson"). The
parameter counts come from building the models on the meta device (no weights): Qwen2.5-VL-3B/7B
from `real_configs`, SAM ViT-B/L/H from segment_anything's official hyper-parameters. What counts:

- reasoner weights as the exported graphs hold them: vision tower, embedding table and decoder
  (layers, final norm, output head). A tied output head (Qwen2.5-VL-3B) is held twice, once by the
  embedding graph and once by the decoder graph.
- "int8": the decoder's matrix weights (its linear layers and the output head) at 1 byte, the rest
  at 2 bytes (the dynamic-int8 decoders of `export --int8`; the TensorRT engines built here are
  fp16 or fp32).
- KV cache: float32 (the decoder graph's inputs and outputs stay float32, also in fp16 engines),
  N rows of prompt + max_new_tokens tokens, plus the shared prompt's own cache; a decoding step
  holds the past and the present cache at once, so the peak is about twice the rows' cache.
- activations and TensorRT's workspace are not included (the workspace limit defaults to 1 GiB).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from star_edge.export.merge import DEFAULT_INPUT_SIZE
from star_edge.export.real_configs import real_config
from star_edge.reasoner.torch_backend import FAMILIES
from star_edge.sam.official import OFFICIAL_CONFIGS, build_sam_from_config

GIB = 1 << 30
#: Text tokens of the prompt around the image (template and query), an assumption.
TEXT_TOKENS = 128
MAX_NEW_TOKENS = 1024
SAMPLES = 8
KV_BYTES = 4


@dataclass(frozen=True)
class ReasonerBudget:
    """Bytes of one reasoner deployment (see the module doc)."""

    name: str
    parameters: int
    weights_fp16: int
    weights_int8: int
    prompt_tokens: int
    kv_bytes_per_token: int
    kv_rows: int
    kv_peak: int


def reasoner_budget(name: str, samples: int = SAMPLES, max_new_tokens: int = MAX_NEW_TOKENS) -> ReasonerBudget:
    """The budget of a released Qwen-VL (a key of `real_configs.REAL_CONFIGS`)."""
    config = real_config(name)
    with torch.device("meta"):
        model = FAMILIES[config.model_type][0](config)
    text = config.get_text_config()
    vision = sum(p.numel() for p in model.model.visual.parameters())
    embedding = model.model.language_model.embed_tokens.weight.numel()
    layers = model.model.language_model.layers
    linear = sum(m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear))
    layer_other = sum(p.numel() for p in layers.parameters()) - linear
    head = model.lm_head.weight.numel()  # held by the decoder graph even when tied to the embedding
    norm = sum(p.numel() for p in model.model.language_model.norm.parameters())
    held = vision + embedding + linear + layer_other + norm + head
    side = DEFAULT_INPUT_SIZE[config.model_type]
    merge = config.vision_config.patch_size * config.vision_config.spatial_merge_size
    prompt = (side // merge) ** 2 + TEXT_TOKENS
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * KV_BYTES
    rows = samples * (prompt + max_new_tokens) * per_token
    return ReasonerBudget(name, sum(p.numel() for p in model.parameters()), 2 * held,
                          (linear + head) + 2 * (held - linear - head), prompt, per_token, rows,
                          2 * rows + prompt * per_token)


def sam_parameters(variant: str) -> int:
    """Parameters of an official SAM 1 variant ("vit_b", "vit_l", "vit_h")."""
    with torch.device("meta"):
        sam = build_sam_from_config(OFFICIAL_CONFIGS[variant])
    return sum(p.numel() for p in sam.parameters())


def markdown_table() -> str:
    """The README table, one row per model."""
    lines = ["| model | parameters | weights fp16 | weights int8 | KV cache N=8 (peak) | fp16 + KV peak |",
             "|---|---|---|---|---|---|"]
    for name in ("Qwen2.5-VL-3B-Instruct", "Qwen2.5-VL-7B-Instruct"):
        b = reasoner_budget(name)
        lines.append(f"| {name} ({b.prompt_tokens}-token prompt, {MAX_NEW_TOKENS} new) | {b.parameters / 1e9:.2f} B "
                     f"| {b.weights_fp16 / GIB:.1f} GiB | {b.weights_int8 / GIB:.1f} GiB "
                     f"| {b.kv_rows / GIB:.2f} GiB ({b.kv_peak / GIB:.2f} GiB) "
                     f"| {(b.weights_fp16 + b.kv_peak) / GIB:.1f} GiB |")
    for variant in ("vit_b", "vit_l", "vit_h"):
        count = sam_parameters(variant)
        lines.append(f"| SAM {variant} | {count / 1e6:.0f} M | {2 * count / GIB:.2f} GiB | - | - | "
                     f"{2 * count / GIB:.2f} GiB |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
