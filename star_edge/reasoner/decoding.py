"""Token selection and the N-row decoding loop, shared by every reasoner backend (numpy only).

A backend prefills a prompt once and hands `decode_rows` the first-token logits and a `step`
function that runs one batched forward pass; everything else is here, so every backend draws the
same tokens from the same logits (DESIGN.md section 11):

- the rows start from one prompt; after each token, rows that emitted an end token (or reached
  max_new_tokens) leave the batch, and an optional hook sees them and may stop the rest;
- greedy: argmax (the first maximal id on ties);
- sampling, per row and step:
      p = softmax(logits / temperature) in float32; rank p descending (stable: ties keep the lower
      id first); keep the ranked prefix whose mass *before* each token (summed in float64: a float32
      running sum drifts by hundreds of tokens over a flat tail of 150k) is < top_p (the top token
      always stays; top_p = 1 keeps every token);
      draw u ~ U[0, 1) from the row's stream; take the first kept token whose cumulative mass
      exceeds u * (kept mass).
  This keeps the tokens Hugging Face's `TopPLogitsWarper` keeps up to rounding at the boundary;
  top-k is off. Each step draws exactly one uniform per running row.

Seeding. Row i of a call with seed s draws from its own stream, seeded with `row_seed(s, i)` =
the first 8 bytes (little-endian) of sha256(b"star-edge/row/<s>/<i>"). A row's tokens therefore
depend only on (model, prompt, s, i): not on N, on which other rows run with it, or on any global
generator. The stream is the one `torch.rand(1, generator=torch.Generator().manual_seed(row_seed))`
draws, computed without torch (see `RowStream`), so a model gives the same tokens on every backend
as far as its logits agree.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from star_edge.errors import InvalidInputError, NumericalError
from star_edge.reasoner import ReasonerOutput

#: StAR's sampling settings.
SAMPLING_TEMPERATURE = 1.0
SAMPLING_TOP_P = 0.9

#: Candidates ranked first when looking for the nucleus (grown while the nucleus may be larger).
_FIRST_CANDIDATES = 64
_UNIFORM_BITS = 24


def row_seed(seed: int, row: int) -> int:
    """The seed of row `row` of a call seeded with `seed`: a 64-bit unsigned int (see the module doc)."""
    digest = hashlib.sha256(f"star-edge/row/{seed}/{row}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def fresh_seed() -> int:
    """A random seed in [0, 2**63) from the operating system (for calls made with seed=None)."""
    return secrets.randbits(63)


class RowStream:
    """The uniform draws of one sample row.

    Equal to `torch.rand(1, generator=torch.Generator().manual_seed(row_seed(seed, row)))` called
    again and again: torch's CPU generator is the Mersenne Twister MT19937 seeded with the low 32
    bits of the seed, and one float32 uniform is the low 24 bits of one 32-bit output times 2**-24.
    numpy's `RandomState` is the same generator with the same seeding, its stream frozen by numpy's
    compatibility policy (NEP 19).
    """

    def __init__(self, seed: int, row: int) -> None:
        self._state = np.random.RandomState(row_seed(seed, row) & 0xFFFFFFFF)

    def uniform(self) -> np.float32:
        """The next draw in [0, 1), float32."""
        bits = int(self._state.randint(0, 2**32, dtype=np.uint64)) & ((1 << _UNIFORM_BITS) - 1)
        return np.float32(bits) * np.float32(2.0**-_UNIFORM_BITS)


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    """(B, V) float32 probabilities of (B, V) logits divided by `temperature` (> 0)."""
    scaled = np.asarray(logits, dtype=np.float32) / np.float32(temperature)
    exponentials = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    return exponentials / exponentials.sum(axis=-1, keepdims=True)


def row_nucleus(probs: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The top-p nucleus of one row of probabilities (see the module doc for the rule).

    Only the top of the distribution is ranked: the tokens at or above the k-th largest
    probability (all of a tie) are a prefix of the full ranking, so the nucleus found inside them
    is the full ranking's; k grows until the nucleus ends inside the candidates.

    Args:
        probs: (V,) float32.
        top_p: in (0, 1]; 1 keeps every token.

    Returns:
        tokens (k,) int64: the nucleus by descending probability (ties: lower id first);
        cumulative (k,) float64: the probability mass up to and including each of them.
    """
    size = probs.shape[0]
    count = size if top_p >= 1.0 else min(size, _FIRST_CANDIDATES)
    while True:
        if count >= size:
            candidates = np.arange(size)
        else:
            threshold = np.partition(probs, size - count)[size - count]
            candidates = np.flatnonzero(probs >= threshold)
        order = candidates[np.argsort(-probs[candidates], kind="stable")]
        ranked = probs[order]
        cumulative = np.cumsum(ranked, dtype=np.float64)
        kept = order.shape[0] if top_p >= 1.0 else int(np.count_nonzero(cumulative - ranked < top_p))
        if kept < order.shape[0] or order.shape[0] == size:
            kept = max(kept, 1)
            return order[:kept].astype(np.int64), cumulative[:kept]
        count *= 8


