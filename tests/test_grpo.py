"""GRPO + LoRA on a toy a LoRA can learn: only LoRA weights move, the reward rises, REST keeps the
extremes, and the merged model computes what the trained one does.

The toy is the scripted tiny reasoner (`write_tiny_reasoner(scripted_answers=...)`) answering one
scene with either a perfect StAR answer (reward 8) or a think block without an answer (reward 1),
each with probability 1/2. Scripted, both first tokens' LM-head rows point along the prompt's last
embedding, so no change of the hidden state could tell them apart; the toy adds to each row a
direction orthogonal to that embedding (and to each other): the initial choice stays 50/50, and a
LoRA update of the hidden state can now favour either answer. The expected reward is read exactly
from the two first-token probabilities, so the test does not depend on sampling luck.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from star_edge.export.tiny_reasoner import GENERATION_PROMPT, SCRIPT_MARGIN, write_tiny_reasoner
from star_edge.reasoner.torch_backend import FAMILIES, TorchReasoner, quiet_transformers
from star_edge.train.answer_text import format_answer
from star_edge.train.grpo import StarGRPOConfig, StarGRPOTrainer, lora_config
from star_edge.train.grpo_data import DataConfig, grpo_dataset, synthetic_items
from star_edge.train.rewards import RewardConfig, Target, score
from star_edge.train.rollout_reward import StarReward

BAD = "<think>I cannot tell.</think>"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(checkpoint folder, manifest section, the scene, [good, bad] answers, their first tokens)."""
    item = synthetic_items(DataConfig(synthetic_stage="single", objects=(1, 1)))(0)
    height, width = item.image.shape[:2]
    good = format_answer(item.boxes, item.points, item.labels, (width, height), "grid1000", trace="Found it.")
    directory = tmp_path_factory.mktemp("toy") / "reasoner"
    section = write_tiny_reasoner(directory, seed=0, family="qwen3_vl", scripted_answers=[good, BAD])
    tokenizer = AutoTokenizer.from_pretrained(directory)
    firsts = [tokenizer(text, add_special_tokens=False).input_ids[0] for text in (good, BAD)]
    prompt_end = tokenizer(GENERATION_PROMPT, add_special_tokens=False).input_ids[-1]
    with quiet_transformers():
        model = FAMILIES["qwen3_vl"][0].from_pretrained(directory)
    with torch.no_grad():
        anchor = model.model.language_model.embed_tokens.weight[prompt_end]
        anchor = anchor / anchor.norm()
        directions = torch.randn(2, anchor.numel(), generator=torch.Generator().manual_seed(1))
        directions -= (directions @ anchor)[:, None] * anchor[None]
        directions = torch.linalg.qr(directions.T).Q.T
        for token, direction in zip(firsts, directions):
            model.lm_head.weight[token] += SCRIPT_MARGIN / math.sqrt(anchor.numel()) * direction
    with quiet_transformers():
        model.save_pretrained(directory)
    return directory, section, item, [good, BAD], firsts


def make_trainer(toy, out, **settings) -> tuple[StarGRPOTrainer, TorchReasoner]:
    directory, section, item, _, _ = toy
    reasoner = TorchReasoner.from_dir(directory, section, dtype=torch.float32)
    dataset = grpo_dataset(lambda index: item, 64, reasoner.frame, reasoner.input_size, section["prompt_template"])
    reward = StarReward(None, RewardConfig(frame=reasoner.frame, input_size=tuple(reasoner.input_size)), stage=1)
    defaults = dict(per_device_train_batch_size=8, gradient_accumulation_steps=1, num_generations=8,
                    max_completion_length=16, use_cpu=True, bf16=False, activation_checkpointing=False,
                    save_strategy="no", disable_tqdm=True, lora_rank=8, lora_alpha=16, seed=0)
    args = StarGRPOConfig(output_dir=str(out), **{**defaults, **settings})
    reasoner.model.train()
    trainer = StarGRPOTrainer(model=reasoner.model, reward_funcs=reward, args=args, train_dataset=dataset,
                              processing_class=reasoner.processor, peft_config=lora_config(args))
    return trainer, reasoner


def expected_reward(model: torch.nn.Module, reasoner: TorchReasoner, toy) -> float:
    """Sum over the two answers of P(first token) * reward, exactly."""
    _, _, item, answers, firsts = toy
    inputs = reasoner.hf_inputs(Image.fromarray(item.image), item.query)
    with torch.no_grad():
        probabilities = model(**inputs).logits[0, -1].float().softmax(-1)[firsts]
    height, width = item.image.shape[:2]
    goal = Target(item.boxes, item.points, image_size=(width, height))
    rewards = [score(text, goal, config=RewardConfig(frame="grid1000")).total for text in answers]
    return float(probabilities @ torch.tensor(rewards, dtype=probabilities.dtype))


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory):
    """The toy trained for two GRPO steps: (trainer, reasoner, weights before, expected reward before)."""
    trainer, reasoner = make_trainer(toy, tmp_path_factory.mktemp("grpo"), learning_rate=1e-2, max_steps=2)
    before = {name: value.detach().clone() for name, value in trainer.model.named_parameters()}
    trainer.model.eval()
    reward_before = expected_reward(trainer.model, reasoner, toy)
    trainer.model.train()
    trainer.train()
    trainer.model.eval()
    return trainer, reasoner, before, reward_before


