"""StAR's rewards for one rollout text against its target objects (DESIGN section 7).

The reference is StAR's own reward (ysj9909/StAR, verl/workers/sam_worker.py). total = format +
accuracy + non_repeat, where

- format: 1 if the whole text is `<think>...</think>` then `<answer>...</answer>` (the regex
  `FORMAT_PATTERN`, dot matching newlines, nothing after `</answer>`), plus the object format
  averaged over the answer's objects: 2/3 each for a `bbox_2d` list of 4 entries, a `point_2d` list
  of 2 entries and a non-empty string `label` (so at most 3 in all). Without labels (the label
  ablation) 1 each for the box and the point. As the reference reads it: the first `<answer>` block
  of the text, loaded with `json.loads` alone (JSON that needs the parser's repairs earns nothing),
  a list of objects (a lone object earns nothing), list lengths checked but not entry types; a
  non-object item ends the count (the reference stops at its exception).
- non_repeat: 0 if, splitting the text on ".", two or more non-empty sentences repeat an earlier
  one; else 1.
- accuracy: the answer's boxes and points in original pixels (`read_answer`); an answer that cannot
  be read scores 0. Stage 1 scores every (prediction i, target j) pair with mask tier + [box IoU >
  0.5] + [mean |box L1| < 10] + [point distance < 30 and the predicted point inside its own
  predicted box]; the Hungarian matching maximises the sum; accuracy = matched sum / max(n_pred,
  n_target) + [n_pred == n_target]. Stage 2 scores pairs by the mask tier alone: accuracy = 2 *
  matched sum / max(n_pred, n_target). Boxes are inclusive (x2, y2 = last pixel), hence the +1 in
  the box IoU. Without masks (target or predicted) the stage-1 tier term is dropped; stage 2 needs
  them. At most 120 objects count, of the answer and of the target (the first 120).

Where the reference has no rule of its own, DESIGN section 7 decides: an empty answer (`[]`) to a
sample without a target has matched mean 0 and, in stage 1, the count bonus (the reference raises
inside its try block and gives 0 to every empty answer; its training data has no empty targets).
One deliberate difference, `RewardConfig.empty_answer_format`: the reference averages the object
format over zero objects and gives `[]` none of it, so on a sample without a target any well-formed
wrong object would outscore the right "no target" answer; by default `[]` earns the full object
format. Coordinates are compared in original image pixels (the reference compares them in its
840 x 840 training frame, where its images were pre-resized).

Everything here is a pure function of text, targets and masks. `score` scores one rollout;
`score_batch` and `score_answers` score many with one batched Hungarian call for all of them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from star_edge import geometry
from star_edge.answer import MAX_OBJECTS, Answer, ParseError, parse_safely
from star_edge.errors import InvalidInputError
from star_edge.kernels import linear_sum_assignment_batch, pack_masks, pairwise_iou

FORMAT_PATTERN = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
"""The tag structure the format reward asks of the whole text."""
MASK_TIER_EDGES = (0.3, 0.5, 0.7, 0.8, 0.9)
"""Mask IoU u earns tier k = the number of edges strictly below u: (0.3, 0.5] -> 1, ... > 0.9 -> 5."""
BOX_IOU_THRESHOLD = 0.5
"""Box IoU (inclusive pixels) above which a pair earns the box term."""
BOX_L1_THRESHOLD = 10.0
"""Mean absolute corner difference (pixels) below which a pair earns the L1 term."""
POINT_DISTANCE_THRESHOLD = 30.0
"""Point distance (pixels) below which a pair earns the point term (with the point in its box)."""
STAGES = (1, 2)

_OBJECT_FORMAT = 2.0
_ANSWER_RE = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
TERMS = ("box_iou", "box_l1", "point", "mask")
"""The per-pair terms of the accuracy matrix, in `Reward` and log order."""


@dataclass(frozen=True)
class RewardConfig:
    """How rollouts are read and scored (defaults: the StAR reference with Qwen2.5-VL)."""

    frame: str = "pixels"
    """The model's coordinate frame: "pixels" (Qwen2.5-VL) or "grid1000" (Qwen3-VL)."""
    input_size: tuple[int, int] = geometry.DEFAULT_INPUT_SIZE
    """(w, h) of the reasoner input, the "pixels" frame's extent (StAR: 840 x 840)."""
    with_labels: bool = True
    """Labels are part of the answer and of the format reward; False is the label ablation."""
    empty_answer_format: bool = True
    """`[]` earns the full object format (see the module docstring); False: none, as the reference."""
    lenient_answers: bool = False
    """False (the reference): accuracy only for answers whose JSON `json.loads` reads as a list;
    True: for any answer the runtime parser reads (repaired JSON, a lone object)."""

    def __post_init__(self) -> None:
        geometry.frame_size(self.frame, self.input_size)


