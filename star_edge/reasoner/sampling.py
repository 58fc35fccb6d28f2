"""N answers from one vision encode and one prefill: the shared-prefill decoder (DESIGN.md section 11).

The usual ways to draw N answers waste what they could share: N sequential `generate` calls encode
the image and prefill the prompt N times; Hugging Face's `num_return_sequences=N` (transformers
5.24) encodes the image once but prefills N copies of the prompt. Here:

1. `prefill`: the vision tower encodes the image once; the language model reads the prompt once
   (batch 1) into a KV cache; the logits of the first answer token come out of it.
2. `decode`: the cache is copied to N rows and the N rows are decoded in one batch. A row that emits
   an end token leaves the batch (its cache rows are dropped), so finished answers stop costing
   compute. After every step that finished rows, an optional `on_finished` hook sees them and may
   stop the whole batch (adaptive test-time scaling: `Segmenter.segment(adaptive=True)` stops once
   the rows still decoding cannot change the vote). The `Prefill` itself is never modified: more
   rows can be decoded from it later.

Exactness. The model is called with the inputs `generate` gives it: 4-row position ids (the plain
text positions, used for the attention mask, then the three multimodal rotary rows of
`get_rope_index`; every later token advances all four by one, exactly as `generate` does), no
attention mask (the prompt has no padding), `logits_to_keep=1`, the image features passed in as
`mm_encoder_outputs` (Qwen3-VL's deepstack features ride along in the same output). All rows share one
prompt, so they share their positions and the one rope delta: dropping finished rows leaves the
others' positions untouched. Greedy decoding (`greedy=True`, one row) therefore reproduces
`model.generate(**inputs, do_sample=False)` token for token.

Token selection, per-row seeding and the bookkeeping of finished rows are backend-neutral and live
in `reasoner.decoding` (numpy), shared with the ONNX backend: for the same logits, both draw the
same tokens. (The one caveat is floating point: kernels may round a row's logits differently at
another batch size, which could move a draw that falls within rounding of a boundary; the tests see
none on CPU.)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedConfig, PreTrainedModel

from star_edge.reasoner.decoding import (
    SAMPLING_TEMPERATURE,
    SAMPLING_TOP_P,
    Decoded,
    FinishedHook,
    decode_rows,
)


@dataclass
class Prefill:
    """The shared state of one prompt: its KV cache and the logits of the first answer token.

    Attributes:
        cache: the prompt's keys and values, batch 1 (never modified: `decode` copies it).
        logits: (1, V) float32, the next-token logits after the prompt.
        last_position: (4, 1, 1) int64, the position ids of the prompt's last token (text row, then
            the three multimodal rotary rows).
        prompt_length: tokens in the prompt, image tokens included.
        image_tokens: image tokens in the prompt.
        vision_ms: time of the vision tower (ms).
        prefill_ms: time of the language model reading the prompt (ms).
    """

    cache: DynamicCache
    logits: torch.Tensor
    last_position: torch.Tensor
    prompt_length: int
    image_tokens: int
    vision_ms: float
    prefill_ms: float


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def prompt_position_ids(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The position ids `generate` builds for a prompt: (4, 1, L) int64.

    Row 0 holds the text positions 0..L-1 (the attention mask is built from them); rows 1-3 are the
    temporal, height and width rotary positions of `get_rope_index` (image tokens on their grid,
    text after the image shifted by the rope delta).
    """
    input_ids = inputs["input_ids"]
    text = torch.arange(input_ids.shape[1], device=input_ids.device)[None, None, :]
    rope, _ = model.model.get_rope_index(
        input_ids,
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs.get("attention_mask"),
    )
    return torch.cat([text, rope], dim=0)


@torch.inference_mode()
def prefill(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> Prefill:
    """Encode the image once and read the prompt once (batch 1).

    Args:
        model: a Qwen2.5-VL or Qwen3-VL `...ForConditionalGeneration` in eval mode.
        inputs: one prompt as the processor returns it (`TorchReasoner.hf_inputs`): input_ids (1, L),
            mm_token_type_ids (1, L), pixel_values (P, D), image_grid_thw (1, 3); on the model's device.
            attention_mask, if present, must be all ones.

    Returns:
        The Prefill (cache, first-token logits, positions, timings).
    """
    device = model.device
    input_ids = inputs["input_ids"]
    if input_ids.shape[0] != 1:
        raise ValueError(f"prefill takes one prompt, got a batch of {input_ids.shape[0]}")
    start = _now(device)
    image = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    vision_end = _now(device)
    position_ids = prompt_position_ids(model, inputs)
    cache = DynamicCache(config=model.config)
    output = model(
        input_ids=input_ids,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
        image_grid_thw=inputs["image_grid_thw"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        mm_encoder_outputs={"image": image},
        logits_to_keep=1,
    )
    logits = output.logits[:, -1, :].to(dtype=torch.float32)
    end = _now(device)
    return Prefill(
        cache=output.cache,
        logits=logits,
        last_position=position_ids[..., -1:],
        prompt_length=int(input_ids.shape[1]),
        image_tokens=int((input_ids == model.config.image_token_id).sum()),
        vision_ms=(vision_end - start) * 1e3,
        prefill_ms=(end - vision_end) * 1e3,
    )


def copy_rows(cache: DynamicCache, rows: int, config: PreTrainedConfig) -> DynamicCache:
    """A new cache holding `rows` copies of the batch-1 `cache` (which is left as it is).

    Each layer's keys and values (1, kv_heads, L, head_dim) become (rows, kv_heads, L, head_dim).
    """
    return DynamicCache(
        [(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1)) for keys, values, *_ in cache],
        config=config,
    )


def decode_step(model: PreTrainedModel, cache: DynamicCache, tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """One batched decoding step: feed each row its last token, append to `cache`, return the logits.

    Args:
        model: the model that filled `cache`.
        cache: B rows (extended in place by one token).
        tokens: (B,) int64, each row's last token.
        position: (4, 1, 1) int64, the position ids of these tokens (shared by all rows).

    Returns:
        (B, V) float32 next-token logits.
    """
    output = model(
        input_ids=tokens[:, None],
        position_ids=position.expand(-1, tokens.shape[0], -1),
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return output.logits[:, -1, :].to(dtype=torch.float32)


@torch.inference_mode()
def decode(
    model: PreTrainedModel,
    state: Prefill,
    rows: Sequence[int],
    seed: int | None,
    eos_token_ids: Sequence[int],
    max_new_tokens: int,
    greedy: bool = False,
    temperature: float = SAMPLING_TEMPERATURE,
    top_p: float = SAMPLING_TOP_P,
    on_finished: FinishedHook | None = None,
) -> Decoded:
    """Decode `rows` of the seeded sample stream from one prefilled prompt, in one batch.

    The cache is copied to the rows at the first step and shrinks as rows finish; the prefill is
    not modified. Arguments and result as `decoding.decode_rows` (which draws the tokens).
    """
    device = model.device
    cache: DynamicCache | None = None
    position = state.last_position

    def step(tokens: np.ndarray, kept: np.ndarray | None) -> np.ndarray:
        nonlocal cache, position
        if cache is None:
            cache = copy_rows(state.cache, len(tokens), model.config)
        elif kept is not None:
            cache.batch_select_indices(torch.from_numpy(kept).to(device))
        position = position + 1
        logits = decode_step(model, cache, torch.from_numpy(tokens).to(device), position)
        return logits.cpu().numpy()

    return decode_rows(state.logits.cpu().numpy(), step, rows, seed, eos_token_ids, max_new_tokens,
                       greedy=greedy, temperature=temperature, top_p=top_p, on_finished=on_finished)
