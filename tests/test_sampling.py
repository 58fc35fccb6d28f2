"""The shared-prefill decoder (star_edge/reasoner/sampling.py, drawing with reasoner/decoding.py)
against independent references: Hugging Face `generate` for greedy decoding, and a row-by-row
sampler written here with torch (batch 1, the model's own position ids, the documented seeding
scheme, torch's own generator) for sampled rows."""

from __future__ import annotations

import hashlib
import math
import time

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import DynamicCache
from transformers.generation.logits_process import TopPLogitsWarper

from star_edge.errors import InvalidInputError, NumericalError
from star_edge.export.tiny_reasoner import write_tiny_reasoner
from star_edge.reasoner import decoding
from star_edge.reasoner.torch_backend import TorchReasoner

FAMILIES = ("qwen2_5_vl", "qwen3_vl")
MAX_NEW_TOKENS = 12
QUERIES = ("the red circle", "what could hold water?")
ANSWERS = [
    '<think>A cup holds water.</think><answer>[{"bbox_2d": [10, 20, 120, 140], "point_2d": [60, 80], '
    '"label": "cup"}]</answer>',
    "<think>Nothing holds water.</think><answer>[]</answer>",
    '<think>The bottle.</think><answer>[{"bbox_2d": [1, 2, 30, 40], "point_2d": [9, 9], "label": "bottle"}]</answer>',
]


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


IMAGES = (_image(0, (400, 300)), _image(1, (128, 256)))


def _load(tmp_path_factory, family: str, name: str, **kwargs) -> TorchReasoner:
    directory = tmp_path_factory.mktemp(f"{name}_{family}")
    manifest = write_tiny_reasoner(directory, family=family, max_new_tokens=MAX_NEW_TOKENS, **kwargs)
    return TorchReasoner.from_dir(directory, manifest)


@pytest.fixture(scope="module")
def reasoners(tmp_path_factory) -> dict[str, TorchReasoner]:
    return {family: _load(tmp_path_factory, family, "random", seed=3) for family in FAMILIES}


@pytest.fixture(scope="module")
def ending(tmp_path_factory) -> dict[str, TorchReasoner]:
    """Random models whose answers end early and at different lengths: one hidden dimension carries a
    constant through every token embedding, and <|im_end|>'s head row reads only that dimension."""
    built = {}
    for family, boost in zip(FAMILIES, (1.8, 2.6)):
        reasoner = _load(tmp_path_factory, family, "ending", seed=0)
        end = reasoner.model.generation_config.eos_token_id[0]
        with torch.no_grad():
            reasoner.model.model.language_model.embed_tokens.weight[:, 0] = 0.1
            reasoner.model.lm_head.weight[end] = 0.0
            reasoner.model.lm_head.weight[end, 0] = boost
        built[family] = reasoner
    return built


@pytest.fixture(scope="module")
def scripted(tmp_path_factory) -> dict[str, TorchReasoner]:
    return {family: _load(tmp_path_factory, family, "scripted", seed=1, scripted_answers=ANSWERS)
            for family in FAMILIES}


def _documented_row_seed(seed: int, row: int) -> int:
    return int.from_bytes(hashlib.sha256(f"star-edge/row/{seed}/{row}".encode()).digest()[:8], "little")


def _reference_pick(logits: torch.Tensor, uniform: torch.Tensor, top_p: float = 0.9) -> int:
    """One nucleus draw by the documented rule, for one row: logits (V,) float32, uniform (1,)."""
    probs = torch.softmax(logits, dim=-1)
    ranked, order = probs.sort(descending=True, stable=True)
    cumulative = ranked.cumsum(0)
    kept = int(((cumulative - ranked) < top_p).sum())
    first_above = int((cumulative <= uniform * cumulative[kept - 1]).sum())
    return int(order[min(first_above, kept - 1)])


