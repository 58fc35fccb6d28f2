"""Fuzzing what comes out of the model: sample texts through the whole `segment` pipeline, and the
inputs of majority voting.

The pipeline runs on stand-in backends (a reasoner that answers given texts, a SAM whose masks are
the prompt boxes), so thousands of cases take seconds: a malformed sample must become a recorded
failure with its reason, never an exception, and when every sample fails the result is empty and
says why. Voting must either return well-formed objects or raise InvalidInputError, whatever it is
given. Each property runs 200 cases here and 10,000 under `-m slow`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from star_edge.answer import Answer, parse_safely
from star_edge.bundle import Bundle, ReasonerSpec, SamSpec
from star_edge.errors import InvalidInputError
from star_edge.reasoner import ReasonerOutput
from star_edge.result import Result
from star_edge.segmenter import Segmenter
from star_edge.vote import VoteConfig, VotedObject, majority_vote

INPUT = (224, 224)  # the reasoner input frame of the stand-in bundle ("pixels", Qwen2.5-VL style)
IMAGE = np.random.default_rng(0).integers(0, 256, size=(24, 40, 3), dtype=np.uint8)
IMAGE_SIZE = (40, 24)  # (W, H) of IMAGE
CI = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck))


# --- stand-in backends ---------------------------------------------------------------------------


@dataclass
class _Prepared:
    timings: dict[str, float]


class ScriptedReasoner:
    """A reasoner backend whose sample row i answers `texts[i]`, with one token per character (so
    shorter answers finish first, as in real decoding)."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = list(texts)

    def generate(self, image: object, query: str, n: int = 1, seed: int | None = None) -> ReasonerOutput:
        rows = list(range(n))
        return ReasonerOutput(texts=[self.texts[r] for r in rows], token_ids=[[0] * len(self.texts[r]) for r in rows],
                              timings={"vision": 0.0, "prefill": 0.0, "decode": 0.0}, rows=rows)

    def prefill(self, image: object, query: str) -> _Prepared:
        return _Prepared(timings={"vision": 0.0, "prefill": 0.0})

    def sample(self, prepared: _Prepared, rows: Sequence[int], seed: int | None = None,
               on_finished: Callable[[list[tuple[int, str]]], bool] | None = None) -> ReasonerOutput:
        """Rows finish in groups of equal length, shortest first; `on_finished` may stop the rest."""
        done: list[int] = []
        for length in sorted({len(self.texts[r]) for r in rows}):
            group = [r for r in rows if len(self.texts[r]) == length]
            done += group
            if on_finished is not None and on_finished([(r, self.texts[r]) for r in group]):
                break
        return ReasonerOutput(texts=[self.texts[r] for r in done], token_ids=[[0] * len(self.texts[r]) for r in done],
                              timings={"decode": 0.0}, rows=done)