@dataclass(frozen=True)
class Target:
    """The target objects of one sample, in original image pixels.

    boxes: (n, 4) x1, y1, x2, y2, inclusive; points: (n, 2) x, y; masks: (n, H, W) bool or None;
    image_size: (W, H) of the original image (defaults to the masks' size; required without masks);
    ignore: (H, W) bool pixels left out of every mask IoU, predicted and target side alike (ReasonSeg's
    ignore regions, as the evaluation leaves them out), or None.
    n = 0 means "no target"; boxes, points and masks must agree on n. Arrays are stored as float64 / bool
    copies, truncated to 120 objects; stored masks have the ignore region cleared.
    """

    boxes: np.ndarray
    points: np.ndarray
    masks: np.ndarray | None = None
    image_size: tuple[int, int] | None = None
    ignore: np.ndarray | None = None

    def __post_init__(self) -> None:
        boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        points = np.asarray(self.points, dtype=np.float64).reshape(-1, 2)
        if len(boxes) != len(points):
            raise InvalidInputError(f"a target needs one point per box, got {len(boxes)} boxes, {len(points)} points")
        count = len(boxes)
        boxes, points = boxes[:MAX_OBJECTS].copy(), points[:MAX_OBJECTS].copy()
        if not (np.isfinite(boxes).all() and np.isfinite(points).all()):
            raise InvalidInputError("target boxes and points must be finite")
        masks = self.masks
        size = self.image_size
        if masks is not None:
            masks = np.asarray(masks)
            if masks.ndim != 3 or masks.dtype != np.bool_ or len(masks) != count:
                raise InvalidInputError(f"target masks must be (n, H, W) bool with n = {count}, one per box, "
                                        f"got {masks.shape} {masks.dtype}")
            masks = masks[: len(boxes)]
            size = (masks.shape[2], masks.shape[1]) if size is None else size
        if size is None:
            raise InvalidInputError("a target without masks needs image_size (W, H)")
        size = geometry.check_size(size, "image_size")
        if masks is not None and (masks.shape[2], masks.shape[1]) != size:
            raise InvalidInputError(f"target masks are {masks.shape[2]}x{masks.shape[1]}, image_size is {size}")
        ignore = self.ignore
        if ignore is not None:
            ignore = np.asarray(ignore)
            if ignore.dtype != np.bool_ or ignore.shape != (size[1], size[0]):
                raise InvalidInputError(f"a target's ignore region must be ({size[1]}, {size[0]}) bool, "
                                        f"got {ignore.shape} {ignore.dtype}")
            ignore = ignore.copy()
            if masks is not None:
                masks = masks & ~ignore
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "points", points)
        object.__setattr__(self, "masks", masks)
        object.__setattr__(self, "image_size", size)
        object.__setattr__(self, "ignore", ignore)

    def __len__(self) -> int:
        return len(self.boxes)

    def mask_iou(self, pred_masks: np.ndarray) -> np.ndarray:
        """IoU (M, N) float64 of predicted masks (M, H, W) bool with the target's masks (bit-packed),
        the ignore region left out; the target must have masks."""
        if self.ignore is not None:
            pred_masks = pred_masks & ~self.ignore
        return pairwise_iou(pack_masks(pred_masks), pack_masks(self.masks))