def test_the_toy_starts_undecided(trained):
    assert trained[3] == pytest.approx((8 + 1) / 2, abs=0.05)


def test_grpo_steps_change_only_the_lora_weights_of_the_language_model(trained):
    trainer, _, before, _ = trained
    changed = {name for name, value in trainer.model.named_parameters() if not torch.equal(value, before[name])}
    trainable = {name for name, value in trainer.model.named_parameters() if value.requires_grad}
    assert changed and changed <= trainable
    assert all(".lora_" in name and ".language_model." in name for name in trainable)
    assert not any("visual" in name for name in trainable)
    lora_targets = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable}
    assert lora_targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_a_few_steps_raise_the_mean_reward(trained, toy):
    trainer, reasoner, _, reward_before = trained
    assert expected_reward(trainer.model, reasoner, toy) > reward_before + 2.0
    logged = [row["reward"] for row in trainer.state.log_history if "reward" in row]
    assert len(logged) == 2 and logged[-1] >= logged[0]
    assert {"reward/format", "reward/accuracy", "reward/group_std", "completions/mean_length"} <= set(
        trainer.state.log_history[0])


def test_the_merged_bundle_model_computes_what_the_trained_model_does(trained, toy, tmp_path):
    from star_edge.export.merge import merge_lora

    trainer, reasoner, _, _ = trained
    directory, section, item, _, _ = toy
    trainer.model.save_pretrained(tmp_path / "adapter")
    report = merge_lora(directory, tmp_path / "adapter", tmp_path / "merged")
    assert report.lora_modules > 0 and report.adapter_effect > 1.0
    merged = TorchReasoner.from_dir(tmp_path / "merged", section, dtype=torch.float32)
    inputs = reasoner.hf_inputs(Image.fromarray(item.image), item.query)
    with torch.no_grad():
        expected = trainer.model(**inputs).logits
        actual = merged.model(**inputs).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_rest_keeps_the_best_and_worst_of_the_expanded_rollouts(toy, tmp_path):
    trainer, _ = make_trainer(toy, tmp_path, learning_rate=1e-9, max_steps=1, num_generations=4,
                              per_device_train_batch_size=4, rest_rollouts=16)
    trainer.train()
    row = trainer.state.log_history[0]
    # 16 draws of good (8) or bad (1): keeping the 2 best and 2 worst keeps two of each
    assert row["reward"] == pytest.approx((8 + 8 + 1 + 1) / 4)
    assert row["rest/range_after"] == pytest.approx(7.0) and row["rest/zero_std_after"] == 0.0
    assert row["rest/std_after"] > row["rest/std_before"]
    assert 1.0 < row["rest/mean_before"] < 8.0 and row["rest/mean_after"] == pytest.approx(4.5)
    assert row["reward/group_std"] == pytest.approx(np.std([8, 8, 1, 1], ddof=1))


def test_rest_settings_are_checked():
    from star_edge.errors import InvalidInputError

    for bad in ({"rest_rollouts": 6}, {"rest_rollouts": 12, "num_generations": 8}):
        with pytest.raises(InvalidInputError):
            StarGRPOConfig(output_dir="unused", per_device_train_batch_size=8, gradient_accumulation_steps=1,
                           num_generations=bad.get("num_generations", 4), use_cpu=True, bf16=False,
                           rest_rollouts=bad["rest_rollouts"])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_full_fine_tuning_freezes_exactly_the_vision_tower(family, tmp_path):
    from star_edge.errors import InvalidInputError
    from star_edge.train.grpo import freeze_vision_tower

    section = write_tiny_reasoner(tmp_path, family=family)
    model = TorchReasoner.from_dir(tmp_path, section, dtype=torch.float32).model
    vision = model.model.visual
    trainable = freeze_vision_tower(model)
    assert not any(parameter.requires_grad for parameter in vision.parameters())
    assert all(parameter.requires_grad for parameter in model.model.language_model.parameters())
    assert model.lm_head.weight.requires_grad
    frozen = {id(parameter) for parameter in vision.parameters()}
    assert trainable == sum(p.numel() for p in model.parameters() if id(p) not in frozen) > 0
    args = dict(output_dir="unused", per_device_train_batch_size=4, num_generations=4, use_cpu=True, bf16=False)
    assert lora_config(StarGRPOConfig(**args, lora_rank=0)) is None
    assert lora_config(StarGRPOConfig(**args, lora_rank=8)).r == 8
    with pytest.raises(InvalidInputError, match="lora_rank"):
        StarGRPOConfig(**args, lora_rank=-1)