def sample_tokens(logits: np.ndarray, uniforms: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """Nucleus sampling by inverse CDF, one token per row: the first nucleus token whose cumulative
    mass exceeds u * (nucleus mass).

    Args:
        logits: (B, V) float32.
        uniforms: (B,) float32 in [0, 1): one draw per row.
        temperature: > 0; the logits are divided by it.
        top_p: in (0, 1]; 1 keeps every token.

    Returns:
        (B,) int64 token ids.
    """
    probs = softmax(logits, temperature)
    tokens = np.empty(probs.shape[0], dtype=np.int64)
    for row, (row_probs, uniform) in enumerate(zip(probs, np.asarray(uniforms, dtype=np.float32))):
        order, cumulative = row_nucleus(row_probs, top_p)
        index = int(np.searchsorted(cumulative, uniform * cumulative[-1], side="right"))
        tokens[row] = order[min(index, order.shape[0] - 1)]
    return tokens


#: `decode_rows`'s hook: called with the rows that finished at a step, as (index into `rows`,
#: token ids) in index order; returns True to stop decoding the rows still running.
FinishedHook = Callable[[list[tuple[int, list[int]]]], bool]

#: A backend's batched forward pass: `step(tokens, kept)` feeds each running row its last token and
#: returns the next-token logits (B', V) float32 of those rows. tokens: (B',) int64. kept: (B',)
#: int64 indices into the previous call's rows of the rows that go on, or None when all go on. The
#: first call's "previous rows" are as many copies of the prefilled prompt as there are rows, so
#: the backend expands its batch-1 prompt cache to B' rows there.
StepFunction = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]


@dataclass
class Decoded:
    """The rows of one `decode_rows` call.

    Attributes:
        token_ids: per requested row, the generated ids up to and including its end token (when one
            came before max_new_tokens); partial for rows stopped by the hook.
        finished: per requested row, whether it completed (end token or max_new_tokens).
        decode_ms: wall time of the decoding loop and cache copies (ms); the hook's calls are not
            counted (what the hook does, e.g. SAM decoding and voting, is timed by its owner).
        steps: forward passes run (batched steps; the first token comes from the prefill's logits).
    """

    token_ids: list[list[int]]
    finished: list[bool]
    decode_ms: float
    steps: int