@dataclass(frozen=True)
class Reward:
    """The reward of one rollout and its parts.

    format (0..3), accuracy (stage 1: 0..9 with masks, 0..4 without; stage 2: 0..10), non_repeat
    (0 or 1), total = their sum. The matched per-term means, for logging: box_iou, box_l1, point
    (each a share of max(n_pred, n_target) in 0..1), mask (mean tier, 0..5; 0 without masks) and
    count_match (0 or 1); stage-1 accuracy = box_iou + box_l1 + point + mask + count_match. error:
    why the answer could not be read (`read_answer`: "not_reference_json" or the parser's reason
    code), then n_pred = 0 and accuracy = 0.
    """

    format: float
    accuracy: float
    non_repeat: float
    total: float
    box_iou: float = 0.0
    box_l1: float = 0.0
    point: float = 0.0
    mask: float = 0.0
    count_match: float = 0.0
    n_pred: int = 0
    error: str | None = None

    def as_dict(self) -> dict[str, float]:
        """The numeric fields by name (format, accuracy, non_repeat, total, the terms, parsed)."""
        names = ("format", "accuracy", "non_repeat", "total", *TERMS, "count_match")
        return {**{name: float(getattr(self, name)) for name in names}, "parsed": float(self.error is None)}


def answer_items(text: str) -> list | None:
    """The answer as the reference reads it: the JSON list in the text's first `<answer>` block,
    loaded with `json.loads` alone; None without a block, for invalid JSON or a non-list."""
    block = _ANSWER_RE.search(text) if isinstance(text, str) else None
    if block is None:
        return None
    try:
        data = json.loads(block.group(1))
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, list) else None


def format_reward(text: str, with_labels: bool = True, empty_answer_format: bool = True) -> float:
    """The format reward of one text (module docstring): tags (0 or 1) + object format (0..2)."""
    if not isinstance(text, str):
        return 0.0
    tags = 1.0 if FORMAT_PATTERN.fullmatch(text) else 0.0
    return tags + _object_format(answer_items(text), with_labels, empty_answer_format)


def _object_format(items: list | None, with_labels: bool, empty_answer_format: bool) -> float:
    if items is None:
        return 0.0
    if all(item == {} for item in items):
        return _OBJECT_FORMAT if empty_answer_format else 0.0
    fields = 3 if with_labels else 2
    total = 0.0
    for item in items:
        if not isinstance(item, dict):
            break
        hits = _is_list(item.get("bbox_2d"), 4) + _is_list(item.get("point_2d"), 2)
        if with_labels:
            label = item.get("label")
            hits += isinstance(label, str) and bool(label.strip())
        total += hits / fields
    return _OBJECT_FORMAT * total / len(items)


def _is_list(value: object, length: int) -> bool:
    return isinstance(value, list) and len(value) == length


def non_repeat_reward(text: str) -> float:
    """1, or 0 when two or more of the text's "."-separated sentences repeat an earlier one."""
    if not isinstance(text, str):
        return 0.0
    seen: set[str] = set()
    repeats = 0
    for sentence in text.split("."):
        sentence = sentence.strip()
        if not sentence:
            continue
        if sentence in seen:
            repeats += 1
            if repeats >= 2:
                return 0.0
        seen.add(sentence)
    return 1.0


def mask_tier(iou: np.ndarray) -> np.ndarray:
    """Mask tiers of IoU values: 0 for u <= 0.3, 1 for (0.3, 0.5], 2 for (0.5, 0.7], 3 for (0.7, 0.8],
    4 for (0.8, 0.9], 5 for u > 0.9. iou any shape, returns float64 of the same shape."""
    return np.searchsorted(np.asarray(MASK_TIER_EDGES), np.asarray(iou, dtype=np.float64), side="left").astype(
        np.float64)