@torch.no_grad()
def _reference_row(reasoner: TorchReasoner, inputs: dict, seed: int, row: int) -> list[int]:
    """Row `row` decoded alone: batch 1, the vision tower and the prompt run again for this row, and
    the model computes its own position ids (its rope delta state) on every call."""
    model = reasoner.model
    end_ids = set(model.generation_config.eos_token_id)
    prompt = {name: value for name, value in inputs.items() if name != "attention_mask"}
    output = model(**prompt, cache=DynamicCache(config=model.config), use_cache=True)
    generator = torch.Generator().manual_seed(_documented_row_seed(seed, row))
    tokens: list[int] = []
    for _ in range(reasoner.max_new_tokens):
        token = _reference_pick(output.logits[0, -1].float(), torch.rand(1, generator=generator))
        tokens.append(token)
        if token in end_ids:
            break
        output = model(input_ids=torch.tensor([[token]]), cache=output.cache, use_cache=True)
    return tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_hf_generate_token_for_token(reasoners, scripted, family):
    for reasoner in (reasoners[family], scripted[family]):
        for image in IMAGES:
            for query in QUERIES:
                inputs = reasoner.hf_inputs(image, query)
                with torch.no_grad():
                    reference = reasoner.model.generate(**inputs, do_sample=False,
                                                        max_new_tokens=reasoner.max_new_tokens)
                expected = reference[0, inputs["input_ids"].shape[1]:].tolist()
                ours = reasoner.generate(image, query).token_ids[0]
                assert ours == expected[: len(ours)]
                assert len(ours) == reasoner.max_new_tokens or ours[-1] in reasoner.model.generation_config.eos_token_id
    assert scripted[family].generate(IMAGES[0], QUERIES[0]).texts == [ANSWERS[0]]


@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_rows_equal_a_row_by_row_reference_sampler(ending, family):
    reasoner = ending[family]
    lengths = []
    for query, seed in zip(QUERIES, (0, 11)):
        inputs = reasoner.hf_inputs(IMAGES[0], query)
        output = reasoner.generate(IMAGES[0], query, n=6, seed=seed)
        assert output.token_ids == [_reference_row(reasoner, inputs, seed, row) for row in range(6)]
        lengths += [len(ids) for ids in output.token_ids]
    assert min(lengths) < MAX_NEW_TOKENS == max(lengths), "rows should finish at different steps"


def test_finished_rows_leave_the_batch(ending):
    reasoner = ending["qwen2_5_vl"]
    batch_sizes = []
    hook = reasoner.model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(kwargs["inputs_embeds"].shape[0]), with_kwargs=True)
    try:
        output = reasoner.generate(IMAGES[0], QUERIES[0], n=8, seed=0)
    finally:
        hook.remove()
    lengths = sorted(len(ids) for ids in output.token_ids)
    assert batch_sizes[0] == 1, "one prefill of one prompt"
    # step t (1-based) runs the rows whose answers are longer than t tokens
    expected = [sum(length > step for length in lengths) for step in range(1, max(lengths))]
    assert batch_sizes[1:] == expected
    assert expected[0] > expected[-1]


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_depend_only_on_seed_and_row(reasoners, family):
    reasoner = reasoners[family]
    prepared = reasoner.prefill(IMAGES[1], QUERIES[1])
    length = prepared.state.cache.get_seq_length()
    eight = reasoner.sample(prepared, range(8), seed=5)
    assert prepared.state.cache.get_seq_length() == length, "the prefill stays reusable"
    assert reasoner.sample(prepared, range(4, 8), seed=5).token_ids == eight.token_ids[4:]
    assert reasoner.sample(prepared, [6, 2], seed=5).token_ids == [eight.token_ids[6], eight.token_ids[2]]
    assert reasoner.generate(IMAGES[1], QUERIES[1], n=8, seed=5).token_ids == eight.token_ids
    assert reasoner.sample(prepared, range(8), seed=6).token_ids != eight.token_ids
    assert len({tuple(ids) for ids in eight.token_ids}) == 8


