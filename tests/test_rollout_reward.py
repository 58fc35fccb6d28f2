"""The TRL reward function: one SAM decode call per image for all its rollouts, and the same rewards
as scoring each rollout alone with its own masks."""

from __future__ import annotations

import numpy as np
import pytest

from star_edge.export.tiny_sam import make_tiny_sam
from star_edge.sam import MaskDecoder
from star_edge.train.answer_text import format_answer
from star_edge.train.grpo_data import DataConfig, synthetic_items
from star_edge.train.rewards import RewardConfig, Target, read_answer, score
from star_edge.train.rollout_reward import StarReward, completion_texts


class CountingDecoder:
    """A MaskDecoder that counts its calls."""

    def __init__(self, decoder: MaskDecoder) -> None:
        self.decoder, self.embeds, self.decodes = decoder, 0, 0

    def embed(self, image):
        self.embeds += 1
        return self.decoder.embed(image)

    def decode(self, embedding, boxes, points):
        self.decodes += 1
        return self.decoder.decode(embedding, boxes, points)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def decoder() -> MaskDecoder:
    return MaskDecoder.from_module(make_tiny_sam(seed=0)[0])


def rollouts(item, shifts):
    height, width = item.image.shape[:2]
    texts = [format_answer(item.boxes + shift, item.points + shift, item.labels, (width, height), "grid1000",
                           trace="Here.") for shift in shifts]
    return texts + ["<think>none</think><answer>nope</answer>", "<think>Nothing.</think><answer>[]</answer>"]


@pytest.mark.parametrize("stage", [1, 2])
def test_one_decode_per_image_and_the_same_rewards_as_one_by_one(decoder, stage):
    items = [synthetic_items(DataConfig(synthetic_stage="dense", objects=(2, 3)))(i) for i in range(2)]
    config = RewardConfig(frame="grid1000")
    texts, targets, images, keys = [], [], [], []
    for item in items:
        height, width = item.image.shape[:2]
        target = Target(item.boxes, item.points, item.masks, image_size=(width, height))
        for text in rollouts(item, [0, 3, -20]):
            texts.append(text)
            targets.append(target)
            images.append(item.image)
            keys.append(item.sample_id)
    counting = CountingDecoder(decoder)
    logged = {}
    totals = StarReward(counting, config, stage)(
        prompts=[None] * len(texts), completions=[[{"role": "assistant", "content": t}] for t in texts],
        target=targets, sam_image=images, sample_id=keys, log_metric=logged.__setitem__)
    assert counting.decodes == 2 and counting.embeds == 2
    alone = []
    for text, target, image in zip(texts, targets, images):
        answer = read_answer(text, target.image_size, config)
        masks = None
        if not isinstance(answer, Exception):
            masks = (decoder.decode(decoder.embed(image), answer.boxes.astype(float), answer.points.astype(float))[0]
                     if len(answer.objects) else np.zeros((0, *image.shape[:2]), dtype=bool))
        alone.append(score(text, target, masks, stage=stage, config=config).total)
    np.testing.assert_allclose(totals, alone)
    assert logged["reward/total"] == pytest.approx(np.mean(alone))
    assert logged["reward/parsed"] == pytest.approx(4 / 5)


def test_completion_texts_reads_strings_and_messages():
    assert completion_texts(["a", [{"role": "assistant", "content": "b"}],
                             [{"role": "assistant", "content": [{"type": "text", "text": "c"}]}]]) == ["a", "b", "c"]