def box_iou(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """IoU of inclusive boxes: pred (M, 4), target (N, 4) x1, y1, x2, y2 -> (M, N) float64.

    Areas count pixels: (x2 - x1 + 1) * (y2 - y1 + 1), the intersection likewise.
    """
    a = np.asarray(pred, dtype=np.float64).reshape(-1, 1, 4)
    b = np.asarray(target, dtype=np.float64).reshape(1, -1, 4)
    width = np.maximum(0.0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1)
    height = np.maximum(0.0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1)
    inter = width * height
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    return inter / (area_a + area_b - inter)


def pair_terms(
    boxes: np.ndarray, points: np.ndarray, target: Target, mask_iou: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """The per-pair terms of predictions against a target, each (M, N) float64 in {0, 1} (mask: 0..5).

    boxes (M, 4) and points (M, 2) in original pixels; mask_iou (M, N) IoU of the predicted masks with
    the target masks, or None (then "mask" is all zeros).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    inside = ((points[:, 0] >= boxes[:, 0]) & (points[:, 0] <= boxes[:, 2])
              & (points[:, 1] >= boxes[:, 1]) & (points[:, 1] <= boxes[:, 3]))
    l1 = np.abs(boxes[:, None, :] - target.boxes[None, :, :]).mean(axis=2)
    distance = np.sqrt(((points[:, None, :] - target.points[None, :, :]) ** 2).sum(axis=2))
    shape = (len(boxes), len(target))
    return {
        "box_iou": (box_iou(boxes, target.boxes) > BOX_IOU_THRESHOLD).astype(np.float64),
        "box_l1": (l1 < BOX_L1_THRESHOLD).astype(np.float64),
        "point": ((distance < POINT_DISTANCE_THRESHOLD) & inside[:, None]).astype(np.float64),
        "mask": mask_tier(mask_iou) if mask_iou is not None else np.zeros(shape),
    }


def mask_ious(pred_masks: np.ndarray, target: Target) -> np.ndarray:
    """IoU (M, N) float64 of predicted masks (M, H, W) bool with the target's masks (bit-packed)."""
    if target.masks is None:
        raise InvalidInputError("the target has no masks to compare with")
    pred_masks = np.asarray(pred_masks)
    if pred_masks.ndim != 3 or pred_masks.shape[1:] != target.masks.shape[1:]:
        raise InvalidInputError(f"predicted masks must be (M, {target.masks.shape[1]}, {target.masks.shape[2]}) "
                                f"bool, got {pred_masks.shape}")
    if len(pred_masks) == 0 or len(target) == 0:
        return np.zeros((len(pred_masks), len(target)))
    return target.mask_iou(pred_masks)


def read_answer(text: str, image_size: Sequence[int], config: RewardConfig = RewardConfig()) -> Answer | ParseError:
    """The answer's objects as the accuracy reward reads them, in original pixels (or why not).

    The runtime parser (`star_edge.answer.parse`) maps and clamps the coordinates. Unless
    `config.lenient_answers`, it reads the JSON the reference reads (`answer_items`: a list, no
    repairs; else ParseError reason "not_reference_json") and only its first 120 objects.
    """
    if config.lenient_answers:
        return parse_safely(text, image_size, config.input_size, config.frame)
    items = answer_items(text)
    if items is None:
        return ParseError("the answer is not a JSON list that json.loads reads", "not_reference_json")
    clean = f"<answer>{json.dumps(items[:MAX_OBJECTS])}</answer>"
    return parse_safely(clean, image_size, config.input_size, config.frame)


def score(
    text: str,
    target: Target,
    pred_masks: np.ndarray | None = None,
    stage: int = 1,
    config: RewardConfig = RewardConfig(),
) -> Reward:
    """The reward of one rollout text.

    pred_masks: (n_pred, H, W) bool, SAM's masks for the answer's objects (`read_answer`) in order
    (None: no mask terms). Raises InvalidInputError for masks that do not fit, or stage 2 without
    masks.
    """
    return score_batch([text], [target], None if pred_masks is None else [pred_masks], stage, config)[0]


def score_batch(
    texts: Sequence[str],
    targets: Sequence[Target],
    pred_masks: Sequence[np.ndarray | None] | None = None,
    stage: int = 1,
    config: RewardConfig = RewardConfig(),
) -> list[Reward]:
    """`score` for many rollouts: each text read, one batched Hungarian call for all of them.

    pred_masks: per rollout (n_pred, H, W) bool or None for an unread one; None for no masks at all.
    """
    if len(texts) != len(targets) or (pred_masks is not None and len(pred_masks) != len(texts)):
        raise InvalidInputError("texts, targets and pred_masks must have one entry per rollout")
    answers = [read_answer(text, target.image_size, config) for text, target in zip(texts, targets)]
    ious: list[np.ndarray | None] = []
    for i, (answer, target) in enumerate(zip(answers, targets)):
        masks = None if pred_masks is None else pred_masks[i]
        if masks is None or isinstance(answer, ParseError) or target.masks is None:
            ious.append(None)
            continue
        if len(masks) != len(answer.objects):
            raise InvalidInputError(f"rollout {i}: {len(masks)} masks for {len(answer.objects)} answered objects")
        ious.append(mask_ious(masks, target))
    return score_answers(texts, answers, targets, ious, stage, config)


def score_answers(
    texts: Sequence[str],
    answers: Sequence[Answer | ParseError],
    targets: Sequence[Target],
    ious: Sequence[np.ndarray | None],
    stage: int = 1,
    config: RewardConfig = RewardConfig(),
) -> list[Reward]:
    """Rewards of rollouts already read (`read_answer`), with their mask IoUs; one batched Hungarian
    call for all of them.

    ious: per rollout (n_pred, n_target) IoU in [0, 1] of its predicted masks with the target's masks,
    or None (no mask terms; stage 2 then raises InvalidInputError).

    Raises:
        InvalidInputError: a stage other than 1 or 2; IoUs of another shape, outside [0, 1] or NaN.
    """
    if stage not in STAGES:
        raise InvalidInputError(f"stage must be 1 or 2, got {stage!r}")
    terms_per_rollout: list[dict[str, np.ndarray] | None] = []
    matrices: list[np.ndarray] = []
    for i, (answer, target, iou) in enumerate(zip(answers, targets, ious)):
        if isinstance(answer, ParseError):
            terms_per_rollout.append(None)
            continue
        if stage == 2 and iou is None:
            raise InvalidInputError(f"rollout {i}: stage 2 scores masks, and it has none (target or predicted)")
        if iou is not None:
            iou = np.asarray(iou, dtype=np.float64)
            expected = (len(answer.objects), len(target))
            if iou.shape != expected or not np.all((iou >= 0.0) & (iou <= 1.0)):
                raise InvalidInputError(f"rollout {i}: mask IoUs must be {expected} values in [0, 1] (answered "
                                        f"objects x target objects), got shape {iou.shape}")
        terms = pair_terms(answer.boxes, answer.points, target, iou)
        terms_per_rollout.append(terms)
        matrices.append(terms["mask"] if stage == 2 else sum(terms[name] for name in TERMS))
    matchings = iter(linear_sum_assignment_batch(matrices, maximize=True))
    rewards = []
    for text, answer, target, terms in zip(texts, answers, targets, terms_per_rollout):
        fmt = format_reward(text, config.with_labels, config.empty_answer_format)
        repeat = non_repeat_reward(text)
        if terms is None:
            rewards.append(Reward(format=fmt, accuracy=0.0, non_repeat=repeat, total=fmt + repeat,
                                  error=answer.reason))
            continue
        rows, cols = next(matchings)
        n_pred = len(answer.objects)
        denominator = max(n_pred, len(target))
        means = {name: float(terms[name][rows, cols].sum()) / denominator if denominator else 0.0 for name in TERMS}
        count_match = float(n_pred == len(target))
        accuracy = 2.0 * means["mask"] if stage == 2 else sum(means.values()) + count_match
        rewards.append(Reward(format=fmt, accuracy=accuracy, non_repeat=repeat, total=fmt + accuracy + repeat,
                              count_match=count_match, n_pred=n_pred, **means))
    return rewards