class BoxMasks:
    """A SAM backend whose mask for each prompt is its box (inclusive corners), with a score that
    depends on the box only."""

    def embed(self, image: np.ndarray) -> tuple[int, int]:
        return image.shape[:2]

    def decode(self, embedding: tuple[int, int], boxes: np.ndarray, points: np.ndarray,
               multimask: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """boxes (K, 4) float64 -> masks (K, H, W) bool, scores (K,) float32."""
        masks = np.zeros((len(boxes), *embedding), dtype=bool)
        for k, (x1, y1, x2, y2) in enumerate(boxes.astype(np.int64)):
            masks[k, y1:y2 + 1, x1:x2 + 1] = True
        scores = 0.5 + ((boxes[:, 2] - boxes[:, 0]) % 7) / 20
        return masks, scores.astype(np.float32)


def scripted_segmenter(texts: Sequence[str]) -> Segmenter:
    reasoner = ReasonerSpec(family="qwen2_5_vl", path="reasoner", input_size=INPUT, frame="pixels",
                            prompt_template="star_v1", max_new_tokens=256)
    sam = SamSpec(kind="sam1", variant="tiny", path="sam", image_size=256)
    bundle = Bundle(root=Path("."), name="scripted", trained=False, reasoner=reasoner, sam=sam, files={},
                    backends=("torch",), manifest={})
    return Segmenter(bundle, ScriptedReasoner(texts), BoxMasks())


# --- sample texts: well-formed, damaged, arbitrary -----------------------------------------------

coordinates = st.one_of(st.integers(-30, INPUT[0] + 30), st.floats(-30, INPUT[0] + 30, allow_nan=False))
labels = st.sampled_from(["cup", "mug", "knife", "", " cup ", "ça", "\ud800"])


@st.composite
def answer_objects(draw: st.DrawFn) -> dict:
    """One object as the reasoner writes it, sometimes quoted numbers, sometimes without a label."""
    box = [draw(coordinates) for _ in range(4)]
    point = [draw(coordinates) for _ in range(2)]
    if draw(st.booleans()):
        box = [str(v) for v in box]
    item = {"bbox_2d": box, "point_2d": point}
    if draw(st.booleans()):
        item["label"] = draw(labels)
    return item


@st.composite
def well_formed(draw: st.DrawFn) -> str:
    objects = draw(st.lists(answer_objects(), max_size=4))
    think = draw(st.text(alphabet="abc <>/.", max_size=20))
    return f"<think>{think}</think><answer>{json.dumps(objects)}</answer>"


@st.composite
def damaged(draw: st.DrawFn) -> str:
    """A well-formed answer cut short, or with one character dropped, doubled or replaced."""
    text = draw(well_formed())
    position = draw(st.integers(0, len(text)))
    damage = draw(st.sampled_from(["cut", "drop", "double", "replace"]))
    if damage == "cut":
        return text[:position]
    if damage == "drop":
        return text[:position] + text[position + 1:]
    if damage == "double":
        return text[:position] + text[position:position + 1] * 2 + text[position + 1:]
    return text[:position] + draw(st.sampled_from('[]{}",:}0 -.eNa\x00')) + text[position + 1:]


sample_texts = st.one_of(well_formed(), damaged(), st.text(max_size=80),
                         st.just("<think>Nothing.</think><answer>[]</answer>"))


def check_pipeline(texts: list[str], adaptive: bool) -> None:
    """`segment` over `texts` records every sample's parse outcome and never raises."""
    segmenter = scripted_segmenter(texts)
    result = segmenter.segment(IMAGE, "cup", samples=len(texts), seed=0, adaptive=adaptive)
    assert isinstance(result, Result)
    drawn, given = Counter(sample.text for sample in result.samples), Counter(texts)
    assert drawn <= given if adaptive else drawn == given  # adaptive may stop before every sample
    for sample in result.samples:
        outcome = parse_safely(sample.text, IMAGE_SIZE, INPUT)
        if isinstance(outcome, Answer):
            assert sample.ok and sample.error is None and sample.answer == outcome
        else:
            assert not sample.ok and sample.answer is None and sample.error == str(outcome) != ""
    valid = [sample for sample in result.samples if sample.ok]
    if not valid:
        assert result.objects == [] and all(sample.error for sample in result.samples)
    union = np.zeros(IMAGE.shape[:2], dtype=bool)
    for obj in result.objects:
        assert obj.mask.shape == IMAGE.shape[:2] and obj.mask.dtype == np.bool_
        assert 1 <= obj.votes <= max(1, len(valid))
        union |= obj.mask
    np.testing.assert_array_equal(result.mask, union)
    if len(texts) == 1:
        assert len(result.objects) == sum(len(sample.answer.objects) for sample in valid)
    json.dumps(result.to_json())


@CI
@given(texts=st.lists(sample_texts, min_size=1, max_size=8), adaptive=st.booleans())
def test_malformed_samples_become_recorded_failures(texts: list[str], adaptive: bool) -> None:
    check_pipeline(texts, adaptive)


@pytest.mark.slow
@SLOW
@given(texts=st.lists(sample_texts, min_size=1, max_size=8), adaptive=st.booleans())
def test_malformed_samples_become_recorded_failures_10k(texts: list[str], adaptive: bool) -> None:
    check_pipeline(texts, adaptive)


@CI
@given(texts=st.lists(st.one_of(damaged(), st.text(max_size=40)), min_size=2, max_size=8)
       .filter(lambda texts: not any(isinstance(parse_safely(t, IMAGE_SIZE, INPUT), Answer) for t in texts)))
def test_when_every_sample_fails_the_result_is_empty_and_carries_the_reasons(texts: list[str]) -> None:
    result = scripted_segmenter(texts).segment(IMAGE, "cup", samples=len(texts), seed=1)
    assert result.objects == [] and not result.mask.any() and len(result.samples) == len(texts)
    assert all(not sample.ok and sample.error for sample in result.samples)
    assert [s["error"] for s in result.to_json()["samples"]] == [s.error for s in result.samples]


# --- voting inputs -------------------------------------------------------------------------------


@st.composite
def valid_vote_inputs(draw: st.DrawFn) -> dict[str, object]:
    """Consistent majority_vote arguments: n_valid samples, each with its object count of masks."""
    height, width = draw(st.integers(1, 6)), draw(st.integers(1, 70))
    counts = draw(st.lists(st.integers(0, 3), max_size=6))
    m = sum(counts)
    return dict(
        masks=draw(arrays(np.bool_, (m, height, width))),
        scores=draw(st.lists(st.floats(-1, 2, allow_nan=False), min_size=m, max_size=m)),
        sample_ids=[sample for sample, count in enumerate(counts) for _ in range(count)],
        labels=draw(st.lists(st.sampled_from(["a", "b", ""]), min_size=m, max_size=m)),
        n_valid=len(counts),
        object_counts=counts,
    )


junk = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(), st.text(max_size=3),
                 st.lists(st.integers(-2, 2), max_size=3), st.just(np.zeros((2, 2, 2), np.uint8)),
                 st.just(np.array([np.nan, 1.0])), st.just(np.array([2**63], np.uint64)))