def decode_rows(
    first_logits: np.ndarray,
    step: StepFunction,
    rows: Sequence[int],
    seed: int | None,
    eos_token_ids: Sequence[int],
    max_new_tokens: int,
    greedy: bool = False,
    temperature: float = SAMPLING_TEMPERATURE,
    top_p: float = SAMPLING_TOP_P,
    on_finished: FinishedHook | None = None,
) -> Decoded:
    """Decode `rows` of the seeded sample stream of one prefilled prompt, in one batch.

    Args:
        first_logits: (1, V) or (V,) float32, the next-token logits after the prompt.
        step: the backend's batched forward pass (see StepFunction).
        rows: the row indices to draw, e.g. range(8), or range(4, 8) for a second round; each row's
            answer depends only on (seed, row). With greedy=True the rows are ignored for drawing
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
    start = time.perf_counter()
    count = len(rows)
    results: list[list[int]] = [[] for _ in range(count)]
    completed = [False] * count
    if count == 0:
        return Decoded(results, completed, 0.0, 0)
    if seed is None:
        seed = fresh_seed()
    streams = [] if greedy else [RowStream(seed, row) for row in rows]
    active = list(range(count))  # result index of each batch row
    end_ids = set(eos_token_ids)
    first = np.asarray(first_logits, dtype=np.float32).reshape(1, -1)
    logits = np.broadcast_to(first, (count, first.shape[1]))
    kept: np.ndarray | None = None
    steps = 0
    in_hook = 0.0
    for position in range(max_new_tokens):
        _check_finite(logits, position)
        if greedy:
            tokens = logits.argmax(axis=-1).astype(np.int64)
        else:
            uniforms = np.array([stream.uniform() for stream in streams], dtype=np.float32)
            tokens = sample_tokens(logits, uniforms, temperature, top_p)
        last_step = position == max_new_tokens - 1
        finished = set()
        for batch_row, token in enumerate(tokens.tolist()):
            results[active[batch_row]].append(token)
            if token in end_ids or last_step:
                finished.add(batch_row)
                completed[active[batch_row]] = True
        stop = False
        if finished and on_finished is not None:
            hook_started = time.perf_counter()
            stop = bool(on_finished([(active[b], results[active[b]]) for b in sorted(finished)]))
            in_hook += time.perf_counter() - hook_started
        if stop or len(finished) == len(active):
            break
        if finished:
            kept = np.array([b for b in range(len(active)) if b not in finished], dtype=np.int64)
            tokens = tokens[kept]
            active = [active[b] for b in kept]
            streams = [streams[b] for b in kept] if streams else streams
        logits = step(tokens, kept)
        kept = None
        steps += 1
    return Decoded(results, completed, (time.perf_counter() - start - in_hook) * 1e3, steps)


def _check_finite(logits: np.ndarray, position: int) -> None:
    """NumericalError when a row of logits (B, V) holds NaN or +inf, or only -inf: no token can be
    drawn from it (softmax gives NaN, and argmax or the nucleus would pick an arbitrary id)."""
    peaks = logits.max(axis=-1)
    if not np.isfinite(peaks).all():
        raise NumericalError(f"the reasoner's logits for token {position + 1} are NaN or infinite "
                             f"({int(np.count_nonzero(~np.isfinite(peaks)))} of {peaks.shape[0]} rows): its "
                             "activations overflowed; run it in float32 or bfloat16 rather than float16")


def checked_rows(rows: Sequence[int]) -> list[int]:
    """`rows` as a list of distinct non-negative ints, or InvalidInputError."""
    try:
        checked = list(rows)
    except TypeError:
        raise InvalidInputError(f"rows must be a sequence of row indices, got {rows!r}") from None
    if not all(isinstance(row, int) and not isinstance(row, bool) and row >= 0 for row in checked):
        raise InvalidInputError(f"rows must be non-negative integers, got {checked!r}")
    if len(set(checked)) != len(checked):
        raise InvalidInputError(f"rows must be distinct, got {checked!r}")
    return checked


def check_seed(seed: object) -> None:
    """InvalidInputError unless `seed` is None or a non-negative int."""
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise InvalidInputError(f"seed must be a non-negative integer or None, got {seed!r}")


def text_hook(
    on_finished: Callable[[list[tuple[int, str]]], bool] | None,
    rows: Sequence[int],
    text: Callable[[list[int]], str],
) -> FinishedHook | None:
    """A FinishedHook that hands `on_finished` (row, answer text) pairs instead of (index, token ids)."""
    if on_finished is None:
        return None
    return lambda done: on_finished([(rows[index], text(ids)) for index, ids in done])


def reasoner_output(
    decoded: Decoded, rows: Sequence[int], text: Callable[[list[int]], str], prompt_tokens: int, image_tokens: int
) -> ReasonerOutput:
    """The finished rows of `decoded` as a ReasonerOutput: texts, token ids and rows in the order of
    `rows`, timings {"decode"}, token counts (all decoded tokens, stopped rows included)."""
    kept = [index for index, done in enumerate(decoded.finished) if done]
    token_ids = [decoded.token_ids[index] for index in kept]
    counts = {"prompt": prompt_tokens, "image": image_tokens, "generated": sum(map(len, decoded.token_ids))}
    return ReasonerOutput(texts=[text(ids) for ids in token_ids], token_ids=token_ids,
                          timings={"decode": decoded.decode_ms}, token_counts=counts,
                          rows=[rows[index] for index in kept])