def test_seeding_scheme_and_the_global_generator(reasoners):
    assert decoding.row_seed(7, 3) == _documented_row_seed(7, 3)
    assert 0 <= decoding.row_seed(2**63 - 1, 63) < 2**64
    reasoner = reasoners["qwen3_vl"]
    state = torch.get_rng_state()
    unseeded = [reasoner.generate(IMAGES[0], QUERIES[0], n=2).token_ids for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), state), "torch's global generator is never used"
    assert unseeded[0] != unseeded[1], "seed=None draws a fresh seed per call"


@pytest.mark.parametrize(("seed", "row"), [(7, 3), (0, 0), (2**63 - 1, 63), (12345, 7)])
def test_row_streams_draw_what_torch_generators_draw(seed, row):
    generator = torch.Generator().manual_seed(_documented_row_seed(seed, row))
    expected = [float(torch.rand(1, generator=generator)) for _ in range(500)]
    stream = decoding.RowStream(seed, row)
    found = [stream.uniform() for _ in range(500)]
    assert all(isinstance(value, np.float32) for value in found)
    assert np.array_equal(np.array(found), np.array(expected, dtype=np.float32))


def test_top_p_keeps_the_tokens_hf_top_p_warper_keeps():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 300, generator=generator) * torch.linspace(0.5, 6.0, 64)[:, None]
    theirs = torch.isfinite(TopPLogitsWarper(top_p=0.9)(torch.zeros(64, 1, dtype=torch.long), logits.clone()))
    probs = decoding.softmax(logits.numpy(), 1.0)
    nuclei = [decoding.row_nucleus(row, 0.9)[0] for row in probs]
    ours = torch.zeros_like(theirs)
    for row, tokens in enumerate(nuclei):
        ours[row, torch.from_numpy(tokens)] = True
    sizes = [len(tokens) for tokens in nuclei]
    assert max(sizes) > decoding._FIRST_CANDIDATES and min(sizes) == 1, "small and grown candidate sets"
    assert torch.equal(ours, theirs)


def test_the_nucleus_of_a_flat_tail_matches_hf_and_top_p_one_keeps_every_token():
    """Half the mass on one token, the rest spread over 151,935 (a Qwen vocabulary): a float32
    running sum drifted ~470 tokens past the nucleus HF keeps, and at top_p = 1 dropped the last
    hundreds."""
    size = 151_936
    logits = np.zeros((1, size), dtype=np.float32)
    logits[0, 0] = np.log(size)
    theirs = torch.isfinite(TopPLogitsWarper(top_p=0.9)(torch.zeros(1, 1, dtype=torch.long),
                                                         torch.from_numpy(logits.copy())))
    probs = decoding.softmax(logits, 1.0)[0]
    tokens, cumulative = decoding.row_nucleus(probs, 0.9)
    assert abs(len(tokens) - int(theirs.sum())) <= 1  # rounding at the boundary
    assert cumulative[-1] - probs[tokens[-1]] < 0.9 <= cumulative[-1]
    everything, _ = decoding.row_nucleus(probs, 1.0)
    assert len(everything) == size


def test_the_nucleus_ranks_ties_by_token_id():
    probs = np.full(300, 1 / 300, dtype=np.float32)
    tokens, cumulative = decoding.row_nucleus(probs, 0.5)
    assert tokens.tolist() == list(range(len(tokens))) and 140 < len(tokens) < 160
    assert cumulative[-1] - probs[0] < 0.5 <= cumulative[-1] + 1e-6


def test_inverse_cdf_draws_the_renormalised_nucleus():
    probs = torch.tensor([0.05, 0.4, 0.02, 0.25, 0.2, 0.08])
    logits = probs.log()[None, :]
    draws = 4000
    uniforms = (torch.arange(draws, dtype=torch.float32) + 0.5) / draws
    tokens = torch.from_numpy(decoding.sample_tokens(logits.expand(draws, -1).numpy(), uniforms.numpy(), 1.0, 0.9))
    frequencies = torch.bincount(tokens, minlength=6).float() / draws
    nucleus = torch.tensor([0.0, 0.4, 0.0, 0.25, 0.2, 0.08])  # 0.4 + 0.25 + 0.2 = 0.85 < 0.9: 0.08 joins
    torch.testing.assert_close(frequencies, nucleus / nucleus.sum(), atol=1.0 / draws, rtol=0)
    hot = decoding.sample_tokens(logits.expand(draws, -1).numpy(), uniforms.numpy(), 0.1, 0.9)
    assert set(hot.tolist()) == {1}, "temperature 0.1 puts > 0.9 of the mass on the top token"
    assert math.isclose(float((tokens == 1).float().mean()), 0.4 / 0.93, abs_tol=1e-3)