Corruption = Callable[[dict, int, int, st.DrawFn], None]
"""Changes the arguments in place, given the candidate count M and n_valid of the valid case."""

CORRUPTIONS: dict[str, Corruption] = {
    "masks uint8": lambda a, m, n, d: a.update(masks=np.ones((m, 2, 3), np.uint8)),
    "masks float": lambda a, m, n, d: a.update(masks=np.ones((m, 2, 3), np.float32)),
    "masks flat": lambda a, m, n, d: a.update(masks=np.ones((m, 6), bool)),
    "masks empty image": lambda a, m, n, d: a.update(masks=np.zeros((m, 0, 3), bool)),
    "scores nan": lambda a, m, n, d: a.update(scores=[float("nan")] * m),
    "scores inf": lambda a, m, n, d: a.update(scores=[float("inf")] * m),
    "one score too many": lambda a, m, n, d: a.update(scores=[0.5] * (m + 1)),
    "ids out of range": lambda a, m, n, d: a.update(sample_ids=[n] * m),
    "ids negative": lambda a, m, n, d: a.update(sample_ids=[-1] * m),
    "ids float": lambda a, m, n, d: a.update(sample_ids=[0.5] * m),
    "ids bool": lambda a, m, n, d: a.update(sample_ids=np.ones(m, bool)),
    "labels not text": lambda a, m, n, d: a.update(labels=[1] * m),
    "one label short": lambda a, m, n, d: a.update(labels=["a"] * (m - 1)),
    "n_valid negative": lambda a, m, n, d: a.update(n_valid=-1),
    "n_valid float": lambda a, m, n, d: a.update(n_valid=float(n)),
    "n_valid bool": lambda a, m, n, d: a.update(n_valid=True),
    "counts negative": lambda a, m, n, d: a.update(object_counts=[-1] * n),
    "counts float": lambda a, m, n, d: a.update(object_counts=[1.0] * n),
    "counts short": lambda a, m, n, d: a.update(object_counts=[1] * (n - 1)),
    "config dict": lambda a, m, n, d: a.update(config={"iou_threshold": 0.5}),
    **{f"{name} junk": (lambda name: lambda a, m, n, d: a.update({name: d(junk)}))(name)
       for name in ("masks", "scores", "sample_ids", "labels", "n_valid", "object_counts")},
}


@st.composite
def vote_inputs(draw: st.DrawFn) -> dict[str, object]:
    """Valid arguments with zero to three corruptions applied."""
    arguments = draw(valid_vote_inputs())
    m, n = len(arguments["labels"]), arguments["n_valid"]
    for name in draw(st.lists(st.sampled_from(sorted(CORRUPTIONS)), max_size=3, unique=True)):
        CORRUPTIONS[name](arguments, m, n, draw)
    return arguments


configs = st.builds(VoteConfig, no_target_ratio=st.sampled_from([0.5, 1.0]), iou_threshold=st.sampled_from([0.5, 0.85]),
                    min_vote_ratio=st.sampled_from([0.0, 0.2]), aggregation=st.sampled_from(["best", "consensus"]),
                    clustering=st.sampled_from(["greedy", "components"]))


def check_vote(arguments: dict[str, object], config: VoteConfig) -> None:
    """majority_vote returns well-formed objects or raises InvalidInputError; nothing else."""
    arguments = {"config": config, **arguments}  # a "config dict" corruption replaces it
    try:
        objects = majority_vote(**arguments)
    except InvalidInputError:
        return
    masks, labels, n_valid = arguments["masks"], arguments["labels"], arguments["n_valid"]
    assert isinstance(objects, list)
    if n_valid == 0 or len(masks) == 0:
        assert objects == []
    assert len(objects) <= max(arguments["object_counts"], default=0)  # at most K, the modal count
    ranks = [(o.votes, o.score) for o in objects]
    assert ranks == sorted(ranks, reverse=True)
    for obj in objects:
        assert isinstance(obj, VotedObject)
        assert obj.mask.shape == masks.shape[1:] and obj.mask.dtype == np.bool_
        assert list(obj.members) == sorted(set(obj.members)) and obj.best_member in obj.members
        assert 1 <= obj.votes <= min(n_valid, len(obj.members)) and np.isfinite(obj.score)
        assert obj.label in [labels[j] for j in obj.members]


@CI
@given(arguments=vote_inputs(), config=configs)
def test_voting_returns_objects_or_raises_invalid_input(arguments: dict, config: VoteConfig) -> None:
    check_vote(arguments, config)


@pytest.mark.slow
@SLOW
@given(arguments=vote_inputs(), config=configs)
def test_voting_returns_objects_or_raises_invalid_input_10k(arguments: dict, config: VoteConfig) -> None:
    check_vote(arguments, config)
