"""StAR's reward as a TRL reward function, with SAM in the loop.

`StarReward` is a plain callable `(prompts, completions, **columns) -> list[float]`, as TRL's
GRPOTrainer calls its reward functions; the columns are those of `grpo_data` rows (target,
sam_image, sample_id). Scoring a batch of rollouts:

1. read every completion's answer (`rewards.read_answer`: the runtime parser, original pixels);
2. per distinct image, embed it once and decode the box + point prompts of all its rollouts' objects
   in ONE `MaskDecoder.decode` call, then take the IoU of all those masks with the target masks in
   one bit-packed `pairwise_iou` call (`Target.mask_iou`: the target's ignore region left out);
3. score all rollouts with ONE batched Hungarian call (`rewards.score_answers`).

The per-term means (format, accuracy, non_repeat, box_iou, box_l1, point, mask, count_match,
parsed) go to TRL's `log_metric` as "reward/<term>".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import numpy as np

from star_edge.answer import Answer, ParseError
from star_edge.train.rewards import Reward, RewardConfig, Target, read_answer, score_answers


def completion_texts(completions: Sequence[Any]) -> list[str]:
    """Completion texts from TRL's completions: strings, or conversational [{"role", "content"}] lists."""
    texts = []
    for completion in completions:
        if isinstance(completion, str):
            texts.append(completion)
        else:
            content = completion[-1]["content"]
            texts.append(content if isinstance(content, str) else "".join(
                part.get("text", "") for part in content if isinstance(part, dict)))
    return texts


def mean_terms(rewards: Sequence[Reward]) -> dict[str, float]:
    """The mean of every logged number over rollouts (see `Reward.as_dict`)."""
    rows = [reward.as_dict() for reward in rewards]
    return {name: float(np.mean([row[name] for row in rows])) for name in rows[0]} if rows else {}


class StarReward:
    """StAR's total reward for TRL, SAM decoding the answered prompts (module docstring).

    mask_decoder: a `star_edge.sam.MaskDecoder` (or anything with its embed/decode), or None to score
    without masks (stage 1 then drops the mask tier; stage 2 needs masks). stage: 1 or 2.
    """

    def __init__(self, mask_decoder: Any | None, config: RewardConfig = RewardConfig(), stage: int = 1) -> None:
        self.mask_decoder = mask_decoder
        self.config = config
        self.stage = stage
        self.__name__ = "star"

    def __call__(self, prompts: list, completions: list, *, target: list[Target], sam_image: list[np.ndarray],
                 sample_id: list[str], log_metric: Callable[[str, float], None] | None = None,
                 **_: Any) -> list[float]:
        """One total reward per completion; rows carry the `grpo_data` columns."""
        rewards = self.score(completion_texts(completions), target, sam_image, sample_id)
        if log_metric is not None:
            for name, value in mean_terms(rewards).items():
                log_metric(f"reward/{name}", value)
        return [reward.total for reward in rewards]

    def score(self, texts: Sequence[str], targets: Sequence[Target], images: Sequence[np.ndarray],
              keys: Sequence[str]) -> list[Reward]:
        """Rewards of rollouts: texts, their targets, the original images (H, W, 3) uint8 and sample
        keys (rollouts of one key share the image and target)."""
        answers = [read_answer(text, target.image_size, self.config) for text, target in zip(texts, targets)]
        ious = self._mask_ious(answers, targets, images, keys)
        return score_answers(texts, answers, targets, ious, self.stage, self.config)

    def _mask_ious(self, answers: Sequence[Answer | ParseError], targets: Sequence[Target],
                   images: Sequence[np.ndarray], keys: Sequence[str]) -> list[np.ndarray | None]:
        """Per rollout (n_pred, n_target) mask IoU, one decode call per image; None where unscored."""
        ious: list[np.ndarray | None] = [None] * len(answers)
        if self.mask_decoder is None:
            return ious
        groups: dict[str, list[int]] = {}
        for i, (answer, target) in enumerate(zip(answers, targets)):
            if isinstance(answer, Answer) and target.masks is not None:
                groups.setdefault(keys[i], []).append(i)
        for rollouts in groups.values():
            target = targets[rollouts[0]]
            counts = [len(answers[i].objects) for i in rollouts]
            if sum(counts) == 0 or len(target) == 0:
                for i, count in zip(rollouts, counts):
                    ious[i] = np.zeros((count, len(target)))
                continue
            boxes = np.concatenate([answers[i].boxes for i in rollouts]).astype(np.float64)
            points = np.concatenate([answers[i].points for i in rollouts]).astype(np.float64)
            embedding = self.mask_decoder.embed(images[rollouts[0]])
            masks, _ = self.mask_decoder.decode(embedding, boxes, points)
            all_ious = target.mask_iou(masks)
            for i, part in zip(rollouts, np.split(all_ious, np.cumsum(counts)[:-1])):
                ious[i] = part
        return ious
