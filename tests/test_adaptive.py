"""Adaptive test-time scaling: the stopping rule against brute force over every continuation, and
`Segmenter.segment(adaptive=True)` (stop the batch once the answers still decoding cannot change
the vote) end to end on scripted tiny bundles."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from star_edge.adaptive import vote_is_settled
from star_edge.cli import app
from star_edge.errors import InvalidInputError
from star_edge.export.tiny import make_tiny_bundle
from star_edge.segmenter import Segmenter
from star_edge.vote import VoteConfig, majority_vote

ONE_MUG = ('<think>A mug holds drinks.</think><answer>[{"bbox_2d": [40, 60, 150, 180], '
           '"point_2d": [95, 120], "label": "mug"}]</answer>')
TWO_CUPS = ('<think>Both cups hold drinks.</think><answer>[{"bbox_2d": [40, 60, 150, 180], '
            '"point_2d": [95, 120], "label": "mug"}, {"bbox_2d": [160, 20, 220, 90], '
            '"point_2d": [190, 55], "label": "cup"}]</answer>')
BROKEN = '<think>Hmm.</think><answer>[{"bbox_2d": [1, 2'
NOTHING = "<think>Nothing here holds a drink.</think><answer>[]</answer>"

# Synthetic votes: four disjoint shapes on a 16 x 16 grid (IoU 1 with itself, 0 with the others).
SHAPES = np.zeros((4, 16, 16), dtype=bool)
for _shape in range(4):
    SHAPES[_shape, 4 * _shape: 4 * _shape + 4] = True
FAILED = None
#: What one sample may answer: a list of shape indices ([] = "no target"), or FAILED.
ANSWERS = ([], [0], [1], [2], [3], [0, 1], [1, 2], [0, 3], FAILED)


def _tally(answers: list, scores: list[float]) -> tuple:
    """majority_vote's inputs for a list of sample answers (candidate scores taken in order)."""
    valid = [answer for answer in answers if answer is not FAILED]
    shapes = [shape for answer in valid for shape in answer]
    masks = SHAPES[shapes] if shapes else np.zeros((0, 16, 16), dtype=bool)
    sample_ids = np.array([k for k, answer in enumerate(valid) for _ in answer], dtype=np.int64)
    labels = [f"shape{shape}" for shape in shapes]
    return masks, np.array(scores[: len(shapes)]), sample_ids, labels, [len(answer) for answer in valid]


def _outcome(answers: list, scores: list[float], config: VoteConfig) -> frozenset[int]:
    """The vote's outcome: the first candidate of each kept cluster (empty set: empty answer)."""
    masks, scores, sample_ids, labels, counts = _tally(answers, scores)
    return frozenset(obj.members[0] for obj in majority_vote(masks, scores, sample_ids, labels, len(counts),
                                                             counts, config))


@pytest.mark.parametrize("config", [VoteConfig(), VoteConfig(min_vote_ratio=0.4, no_target_ratio=0.3)])
def test_a_settled_vote_equals_the_vote_over_every_continuation(config):
    rng = random.Random(0)
    settled_cases = 0
    for _ in range(60):
        favourite = rng.choice(ANSWERS[:-1])  # mostly agreeing samples, so that many votes settle
        drawn = [favourite if rng.random() < 0.8 else rng.choice(ANSWERS) for _ in range(rng.randint(2, 9))]
        slack = rng.randint(1, 3)
        scores = [rng.random() for _ in range(2 * (len(drawn) + slack))]
        masks, candidate_scores, sample_ids, labels, counts = _tally(drawn, scores)
        if not vote_is_settled(masks, candidate_scores, sample_ids, labels, counts, slack, config):
            continue
        settled_cases += 1
        now = _outcome(drawn, scores, config)
        for continuation in itertools.product(ANSWERS, repeat=slack):
            assert _outcome(drawn + list(continuation), scores, config) == now, (drawn, continuation)
    assert settled_cases >= 10


@pytest.mark.parametrize(
    "drawn, slack, config, expected",
    [
        ([[0]] * 4, 4, VoteConfig(), False),  # 4 votes against a new cluster with 4: a tie could flip it
        ([[0]] * 5, 4, VoteConfig(), True),
        ([[]] * 3 + [[0]], 1, VoteConfig(), True),  # "no target" wins 3/4, and 3/5 with one more object answer
        ([[]] * 2 + [[0]] * 2, 1, VoteConfig(), False),
        ([FAILED] * 3, 2, VoteConfig(), False),
        ([[0, 1]] * 3 + [[0]] * 3, 2, VoteConfig(), False),  # K is 1 or 2 by one vote
        # K = 2 with one place open: cluster 0 is kept; a second [0, 1] would lift cluster 1 to 2/4
        ([[0, 1], [0, 2], [0, 3]], 1, VoteConfig(min_vote_ratio=0.4), False),
        ([[0, 1], [0, 2], [0, 3]] * 4, 1, VoteConfig(min_vote_ratio=0.4), True),  # 5/13 < 0.4
        # cluster 1 has 4/6 >= 0.6, but one more "no target" answer leaves it 4/7 and out
        ([[0, 1]] * 3 + [[0], [0, 3], [0, 1]], 1, VoteConfig(min_vote_ratio=0.6), False),
    ],
)
def test_known_votes_settle_as_expected(drawn, slack, config, expected):
    masks, scores, sample_ids, labels, counts = _tally(drawn, [0.5] * 64)
    assert vote_is_settled(masks, scores, sample_ids, labels, counts, slack, config) is expected


