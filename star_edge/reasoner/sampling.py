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

Sampling (`greedy=False`), per row and step, in float32:
    p = softmax(logits / temperature); sort p descending (stable: ties keep the lower token id first);
    keep the sorted prefix whose mass *before* each token is < top_p (the smallest set with mass >=
    top_p; the top token is always kept); draw u ~ U[0, 1) from the row's generator; take the first
    kept token whose cumulative mass exceeds u * (kept mass).
This keeps the same tokens as Hugging Face's `TopPLogitsWarper` (it drops the tokens whose ascending
cumulative mass is <= 1 - top_p, i.e. whose descending mass before them is >= top_p) up to rounding
at the boundary; top-k is off. Each step draws exactly one uniform per unfinished row.

Seeding. Row i of a call with seed s draws from its own CPU `torch.Generator` seeded with
`row_seed(s, i)` = the first 8 bytes (little-endian) of sha256(b"star-edge/row/<s>/<i>"). A row's
tokens therefore depend only on (model, prompt, s, i): not on N, on which other rows are decoded with
it, on thread interleaving, or on torch's global generator (never touched). (The one caveat is
floating point: kernels may round a row's logits differently at another batch size, which could move
a draw that falls within rounding of a boundary; the tests see none on CPU.) Uniforms are drawn on
the CPU and moved to the model's device.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedConfig, PreTrainedModel

#: StAR's sampling settings.
SAMPLING_TEMPERATURE = 1.0
SAMPLING_TOP_P = 0.9


def row_seed(seed: int, row: int) -> int:
    """The seed of row `row` of a call seeded with `seed`: a 64-bit unsigned int (see the module doc)."""
    digest = hashlib.sha256(f"star-edge/row/{seed}/{row}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def row_generator(seed: int, row: int) -> torch.Generator:
    """A CPU generator for row `row` of a call seeded with `seed`."""
    return torch.Generator().manual_seed(row_seed(seed, row))


def fresh_seed() -> int:
    """A random seed in [0, 2**63) from the operating system (for calls made with seed=None)."""
    return secrets.randbits(63)


def nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-p nucleus of each row (see the module doc for the rule).

    Args:
        logits: (B, V) float32.
        temperature: > 0; the logits are divided by it.
        top_p: in (0, 1]; 1 keeps every token.

    Returns:
        order (B, V) int64: token ids by descending probability (ties: lower id first);
        cumulative (B, V) float32: the probability mass up to and including each ranked token;
        kept (B, 1) int64 >= 1: the nucleus is the first `kept` tokens of `order`.
    """
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    cumulative = sorted_probs.cumsum(dim=-1)
    kept = ((cumulative - sorted_probs) < top_p).sum(dim=-1, keepdim=True)
    return order, cumulative, kept


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Nucleus sampling by inverse CDF, one token per row: the first nucleus token whose cumulative
    mass exceeds u * (nucleus mass).

    Args:
        logits: (B, V) float32.
        uniforms: (B,) float32 in [0, 1), on the device of `logits`: one draw per row.
        temperature: > 0; the logits are divided by it.
        top_p: in (0, 1]; 1 keeps every token.

    Returns:
        (B,) int64 token ids.
    """
    order, cumulative, kept = nucleus(logits, temperature, top_p)
    kept_mass = cumulative.gather(-1, kept - 1)
    index = torch.searchsorted(cumulative, uniforms[:, None] * kept_mass, right=True)
    return order.gather(-1, torch.minimum(index, kept - 1))[:, 0]


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


#: `decode`'s hook: called with the rows that finished at a step, as (index into `rows`, token ids)
#: in index order; returns True to stop decoding the rows still running.
FinishedHook = Callable[[list[tuple[int, list[int]]]], bool]


@dataclass
class Decoded:
    """The rows of one `decode` call.

    Attributes:
        token_ids: per requested row, the generated ids up to and including its end token (when one
            came before max_new_tokens); partial for rows stopped by the hook.
        finished: per requested row, whether it completed (end token or max_new_tokens).
        decode_ms: wall time of the decoding loop, cache copy and hook calls included (ms).
        steps: forward passes run (batched steps; the first token comes from the prefill's logits).
    """

    token_ids: list[list[int]]
    finished: list[bool]
    decode_ms: float
    steps: int


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

    Args:
        model: the model that made `state`.
        state: the prompt's Prefill (not modified).
        rows: the row indices to draw, e.g. range(8), or range(4, 8) for a second round; each row's
            answer depends only on (seed, row). With greedy=True, the rows are ignored for drawing
            (every row is the greedy answer), so pass one.
        seed: the call's seed; None draws a fresh one. Ignored when greedy.
        eos_token_ids: ids that end an answer (kept as its last token).
        max_new_tokens: the most tokens per answer.
        greedy: argmax decoding instead of sampling.
        temperature: sampling temperature (> 0).
        top_p: nucleus mass in (0, 1].
        on_finished: called after each step at which rows finished (see FinishedHook); when it
            returns True, the rows still running are abandoned.

    Returns:
        Decoded with one token list per requested row, in the order of `rows`.
    """
    device = model.device
    start = _now(device)
    count = len(rows)
    results: list[list[int]] = [[] for _ in range(count)]
    completed = [False] * count
    if count == 0:
        return Decoded(results, completed, 0.0, 0)
    if seed is None:
        seed = fresh_seed()
    generators = [] if greedy else [row_generator(seed, row) for row in rows]
    active = list(range(count))  # result index of each batch row
    end_ids = set(eos_token_ids)
    logits = state.logits.expand(count, -1)
    cache = None
    position = state.last_position
    steps = 0
    for step in range(max_new_tokens):
        if greedy:
            tokens = logits.argmax(dim=-1)
        else:
            uniforms = torch.cat([torch.rand(1, generator=generator) for generator in generators]).to(device)
            tokens = sample_tokens(logits, uniforms, temperature, top_p)
        last_step = step == max_new_tokens - 1
        finished = set()
        for batch_row, token in enumerate(tokens.tolist()):
            results[active[batch_row]].append(token)
            if token in end_ids or last_step:
                finished.add(batch_row)
                completed[active[batch_row]] = True
        stop = bool(finished) and on_finished is not None and on_finished(
            [(active[b], results[active[b]]) for b in sorted(finished)])
        if stop or len(finished) == len(active):
            break
        if cache is None:
            cache = copy_rows(state.cache, len(active), model.config)
        if finished:
            keep = [b for b in range(len(active)) if b not in finished]
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            tokens = tokens[index]
            active = [active[b] for b in keep]
            generators = [generators[b] for b in keep] if generators else generators
        position = position + 1
        logits = decode_step(model, cache, tokens, position)
        steps += 1
    return Decoded(results, completed, (_now(device) - start) * 1e3, steps)
