"""GRPO with LoRA on TRL's GRPOTrainer, plus REST (StAR Stage 2), DESIGN section 8.

`lora_rank` 0 trains the language model's own weights instead of an adapter (full fine-tuning, the
comparison a model as small as the demo reasoner invites); the vision tower stays frozen either way.

TRL owns sampling, the group-normalised advantages ((r - group mean) / (group std + eps), one value
per rollout for all its tokens; TRL's eps is 1e-4 where DESIGN section 8 writes 1e-6: only a group
whose rewards differ by less than ~1e-3 would tell them apart, and an all-equal group gets 0 either
way), the clipped policy-ratio loss, the optional KL term, checkpoints, accelerate / DeepSpeed /
FSDP and vLLM generation. `StarGRPOTrainer` overrides three small methods
for what TRL cannot express:

- `_generate_single_turn` (REST only, training only): draws `rest_rollouts` (n) rollouts per prompt
  in n / m rounds of TRL's own generation (HF generate or vLLM), scores them all with the trainer's
  reward functions, and hands on per prompt the m = `num_generations` that `rest.select_extremes`
  keeps. TRL then scores those m again and computes the advantages over them alone, as StAR does;
  REST thus sits between scoring and the advantage computation.
- `_generate_and_score_completions`: only records the batch's rows, which REST's scoring needs (TRL
  passes the rows to its reward functions but not to the generation step).
- `_calculate_rewards`: also logs the mean within-group standard deviation of the total reward
  ("reward/group_std"; TRL's own "reward_std" is over the whole batch).
- `_load_optimizer_and_scheduler`: a checkpoint carried without its optimiser state
  (`star_edge.train.carry`) still restores the learning-rate schedule; Trainer would restart it.

REST needs whole groups on each process: per_device_train_batch_size * steps_per_generation must be a
multiple of num_generations (TRL hands each process a contiguous slice of the prompt stream).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig
from torch import nn
from trl import GRPOConfig, GRPOTrainer
from trl.data_utils import is_conversational
from trl.trainer.utils import is_async_callable, nanstd

from star_edge.errors import InvalidInputError
from star_edge.train.carry import OPTIMIZER_FILES
from star_edge.train.rest import reward_spread, select_extremes

LANGUAGE_MODEL_LINEAR = (
    r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
)
"""Every linear layer of a Qwen-VL language model (peft matches the full module name); the vision
tower and the LM head are left out."""


@dataclass
class StarGRPOConfig(GRPOConfig):
    """TRL's GRPOConfig with StAR's defaults (Stage 1 of the reference, ysj9909/StAR
    training_scripts/run_star_7b_stage1.sh) and the LoRA and REST knobs.

    Any GRPOConfig / TrainingArguments field may be set as well (deepspeed, bf16, use_vllm, ...).
    """

    learning_rate: float = 1e-5
    """AdamW learning rate: StAR Stage 1 1e-5, Stage 2 5e-6."""
    weight_decay: float = 1e-3
    """AdamW weight decay (StAR: 1e-3)."""
    lr_scheduler_type: str = "constant"
    """Learning-rate schedule (StAR's verl default: constant, no warm-up)."""
    num_generations: int | None = 16
    """Rollouts per prompt in the advantage group: StAR 16 (Stage 2: the m kept by REST)."""
    per_device_train_batch_size: int = 2
    """Rollouts per device per micro-step (StAR: 2)."""
    gradient_accumulation_steps: int = 16
    """Micro-steps per optimiser step (StAR: 16, i.e. 16 prompts x 16 rollouts on 8 GPUs)."""
    max_completion_length: int | None = 2048
    """Most tokens per rollout (StAR: 2048)."""
    beta: float = 0.0
    """KL weight to the reference policy (StAR: 0 in both stages)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (StAR: 1.0; top-p stays 1.0)."""
    activation_checkpointing: bool | None = True
    """Recompute activations in the backward pass (StAR: on); transformers' new name of
    gradient_checkpointing."""
    logging_steps: float = 1
    """Optimiser steps between metric rows."""
    save_steps: float = 100
    """Optimiser steps between checkpoints (StAR: 100 in Stage 1, 5 in Stage 2)."""
    report_to: Any = "none"
    """No external trackers by default; metrics go to the run's JSONL."""
    lora_rank: int = 64
    """LoRA rank (StAR: 64); 0 fine-tunes the language model's own weights (no adapter)."""
    lora_alpha: int = 64
    """LoRA alpha (StAR: 64)."""
    lora_dropout: float = 0.0
    """LoRA dropout (StAR: peft's default 0; GRPO's ratios want deterministic forwards)."""
    lora_target_modules: str = LANGUAGE_MODEL_LINEAR
    """Module-name regex of the LoRA targets: all linear layers of the language model."""
    rest_rollouts: int = 0
    """REST's expanded rollouts per prompt n (StAR Stage 2: 256); 0 disables REST. A multiple of
    num_generations, which REST keeps (m)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora_rank < 0:
            raise InvalidInputError(f"lora_rank must be >= 0 (0: full fine-tuning), got {self.lora_rank}")
        if self.rest_rollouts and (self.rest_rollouts < self.num_generations
                                   or self.rest_rollouts % self.num_generations):
            raise InvalidInputError(f"rest_rollouts ({self.rest_rollouts}) must be a multiple of num_generations "
                                    f"({self.num_generations}) and at least as large")
        if self.rest_rollouts and self.num_generations % 2:
            raise InvalidInputError(f"REST keeps the m/2 best and m/2 worst: num_generations must be even, "
                                    f"got {self.num_generations}")
        if self.rest_rollouts and (self.per_device_train_batch_size * self.steps_per_generation) % self.num_generations:
            raise InvalidInputError("REST needs whole prompt groups on each process: per_device_train_batch_size * "
                                    "steps_per_generation must be a multiple of num_generations")


def lora_config(args: StarGRPOConfig) -> LoraConfig | None:
    """The peft LoRA configuration of `args` (rank, alpha, dropout, language-model linear layers);
    None for full fine-tuning (`lora_rank` 0)."""
    if args.lora_rank == 0:
        return None
    return LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=args.lora_target_modules, task_type="CAUSAL_LM")


def freeze_vision_tower(model: nn.Module) -> int:
    """Stop gradients to the vision tower and its merger (parameters under `model.visual`), as LoRA
    leaves them untouched; returns how many parameters stay trainable (language model, lm_head)."""
    trainable = 0
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(not name.startswith("model.visual."))
        trainable += parameter.numel() if parameter.requires_grad else 0
    return trainable


class StarGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with REST and the group-spread metric (module docstring). Construct it like
    GRPOTrainer, with a StarGRPOConfig as `args`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batch_rows: list[dict[str, Any]] | None = None
        if self.args.rest_rollouts and any(isinstance(f, nn.Module) or is_async_callable(f) for f in self.reward_funcs):
            raise InvalidInputError("REST scores its candidates with plain synchronous reward functions only")

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """TRL's step, with the batch's rows kept for REST's scoring."""
        self._batch_rows = inputs
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self._batch_rows = None

    def _generate_single_turn(
        self,
        prompt_ids: list[list[int]],
        images: list | None,
        multimodal_fields: dict[str, Any],
        num_generations: int,
        has_tool_images: bool = False,
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """TRL's generation; in REST training, n / m rounds of it and the m extremes per prompt."""
        generate = super()._generate_single_turn
        if not (self.args.rest_rollouts and self.model.training):
            return generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        m = num_generations
        rounds = self.args.rest_rollouts // m
        drawn = []
        for _ in range(rounds):
            drawn.append(generate(prompt_ids, images, multimodal_fields, m, has_tool_images))
        groups = len(prompt_ids) // m
        candidate_ids = [ids for round_ids, _ in drawn for ids in round_ids]  # (round, row) order
        rewards = self._candidate_rewards(candidate_ids, rounds)
        # candidate k of group g is round k // m, row g * m + k % m
        grid = rewards.reshape(rounds, groups, m).transpose(1, 0, 2).reshape(groups, rounds * m)
        keep = select_extremes(grid, m)
        rounds_of, columns_of = np.divmod(keep, m)
        completion_ids: list[list[int]] = []
        logprobs: list[list[float]] | None = None if drawn[0][1] is None else []
        for group in range(groups):
            for round_index, column in zip(rounds_of[group], columns_of[group]):
                ids, round_logprobs = drawn[round_index]
                completion_ids.append(ids[group * m + int(column)])
                if logprobs is not None:
                    logprobs.append(round_logprobs[group * m + int(column)])
        self._log_rest_spread(grid, np.take_along_axis(grid, keep, axis=1))
        return completion_ids, logprobs

    def _candidate_rewards(self, candidate_ids: list[list[int]], rounds: int) -> np.ndarray:
        """Weighted total reward of each candidate, (rounds * rows,) float64, as TRL would compute it."""
        rows = self._batch_rows * rounds
        prompts = [row["prompt"] for row in rows]
        texts = self.processing_class.batch_decode(candidate_ids, skip_special_tokens=True)
        if is_conversational({"prompt": prompts[0]}):
            completions = [[{"role": "assistant", "content": text}] for text in texts]
        else:
            completions = texts
        columns = {key: [row[key] for row in rows] for key in rows[0] if key not in ("prompt", "completion")}
        total = np.zeros(len(rows))
        for weight, reward_func in zip(self.reward_weights.tolist(), self.reward_funcs):
            values = reward_func(prompts=prompts, completions=completions, completion_ids=candidate_ids,
                                 trainer_state=self.state, **columns)
            total += weight * np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        return np.nan_to_num(total, nan=0.0)

    def _log_rest_spread(self, drawn: np.ndarray, kept: np.ndarray) -> None:
        """Log the reward spread within groups before (all n) and after (kept m) REST, all processes."""
        device = self.accelerator.device
        drawn = self.accelerator.gather(torch.tensor(drawn, device=device)).cpu().numpy()
        kept = self.accelerator.gather(torch.tensor(kept, device=device)).cpu().numpy()
        for when, values in (("before", drawn), ("after", kept)):
            for name, value in reward_spread(values).items():
                self._metrics["train"][f"rest/{name}_{when}"].append(value)
        self._metrics["train"]["rest/mean_before"].append(float(drawn.mean()))
        self._metrics["train"]["rest/mean_after"].append(float(kept.mean()))

    def _calculate_rewards(self, inputs: list[dict[str, Any]], prompts: list, completions: list,
                           completion_ids_list: list[list[int]]) -> torch.Tensor:
        """TRL's rewards (N, reward functions), gathered; logs the mean within-group std of the total."""
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        mode = "train" if self.model.training else "eval"
        group = self.num_generations if mode == "train" else self.num_generations_eval
        weights = self.reward_weights.to(rewards_per_func.device)
        totals = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1).view(-1, group)
        self._metrics[mode]["reward/group_std"].append(nanstd(totals, dim=1).mean().item())
        return rewards_per_func

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Trainer's loading; for a checkpoint without optimiser state (Trainer then loads neither),
        the scheduler's state alone, and the learning rate it sets for the next step."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.is_deepspeed_enabled:
            return
        folder = Path(checkpoint)
        scheduler = folder / "scheduler.pt"
        if any((folder / name).exists() for name in OPTIMIZER_FILES) or not scheduler.is_file():
            return
        self.lr_scheduler.load_state_dict(torch.load(scheduler, weights_only=True))
        for group, rate in zip(self.optimizer.param_groups, self.lr_scheduler.get_last_lr()):
            group["lr"] = rate