SHORT = ('<think>A mug.</think><answer>[{"bbox_2d": [40, 60, 150, 180], "point_2d": [95, 120], '
         '"label": "mug"}]</answer>')
SHORT_AGAIN = ('<think>A mug holds drinks.</think><answer>[{"bbox_2d": [40, 60, 150, 180], '
               '"point_2d": [95, 120], "label": "mug"}]</answer>')
LONG = ("<think>" + "Cups, glasses and mugs hold drinks; the handle and the opening say which. " * 4
        + '</think><answer>[{"bbox_2d": [40, 60, 150, 180], "point_2d": [95, 120], "label": "mug"}]</answer>')


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    path = tmp_path_factory.mktemp("adaptive") / "mixed"
    make_tiny_bundle(path, seed=1, family="qwen2_5_vl", scripted_answers=[ONE_MUG, TWO_CUPS, BROKEN, NOTHING])
    with Segmenter.from_pretrained(path) as segmenter:
        yield segmenter


@pytest.fixture(scope="module")
def thinking(tmp_path_factory):
    """Two short answers and one long one, all naming the same mug."""
    path = tmp_path_factory.mktemp("adaptive") / "thinking"
    make_tiny_bundle(path, seed=2, family="qwen3_vl", scripted_answers=[SHORT, SHORT_AGAIN, LONG])
    with Segmenter.from_pretrained(path) as segmenter:
        yield segmenter


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    pixels = np.full((200, 300, 3), 235, dtype=np.uint8)
    pixels[80:170, 50:200] = (200, 40, 40)
    return pixels


def _without_timings(result) -> dict:
    payload = result.to_json()
    payload.pop("timings_ms")
    return payload


def _texts(result) -> list[str]:
    return [sample.text for sample in result.samples]


def test_adaptive_votes_the_fixed_n_samples_in_the_same_order(mixed, image):
    stopped = drew_all = 0
    for seed in range(6):
        fixed = mixed.segment(image, "what could I drink from?", samples=8, seed=seed)
        adaptive = mixed.segment(image, "what could I drink from?", samples=8, seed=seed, adaptive=True)
        drawn = len(adaptive.samples)
        assert _texts(adaptive) == _texts(fixed)[:drawn], "samples finish in the fixed call's order"
        if drawn == 8:
            drew_all += 1
            assert _without_timings(adaptive) == _without_timings(fixed)
        else:
            stopped += 1
            assert [obj.label for obj in adaptive.objects] == [obj.label for obj in fixed.objects]
            assert (adaptive.mask == fixed.mask).all()
    assert stopped and drew_all, "these seeds should include early stops and full draws"


def test_adaptive_cuts_the_long_answers_once_the_short_ones_decide(thinking, image):
    fixed = thinking.segment(image, "a mug", samples=16, seed=0)
    adaptive = thinking.segment(image, "a mug", samples=16, seed=0, adaptive=True)
    assert LONG in _texts(fixed)
    assert LONG not in _texts(adaptive) and len(adaptive.samples) < 16
    assert _texts(adaptive) == _texts(fixed)[: len(adaptive.samples)]
    assert [obj.label for obj in adaptive.objects] == ["mug"] == [obj.label for obj in fixed.objects]
    assert adaptive.objects[0].votes == len(adaptive.samples)
    np.testing.assert_array_equal(adaptive.mask, fixed.mask)
    for stage in ("vision", "prefill", "decode", "sam_encode", "sam_decode", "vote", "total"):
        assert adaptive.timings[stage] >= 0.0
    eager = thinking.segment(image, "a mug", samples=16, seed=0, adaptive=True, margin=0)
    assert set(_texts(eager)) == {SHORT}, "margin 0 stops at the first answers"


def test_adaptive_encodes_and_prefills_once(thinking, image, monkeypatch):
    calls = []
    for name in ("prefill", "sample", "generate"):
        method = getattr(thinking.reasoner, name)
        monkeypatch.setattr(thinking.reasoner, name, lambda *args, _name=name, _method=method, **kwargs:
                            calls.append(_name) or _method(*args, **kwargs))
    thinking.segment(image, "a mug", samples=16, seed=0, adaptive=True)
    assert calls == ["prefill", "sample"]


def test_adaptive_arguments_are_checked(thinking, image):
    with pytest.raises(InvalidInputError, match="margin"):
        thinking.segment(image, "a mug", samples=8, adaptive=True, margin=-1)
    with pytest.raises(InvalidInputError, match="adaptive"):
        thinking.segment(image, "a mug", samples=8, adaptive="yes")
    greedy = thinking.segment(image, "a mug", samples=1, adaptive=True)
    assert _texts(greedy) == [SHORT]


def test_segment_command_reports_the_samples_drawn(thinking, image, tmp_path):
    path = tmp_path / "scene.png"
    Image.fromarray(image).save(path)
    result = CliRunner().invoke(app, ["segment", str(path), "a mug", "--samples", "16", "--seed", "0", "--adaptive",
                                      "--bundle", str(thinking.bundle.root)])
    assert result.exit_code == 0, result.output
    drawn = len(thinking.segment(image, "a mug", samples=16, seed=0, adaptive=True).samples)
    assert f"adaptive: drew {drawn} of 16 samples" in result.output
