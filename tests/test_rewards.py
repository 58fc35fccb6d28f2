"""StAR's rewards against hand-worked cases (DESIGN section 7)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import star_edge.train.rewards as rewards_module
from star_edge.errors import InvalidInputError
from star_edge.train.metrics import intersection_union, iou
from star_edge.train.rewards import (RewardConfig, Target, box_iou, format_reward, mask_tier, non_repeat_reward,
                                     pair_terms, read_answer, score, score_answers, score_batch)

#: Identity frame: answers in pixels of a 100 x 100 input on a 100 x 100 image.
SAME = RewardConfig(frame="pixels", input_size=(100, 100))


def answer(*objects: dict, think: str = "Looking.") -> str:
    return f"<think>{think}</think><answer>{json.dumps(list(objects))}</answer>"


def obj(box, point, label="thing") -> dict:
    return {"bbox_2d": list(box), "point_2d": list(point), "label": label}


def target(boxes, points, size=(100, 100), masks=None) -> Target:
    return Target(boxes=np.array(boxes).reshape(-1, 4), points=np.array(points).reshape(-1, 2), masks=masks,
                  image_size=size)


# format ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ('<think>a</think><answer>[{"bbox_2d": [1, 2, 3, 4], "point_2d": [2, 3], "label": "cup"}]</answer>', 3.0),
    ('<think>a\nb</think>\n <answer>[{"bbox_2d": [1, 2, 3, 4], "point_2d": [2, 3], "label": "cup"}]</answer>', 3.0),
    # text after </answer>: the tags fail, the objects still count
    ('<think>a</think><answer>[{"bbox_2d": [1, 2, 3, 4], "point_2d": [2, 3], "label": "cup"}]</answer>x', 2.0),
    ('<answer>[{"bbox_2d": [1, 2, 3, 4], "point_2d": [2, 3], "label": "cup"}]</answer>', 2.0),
    # one field of three missing or wrong: 1 + 2 * 2/3
    ('<think>a</think><answer>[{"bbox_2d": [1, 2, 3, 4], "point_2d": [2, 3]}]</answer>', 1 + 4 / 3),
    ('<think>a</think><answer>[{"bbox_2d": [1, 2, 3, 4], "point_2d": [2, 3], "label": "  "}]</answer>', 1 + 4 / 3),
    ('<think>a</think><answer>[{"bbox_2d": [1, 2, 3], "point_2d": [2, 3], "label": "cup"}]</answer>', 1 + 4 / 3),
    # list lengths are checked, entry types are not (as the reference)
    ('<think>a</think><answer>[{"bbox_2d": ["1", "2", "3", "4"], "point_2d": [2, 3], "label": "c"}]</answer>', 3.0),
    ('<think>a</think><answer>[{"bbox_2d": [1, 2, 3, 4], "point_2d": [true, 3], "label": "c"}]</answer>', 3.0),
    # averaged over objects: (3/3 + 1/3) / 2 of 2
    ('<think>a</think><answer>[{"bbox_2d": [1, 2, 3, 4], "point_2d": [2, 3], "label": "cup"}, {"label": "x"}]'
     "</answer>", 1 + 4 / 3),
    # a lone object earns nothing; a non-object item ends the count (still counted in the average)
    ('<think>a</think><answer>{"bbox_2d": [1, 2, 3, 4], "point_2d": [2, 3], "label": "cup"}</answer>', 1.0),
    ('<think>a</think><answer>[{"bbox_2d": [1, 2, 3, 4], "point_2d": [2, 3], "label": "cup"}, 7, '
     '{"bbox_2d": [1, 2, 3, 4], "point_2d": [2, 3], "label": "cup"}]</answer>', 1 + 2 / 3),
    # the first <answer> block counts, even inside the thinking
    ('<think>a <answer>[]</answer></think><answer>[{"bbox_2d": [1, 2, 3, 4]}]</answer>', 3.0),
    # the parser repairs "[2, 3}]", the format reward does not
    ('<think>a</think><answer>[{"bbox_2d": [1, 2, 3, 4], "point_2d": [2, 3}]</answer>', 1.0),
    ("<think>a</think><answer>nothing</answer>", 1.0),
    ("no tags at all", 0.0),
    ("<think>a</think><answer>[]</answer>", 3.0),
    ("<think>a</think><answer>[{}]</answer>", 3.0),
])
def test_format_reward_hand_cases(text, expected):
    assert format_reward(text) == pytest.approx(expected)


def test_format_reward_without_labels_and_the_reference_empty_answer():
    labelled = '<think>a</think><answer>[{"bbox_2d": [1, 2, 3, 4], "point_2d": [2, 3], "label": "c"}]</answer>'
    unlabelled = '<think>a</think><answer>[{"bbox_2d": [1, 2, 3, 4], "point_2d": [2, 3]}]</answer>'
    half = '<think>a</think><answer>[{"bbox_2d": [1, 2, 3, 4]}]</answer>'
    assert format_reward(unlabelled, with_labels=False) == 3.0
    assert format_reward(labelled, with_labels=False) == 3.0
    assert format_reward(half, with_labels=False) == 2.0
    assert format_reward("<think>a</think><answer>[]</answer>", empty_answer_format=False) == 1.0
    assert format_reward(None) == 0.0  # type: ignore[arg-type]


# non-repeat --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("The cup is red. The box is blue. The cup is red.", 1.0),   # one repeat is allowed
    ("A. B. A. B.", 0.0),                                        # two repeats
    ("A. A. A.", 0.0),
    ("A.. . B", 1.0),                                            # empty sentences are skipped
    ("A. A . B", 1.0),                                           # sentences are stripped: one repeat
    ("", 1.0),
])
def test_non_repeat_reward_hand_cases(text, expected):
    assert non_repeat_reward(text) == expected


# terms -------------------------------------------------------------------------------------------

def test_mask_tiers_at_and_beside_every_edge():
    ious = [0.0, 0.3, 0.30001, 0.5, 0.50001, 0.7, 0.75, 0.8, 0.85, 0.9, 0.90001, 1.0]
    np.testing.assert_array_equal(mask_tier(np.array(ious)), [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])


def test_box_iou_counts_inclusive_pixels():
    # 10 x 10 boxes overlapping in 5 x 5 pixels: 25 / (100 + 100 - 25)
    assert box_iou([[0, 0, 9, 9]], [[5, 5, 14, 14]])[0, 0] == pytest.approx(25 / 175)
    assert box_iou([[3, 3, 3, 3]], [[3, 3, 3, 3]])[0, 0] == 1.0
    assert box_iou([[0, 0, 9, 9]], [[10, 0, 19, 9]])[0, 0] == 0.0


def test_pair_terms_thresholds():
    goal = target([[0, 0, 20, 30], [0, 0, 30, 30]], [[18, 23], [18, 24]])
    terms = pair_terms(np.array([[0, 0, 10, 10]]), np.array([[0, 0]]), goal)
    # L1 7.5 < 10 against the first box, 10 (not < 10) against the second
    np.testing.assert_array_equal(terms["box_l1"], [[1.0, 0.0]])
    # distances 29.2 < 30 and exactly 30, the point on its own box's corner
    np.testing.assert_array_equal(terms["point"], [[1.0, 0.0]])
    np.testing.assert_array_equal(terms["box_iou"], [[0.0, 0.0]])
    np.testing.assert_array_equal(terms["mask"], [[0.0, 0.0]])
    # the same point outside its own box earns nothing
    outside = pair_terms(np.array([[5, 5, 10, 10]]), np.array([[0, 0]]), goal)
    np.testing.assert_array_equal(outside["point"], [[0.0, 0.0]])


# accuracy and total ------------------------------------------------------------------------------

TWO = target([[10, 10, 29, 29], [60, 60, 89, 89]], [[20, 20], [75, 75]])
EXACT_B = obj([60, 60, 89, 89], [75, 75])
# A moved by 4 px: IoU 256 / 544 = 0.47 (no), L1 4 (yes), point (20, 20) on A's point and in its box
NEAR_A = obj([14, 14, 33, 33], [20, 20])
FAR = obj([0, 80, 9, 89], [5, 85])


def test_stage1_accuracy_of_a_hand_worked_answer():
    reward = score(answer(EXACT_B, NEAR_A, FAR), TWO, config=SAME)
    # matched: B exactly (3) and A near (L1 + point = 2); 5 / max(3, 2); no count bonus
    assert reward.accuracy == pytest.approx(5 / 3)
    assert (reward.box_iou, reward.box_l1, reward.point, reward.mask) == pytest.approx((1 / 3, 2 / 3, 2 / 3, 0))
    assert reward.count_match == 0.0 and reward.n_pred == 3 and reward.error is None
    assert reward.format == 3.0 and reward.non_repeat == 1.0
    assert reward.total == pytest.approx(3 + 5 / 3 + 1)
    two = score(answer(EXACT_B, NEAR_A), TWO, config=SAME)
    assert two.accuracy == pytest.approx(5 / 2 + 1)
    assert two.total == pytest.approx(3 + 3.5 + 1)


def test_matching_maximises_the_total_not_the_first_pick():
    # P1 scores 3 with both targets, P2 3 with A and 2 with B: the best matching is P1-B, P2-A (6)
    goal = target([[0, 0, 19, 19], [8, 0, 27, 19]], [[10, 10], [18, 10]])
    p1 = obj([4, 0, 23, 19], [14, 10])
    p2 = obj([0, 0, 19, 19], [10, 10])
    terms = pair_terms(np.array([p1["bbox_2d"], p2["bbox_2d"]]), np.array([p1["point_2d"], p2["point_2d"]]), goal)
    np.testing.assert_array_equal(sum(terms.values()), [[3, 3], [3, 2]])
    assert score(answer(p1, p2), goal, config=SAME).accuracy == pytest.approx(6 / 2 + 1)


def test_no_target_cases_and_unparseable_answers():
    nothing = target(np.zeros((0, 4)), np.zeros((0, 2)))
    empty = "<think>Nothing matches.</think><answer>[]</answer>"
    assert score(empty, nothing, config=SAME).accuracy == 1.0          # only the count bonus
    assert score(empty, nothing, config=SAME).total == 3.0 + 1.0 + 1.0
    assert score(answer(EXACT_B), nothing, config=SAME).accuracy == 0.0
    assert score(empty, TWO, config=SAME).accuracy == 0.0
    bad = score("<think>No answer here.</think>", TWO, config=SAME)
    assert (bad.accuracy, bad.error, bad.format, bad.total) == (0.0, "not_reference_json", 0.0, 1.0)
    degenerate = score(answer(obj([5, 5, 5, 9], [5, 6])), TWO, config=SAME)
    assert degenerate.error == "degenerate_box" and degenerate.accuracy == 0.0


def square_masks(size: int, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    masks = np.zeros((len(boxes), size, size), dtype=bool)
    for mask, (x1, y1, x2, y2) in zip(masks, boxes):
        mask[y1:y2 + 1, x1:x2 + 1] = True
    return masks


def test_mask_tier_joins_stage1_and_is_all_of_stage2():
    goal_masks = square_masks(100, [(10, 10, 29, 29)])                  # 400 pixels
    goal = target([[10, 10, 29, 29]], [[20, 20]], masks=goal_masks)
    predicted = square_masks(100, [(10, 10, 29, 24)])                   # 320 of them: IoU 0.8 -> tier 3
    text = answer(obj([10, 10, 29, 29], [20, 20]))
    stage1 = score(text, goal, pred_masks=predicted, config=SAME)
    assert stage1.mask == 3.0 and stage1.accuracy == pytest.approx(3 + 3 + 1)
    assert score(text, goal, config=SAME).accuracy == pytest.approx(3 + 1)  # no predicted masks: no tier
    stage2 = score(text, goal, pred_masks=predicted, stage=2, config=SAME)
    assert stage2.accuracy == pytest.approx(2 * 3 / 1) and stage2.count_match == 1.0
    assert stage2.total == pytest.approx(3 + 6 + 1)
    # two predictions of one target: 2 * 3 / max(2, 1)
    double = answer(obj([10, 10, 29, 29], [20, 20]), obj([50, 50, 60, 60], [55, 55]))
    two_masks = np.concatenate([predicted, square_masks(100, [(50, 50, 60, 60)])])
    assert score(double, goal, pred_masks=two_masks, stage=2, config=SAME).accuracy == pytest.approx(3.0)
    with pytest.raises(InvalidInputError, match="stage 2"):
        score(text, goal, stage=2, config=SAME)
    with pytest.raises(InvalidInputError, match="1 answered"):
        score(text, goal, pred_masks=two_masks, config=SAME)


def test_answers_are_read_in_the_model_frame_and_compared_in_original_pixels():
    goal = target([[100, 50, 299, 149]], [[200, 100]], size=(400, 200))
    pixels = answer(obj([210, 210, 628, 628], [420, 420]))               # 840 x 840 input -> x * 400/840
    grid = answer(obj([250, 250, 748, 748], [500, 500]))                 # 0-1000 grid
    assert score(pixels, goal).accuracy == pytest.approx(3 + 1)
    assert score(grid, goal, config=RewardConfig(frame="grid1000")).accuracy == pytest.approx(3 + 1)


def test_targets_are_capped_at_120_objects():
    boxes = np.array([[i % 90, 0, i % 90 + 5, 5] for i in range(130)])
    goal = Target(boxes=boxes, points=boxes[:, :2] + 2, image_size=(100, 100))
    assert len(goal) == 120


def test_targets_whose_boxes_points_and_masks_disagree_are_refused():
    boxes = np.array([[0, 0, 4, 4], [10, 10, 14, 14]])
    masks = np.zeros((3, 20, 20), dtype=bool)
    with pytest.raises(InvalidInputError, match="n = 2, one per box"):
        Target(boxes=boxes, points=boxes[:, :2], masks=masks)  # a third mask was dropped silently
    many = np.array([[i % 90, 0, i % 90 + 5, 5] for i in range(130)])
    with pytest.raises(InvalidInputError, match="130 boxes, 125 points"):
        Target(boxes=many, points=many[:125, :2], image_size=(100, 100))  # both cut to 120 first


def test_the_ignore_region_is_left_out_of_mask_iou_as_the_evaluation_leaves_it_out():
    rng = np.random.default_rng(4)
    truth = np.zeros((2, 30, 40), dtype=bool)
    truth[0, 5:20, 5:25], truth[1, 18:28, 20:38] = True, True
    ignore = np.zeros((30, 40), dtype=bool)
    ignore[:, 22:30] = True
    predicted = rng.random((3, 30, 40)) < 0.3
    predicted[0] = truth[0] | ignore  # right but for the ignored pixels
    boxes = np.array([[5, 5, 24, 19], [20, 18, 37, 27]])
    goal = Target(boxes=boxes, points=boxes[:, :2] + 1, masks=truth, ignore=ignore)
    found = rewards_module.mask_ious(predicted, goal)
    expected = [[iou(*intersection_union(p, t, ignore)) for t in truth] for p in predicted]
    np.testing.assert_allclose(found, expected, rtol=1e-12)
    assert found[0, 0] == 1.0 and not goal.masks[:, ignore].any()
    plain = rewards_module.mask_ious(predicted, Target(boxes=boxes, points=boxes[:, :2] + 1, masks=truth))
    assert plain[0, 0] < 1.0
    with pytest.raises(InvalidInputError, match=r"ignore region must be \(30, 40\) bool"):
        Target(boxes=boxes, points=boxes[:, :2], masks=truth, ignore=ignore[:, :20])


def test_mask_ious_must_fit_the_answer_and_target():
    text = answer(EXACT_B)
    read = read_answer(text, (100, 100), SAME)
    for ious in (np.array([[np.nan, 0.5]]), np.array([[1.5, 0.0]]), np.array([[0.9]])):
        with pytest.raises(InvalidInputError, match=r"mask IoUs must be \(1, 2\) values in \[0, 1\]"):
            score_answers([text], [read], [TWO], [ious], stage=2, config=SAME)
    assert score_answers([text], [read], [TWO], [np.array([[0.0, 0.95]])], stage=2, config=SAME)[0].accuracy == 5


def test_batch_scoring_matches_single_scores_with_one_hungarian_call(monkeypatch):
    texts = [answer(EXACT_B, NEAR_A, FAR), answer(EXACT_B), "<think>x</think>", answer(NEAR_A, EXACT_B)]
    targets = [TWO] * len(texts)
    singles = [score(t, g, config=SAME) for t, g in zip(texts, targets)]
    calls = []
    original = rewards_module.linear_sum_assignment_batch
    monkeypatch.setattr(rewards_module, "linear_sum_assignment_batch",
                        lambda costs, maximize: calls.append(len(costs)) or original(costs, maximize=maximize))
    batch = score_batch(texts, targets, config=SAME)
    assert batch == singles
    assert calls == [3]  # the unparseable rollout needs no matching


def test_reward_as_dict_names_every_logged_number():
    values = score(answer(EXACT_B), TWO, config=SAME).as_dict()
    assert set(values) == {"format", "accuracy", "non_repeat", "total", "box_iou", "box_l1", "point", "mask",
                           "count_match", "parsed"}
    assert values["parsed"] == 1.0 and values["accuracy"] == pytest.approx(3 / 2)


def test_accuracy_reads_the_answer_as_the_reference_unless_lenient():
    exact_b = json.dumps(EXACT_B)
    repaired = '<think>x</think><answer>[{"bbox_2d": [60, 60, 89, 89], "point_2d": [75, 75}]</answer>'
    lone = f"<think>x</think><answer>{exact_b}</answer>"
    lenient = RewardConfig(frame="pixels", input_size=(100, 100), lenient_answers=True)
    for text in (repaired, lone):
        strict = score(text, TWO, config=SAME)
        assert strict.accuracy == 0.0 and strict.error == "not_reference_json"
        assert score(text, TWO, config=lenient).accuracy == pytest.approx(3 / 2)
    # the reference reads the first <answer> block, the runtime parser the first after </think>
    quoted = f"<think>not <answer>[]</answer></think><answer>[{exact_b}]</answer>"
    assert score(quoted, TWO, config=SAME).n_pred == 0
    assert score(quoted, TWO, config=lenient).n_pred == 1


def test_only_the_first_120_answered_objects_count():
    many = answer(*([EXACT_B] * 130))
    reward = score(many, TWO, config=SAME)
    assert reward.n_pred == 120 and reward.accuracy == pytest.approx(3 / 120)