def test_bad_rows_and_seeds_raise(reasoners):
    reasoner = reasoners["qwen2_5_vl"]
    prepared = reasoner.prefill(IMAGES[0], QUERIES[0])
    for rows in ([1, 1], [-1], [0.5], 3):
        with pytest.raises(InvalidInputError, match="rows"):
            reasoner.sample(prepared, rows, seed=0)
    with pytest.raises(InvalidInputError, match="seed"):
        reasoner.sample(prepared, [0], seed=-2)
    assert reasoner.sample(prepared, [], seed=0).texts == []


def test_a_finished_hook_sees_rows_as_they_end_and_can_stop_the_rest(ending):
    reasoner = ending["qwen2_5_vl"]
    prepared = reasoner.prefill(IMAGES[0], QUERIES[0])
    everything = reasoner.sample(prepared, range(8), seed=0)
    by_row = dict(zip(everything.rows, everything.texts))
    seen = []

    def watch(done: list[tuple[int, str]]) -> bool:
        seen.append(done)
        return False

    reasoner.sample(prepared, range(8), seed=0, on_finished=watch)
    assert [row for step in seen for row, _ in step] == sorted(range(8), key=lambda r: (len(everything.token_ids[r]), r))
    assert all(text == by_row[row] for step in seen for row, text in step)
    stopped = reasoner.sample(prepared, range(8), seed=0, on_finished=lambda done: True)
    assert stopped.rows == [row for row, _ in seen[0]] and len(stopped.rows) < 8
    assert stopped.texts == [by_row[row] for row in stopped.rows]
    assert stopped.token_counts["generated"] < everything.token_counts["generated"]


def test_decode_time_leaves_out_the_time_spent_in_the_hook():
    """Adaptive stopping parses, decodes SAM and votes inside the hook, and times that itself."""
    vocabulary, end = 8, 7

    def step(tokens, kept):
        logits = np.zeros((len(tokens), vocabulary), dtype=np.float32)
        logits[:, end] = 10.0
        return logits

    def slow_hook(finished):
        time.sleep(0.2)
        return False

    first = np.zeros(vocabulary, dtype=np.float32)
    decoded = decoding.decode_rows(first, step, range(2), seed=0, eos_token_ids=[end], max_new_tokens=4,
                                   greedy=True, on_finished=slow_hook)
    assert decoded.finished == [True, True] and decoded.decode_ms < 100


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("greedy", [True, False])
def test_logits_that_overflowed_raise_instead_of_drawing_an_arbitrary_token(bad, greedy):
    """float16 overflow gives NaN / inf logits; softmax of them is NaN and every id is as good as
    another (the nucleus fell back to token 0, Qwen's "!")."""
    vocabulary, end = 8, 7

    def step(tokens, kept):
        logits = np.zeros((len(tokens), vocabulary), dtype=np.float32)
        logits[:, 0] = 50.0
        logits[0, 3] = bad  # one row of the batch overflows at the second token
        return logits

    first = np.zeros(vocabulary, dtype=np.float32)
    first[0] = 50.0  # every row draws token 0 first: none ends
    with pytest.raises(NumericalError, match=r"logits for token 2 are NaN or infinite \(1 of 3 rows\)"):
        decoding.decode_rows(first, step, range(3), seed=0, eos_token_ids=[end], max_new_tokens=4, greedy=greedy)
    silent = np.full(vocabulary, -np.inf, dtype=np.float32)
    with pytest.raises(NumericalError, match="logits for token 1"):
        decoding.decode_rows(silent, step, range(1), seed=0, eos_token_ids=[end], max_new_tokens=4, greedy=greedy)
