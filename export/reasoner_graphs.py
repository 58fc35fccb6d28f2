"""The reasoner as three exportable graphs: vision tower, token embedding, decoder with KV cache.

Each module wraps the parts of a Hugging Face Qwen2.5-VL / Qwen3-VL model (its own submodules, its
own weights) with plain tensors in and out, so torch.export can trace it and onnxruntime can run it
without the model classes:

- `VisionGraph`: pixel_values (P, D) -> image_features (N, hidden) and, for Qwen3-VL, the deepstack
  features (K, N, hidden) of the vision blocks the language model adds back in its first K layers.
  The image grid is fixed by the bundle's input size, so everything the tower derives from the grid
  (rotary positions, windows, position-embedding interpolation) is computed once here, on the host,
  and enters the graph as constants: the helpers of `transformers.vision_utils` exist for this.
- `EmbedGraph`: input_ids (B, S) -> inputs_embeds (B, S, hidden).
- `DecoderGraph`: inputs_embeds, the three M-RoPE position rows, an attention mask over past and new
  tokens, Qwen3-VL's deepstack residuals, and each layer's past keys and values -> the last
  position's logits and each layer's present keys and values. One graph serves prefill (past length
  0) and decoding (sequence 1) at any batch size.

The decoder runs the model's own decoder layers, rotary embedding, norm and head in the model's
order; what it does itself: the causal + padding mask (boolean, from the text positions past..
past+S-1), deepstack as a dense residual (zero outside the image tokens, so adding it equals the
model's masked add at the image rows), and the head on the last position only (what
`logits_to_keep=1` computes).

Packed attention. The vision towers attend within segments given by cumulative lengths (whole
image; Qwen2.5-VL's windows). Their non-flash path splits the sequence at lengths read from a
tensor, which torch.export cannot trace; the flash path hands the lengths to the attention function
instead. `packed_attention` registers such a function (its name must contain "flash" for the model
to take that path): ordinary scaled dot-product attention with a block-diagonal mask built from the
lengths. It computes what the split computes (on Qwen2.5-VL's windowed blocks the masked
full-length attention costs more, a known price of this export).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache, PreTrainedModel
from transformers import vision_utils

#: The attention implementation registered by `packed_attention` (see the module doc for the name).
PACKED_ATTENTION = "flash_packed_sdpa_star_edge"


def _packed_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Attention of (1, heads, L, dim) tensors within the segments that `cu_seq_lens_q` (K + 1,)
    bounds; returns (1, L, heads, dim), the layout of Hugging Face's attention functions."""
    length = query.shape[2]
    segment = (torch.arange(length, device=query.device)[:, None] >= cu_seq_lens_q[None, 1:-1]).sum(-1)
    mask = segment[:, None] == segment[None, :]
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return output.transpose(1, 2).contiguous(), None


@contextmanager
def packed_attention(vision: PreTrainedModel) -> Iterator[None]:
    """Run `vision` (a Qwen-VL vision tower) with `_packed_sdpa` inside the block."""
    AttentionInterface.register(PACKED_ATTENTION, _packed_sdpa)
    config = vision.config
    previous = config._attn_implementation
    config._attn_implementation = PACKED_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous


class VisionGraph(torch.nn.Module):
    """The vision tower for one fixed image grid.

    forward(pixel_values (P, D) float32) -> image_features (N, hidden) [, deepstack (K, N, hidden)]
    with P = t * h * w patches, N = P / merge**2 image tokens, K = deepstack layers (Qwen3-VL).
    Run it inside `packed_attention(model.model.visual)`.
    """

    def __init__(self, model: PreTrainedModel, grid: tuple[int, int, int]) -> None:
        super().__init__()
        self.visual = model.model.visual
        config = self.visual.config
        grid_thw = torch.tensor([grid])
        # Plain attributes, not buffers: torch.export treats them as constants of the graph.
        self.grid_thw = grid_thw
        self.precomputed = {
            "position_ids": vision_utils.get_vision_position_ids(grid_thw, config.spatial_merge_size),
            "cu_seqlens": vision_utils.get_vision_cu_seqlens(grid_thw),
        }
        if hasattr(self.visual, "pos_embed"):  # Qwen3-VL: learned positions resampled to the grid
            indices, weights = vision_utils.get_vision_interpolation_indices_and_weights(
                grid_thw,
                self.visual.num_grid_per_side,
                mode=self.visual.interpolation_mode,
                align_corners=self.visual.interpolation_align_corners,
                spatial_merge_size=config.spatial_merge_size,
            )
            self.precomputed.update(interp_indices=indices, interp_weights=weights)
        if hasattr(self.visual, "window_size"):  # Qwen2.5-VL: window attention
            window_index, cu_window_seqlens = vision_utils.get_vision_window_index(
                grid_thw, config.spatial_merge_size, self.visual.window_size, self.visual.patch_size
            )
            self.precomputed.update(window_index=window_index, cu_window_seqlens=cu_window_seqlens,
                                    max_window_seqlen=_longest(cu_window_seqlens))
        self.precomputed["max_seqlen"] = _longest(self.precomputed["cu_seqlens"])
        self.deepstack_layers = len(getattr(config, "deepstack_visual_indexes", None) or [])

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        output = self.visual(pixel_values, grid_thw=self.grid_thw, return_dict=True, **dict(self.precomputed))
        if not self.deepstack_layers:
            return (output.pooler_output,)
        return output.pooler_output, torch.stack(list(output.deepstack_features))


def _longest(cu_seqlens: torch.Tensor) -> int:
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


class EmbedGraph(torch.nn.Module):
    """forward(input_ids (B, S) int64) -> inputs_embeds (B, S, hidden)."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.embed_tokens = model.model.language_model.embed_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class DecoderGraph(torch.nn.Module):
    """The language model over a KV cache; see the module doc.

    forward(inputs_embeds (B, S, hidden), position_ids (3, B, S) int64, attention_mask (B, P + S)
    int64 (1 = attend), [deepstack_embeds (K, B, S, hidden): Qwen3-VL only], past (2 * layers
    tensors (B, kv_heads, P, head_dim): keys then values of layer 0, then layer 1, ...))
    -> logits (B, vocab) of the last position, then the 2 * layers present tensors
    (B, kv_heads, P + S, head_dim) in the same order.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.text = model.model.language_model
        self.lm_head = model.lm_head
        config = self.text.config
        if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
            raise ValueError("sliding-window layers are not supported by the ONNX export")
        vision = model.config.vision_config
        self.deepstack_layers = len(getattr(vision, "deepstack_visual_indexes", None) or [])

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *rest: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        deepstack = rest[0] if self.deepstack_layers else None
        past = rest[1:] if self.deepstack_layers else rest
        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)],
                             config=self.text.config)
        past_length = past[0].shape[2]
        keys = torch.arange(past_length + inputs_embeds.shape[1], device=inputs_embeds.device)
        causal = keys[None, :] <= keys[past_length:, None]
        mask = causal[None, None] & attention_mask[:, None, None, :].bool()
        position_embeddings = self.text.rotary_emb(inputs_embeds, position_ids)
        hidden = inputs_embeds
        for index, layer in enumerate(self.text.layers):
            hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings,
                           cache=cache, use_cache=True)
            if deepstack is not None and index < self.deepstack_layers:
                hidden = hidden + deepstack[index]
        logits = self.lm_head(self.text.norm(hidden[:, -1:, :]))[:, 0, :]
        present = [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]
        return (logits.float(), *present)
