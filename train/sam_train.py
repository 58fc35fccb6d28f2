"""Training the demo model's tiny SAM (DESIGN section 12): box + point prompt -> the object's mask.

A plain loop in the nanoGPT manner, the same shape as `sft`:

- Model: segment_anything's own classes at the `export.tiny_sam` dims (1.2 M parameters).
- Data: scene `samples + i` of the synthetic train stream (`sam_data`); every object of a scene
  is one prompt (its ground-truth box and point, as the runtime gets them), so one image encoding
  serves 1-4 prompts. "samples" counts scenes.
- Forward: the image encoder on the batch, then per scene the prompt encoder and the mask decoder's
  `predict_masks` (every output: the single-mask one and the multimask ones), and
  `Sam.postprocess_masks` to original pixels, where the loss is taken.
- Loss per prompt: BCE + dice of the single-mask output, plus the lowest BCE + dice among the
  multimask outputs (SAM's ambiguity-aware loss: only the best output learns), plus the MSE of the
  IoU head against every output's actual IoU (the runtime keeps the multimask output with the
  highest predicted IoU). The batch loss is the mean over its prompts.
- Optimiser: AdamW at a constant `lr`, then cosine decay to `min_lr_ratio * lr` from
  `decay_start_step` to `total_steps`.
- Checkpoints: `run_dir/checkpoint/` holds `sam/` (a bundle sam/ folder, float32), optimizer.pt,
  rng.pt and trainer_state.json (step, samples, elapsed_s, the config), replaced atomically;
  `run_dir/log.csv` logs the loss, throughput and the periodic mask IoU (`sam_eval.evaluate`).

`python -m star_edge.train.sam_train --run-dir DIR [--resume] [--max-seconds S] [--threads T]
[--export DIR]` runs it from a shell (see `main`).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from star_edge.errors import InvalidInputError
from star_edge.export.tiny_sam import make_tiny_sam, write_sam_dir
from star_edge.sam.checkpoints import WEIGHTS_FILE, read_sam_config
from star_edge.train import checkpoint_swap, csv_log
from star_edge.train.data.synthetic import split_seed
from star_edge.train.sam_data import SamScene, ScenePrompts, model_inputs, scene_at, split_scenes
from star_edge.train.sam_eval import evaluate, export_sam

LOG_FIELDS = ("step", "samples", "lr", "loss", "samples_per_s", "elapsed_s", "mask_iou", "eval_scenes")


@dataclass
class SamTrainConfig:
    """Every knob of a tiny-SAM run. Defaults: the recipe measured in DESIGN section 12 (batch 16,
    AdamW 3e-4, BCE + dice) with the schedule of the shipped model's run (docs/demo-model)."""

    batch_size: int = 16
    """Scenes per optimiser step (each with all its objects as prompts)."""
    lr: float = 3e-4
    """Learning rate of AdamW before the decay."""
    weight_decay: float = 0.01
    """AdamW weight decay (torch's default)."""
    decay_start_step: int = 4000
    """The learning rate is constant up to this step..."""
    total_steps: int = 6500
    """... then decays along a cosine to `min_lr_ratio * lr` here, where the run ends."""
    min_lr_ratio: float = 0.1
    """Floor of the decay, as a fraction of `lr`."""
    iou_loss_weight: float = 1.0
    """Weight of the IoU head's MSE in the loss."""
    log_every: int = 10
    """Steps between CSV log rows."""
    checkpoint_every: int = 100
    """Steps between checkpoints (one is always written at the end)."""
    eval_every: int = 250
    """Steps between evaluations of the checkpoint (0 disables); a multiple of `log_every`, so that
    the evaluation time stays out of the logged throughput."""
    eval_count: int = 300
    """Scenes per evaluation."""
    eval_split: str = "val"
    """Split of the periodic evaluations (the final number is taken on "test", see `main`)."""
    data_seed: int = 0
    """Data seed: train scenes come from split_seed(data_seed, "train")."""
    seed: int = 0
    """Seeds the initial weights and the torch RNG."""

    def __post_init__(self) -> None:
        least = {"batch_size": 1, "total_steps": 1, "log_every": 1, "checkpoint_every": 1, "decay_start_step": 0,
                 "eval_every": 0, "eval_count": 0}
        low = [f"{name} {getattr(self, name)} (at least {bound})" for name, bound in least.items()
               if getattr(self, name) < bound]
        if low or not self.lr > 0:
            raise InvalidInputError(f"SAM training settings out of range: "
                                    f"{', '.join(low) or f'lr {self.lr} (must be > 0)'}")


@dataclass
class TrainerState:
    """Where a run is: optimiser steps, scenes consumed, training seconds (evaluations included)."""

    step: int = 0
    samples: int = 0
    elapsed_s: float = 0.0


def learning_rate(step: int, config: SamTrainConfig) -> float:
    """`lr` until `decay_start_step`, then cosine to `min_lr_ratio * lr` at `total_steps`."""
    if step < config.decay_start_step:
        return config.lr
    span = max(1, config.total_steps - config.decay_start_step)
    progress = min(1.0, (step - config.decay_start_step) / span)
    floor = config.min_lr_ratio * config.lr
    return floor + 0.5 * (config.lr - floor) * (1.0 + math.cos(math.pi * progress))


def bce_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-mask BCE (mean over pixels) + dice loss.

    logits: (K, M, H, W) float32; targets: (K, H, W) float32 in {0, 1}. Returns (K, M) float32.
    """
    expanded = targets[:, None].expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, expanded, reduction="none").mean(dim=(2, 3))
    probabilities = torch.sigmoid(logits)
    overlap = (probabilities * expanded).sum(dim=(2, 3))
    total = probabilities.sum(dim=(2, 3)) + expanded.sum(dim=(2, 3))
    return bce + 1.0 - (2.0 * overlap + 1.0) / (total + 1.0)


def mask_ious(logits: torch.Tensor, targets: torch.Tensor, threshold: float) -> torch.Tensor:
    """IoU of each thresholded output with its target: logits (K, M, H, W), targets (K, H, W)
    float32 in {0, 1} -> (K, M) float32, 1.0 where both masks are empty. No gradient."""
    with torch.no_grad():
        predicted = logits > threshold
        target = targets[:, None].bool()
        intersection = (predicted & target).sum(dim=(2, 3)).float()
        union = (predicted | target).sum(dim=(2, 3)).float()
        return torch.where(union > 0, intersection / union.clamp(min=1.0), torch.ones_like(union))


def prompt_losses(
    logits: torch.Tensor, iou_predictions: torch.Tensor, targets: torch.Tensor, threshold: float,
    iou_loss_weight: float,
) -> torch.Tensor:
    """The loss of each prompt (module docstring).

    logits: (K, M, H, W) float32, output 0 the single-mask output, 1.. the multimask outputs;
    iou_predictions: (K, M) float32; targets: (K, H, W) float32. Returns (K,) float32.
    """
    per_output = bce_dice(logits, targets)
    best_multimask = per_output[:, 1:].min(dim=1).values
    iou_error = F.mse_loss(iou_predictions, mask_ious(logits, targets, threshold), reduction="none")
    return per_output[:, 0] + best_multimask + iou_loss_weight * iou_error.mean(dim=1)


class SamTrainer:
    """Trains a segment_anything `Sam` in place on scenes from `source`; checkpoints into `run_dir`."""

    def __init__(self, run_dir: str | Path, config: SamTrainConfig,
                 source: Callable[[int], SamScene] | None = None,
                 eval_scenes: Sequence[SamScene] = ()) -> None:
        """source: stream index -> scene (default: the train split of `config.data_seed`)."""
        self.run_dir = Path(run_dir)
        self.config = config
        train_stream = split_seed(config.data_seed, "train")
        self.source = source or (lambda index: scene_at(train_stream, index))
        self.eval_scenes = list(eval_scenes)
        self.sam, self.sam_config = make_tiny_sam(seed=config.seed)
        self.sam.train()
        self.optimizer = torch.optim.AdamW(self.sam.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.state = TrainerState()
        torch.manual_seed(config.seed)

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoint"

    def resume(self) -> bool:
        """Load `run_dir/checkpoint` if there is one (weights, optimiser, RNG, position); either
        way, rows that log.csv holds past the step the run goes on from (a run stopped between
        checkpoints, or before its first) are dropped, as the run logs those steps again."""
        checkpoint_swap.recover(self.checkpoint_dir)
        state_file = self.checkpoint_dir / checkpoint_swap.STATE_FILE
        found = state_file.is_file()
        if found:
            self.sam_config = read_sam_config(self.checkpoint_dir / "sam")
            self.sam.load_state_dict(load_file(str(self.checkpoint_dir / "sam" / WEIGHTS_FILE)))
            optimizer = torch.load(self.checkpoint_dir / "optimizer.pt", map_location="cpu", weights_only=True)
            self.optimizer.load_state_dict(optimizer)
            torch.set_rng_state(torch.load(self.checkpoint_dir / "rng.pt", map_location="cpu", weights_only=True))
            self.state = TrainerState(**json.loads(state_file.read_text())["state"])
        csv_log.rewind(self.run_dir / "log.csv", LOG_FIELDS, self.state.step)
        return found

    def train(self, max_steps: int | None = None, max_seconds: float | None = None,
              on_log: Callable[[dict[str, Any]], None] | None = None) -> TrainerState:
        """Run to `total_steps`, or `max_steps` more steps, or `max_seconds`; then checkpoint."""
        config = self.config
        stop_step = config.total_steps if max_steps is None else min(config.total_steps,
                                                                     self.state.step + max_steps)
        started = time.perf_counter()
        elapsed_before = self.state.elapsed_s
        window_loss, window_steps, window_samples, window_start = 0.0, 0, 0, time.perf_counter()
        while self.state.step < stop_step:
            lr = learning_rate(self.state.step, config)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            first = self.state.samples
            loss = self.step([self.source(first + i) for i in range(config.batch_size)])
            self.state.step += 1
            self.state.samples += config.batch_size
            self.state.elapsed_s = elapsed_before + time.perf_counter() - started
            window_loss, window_steps = window_loss + loss, window_steps + 1
            window_samples += config.batch_size
            out_of_time = max_seconds is not None and time.perf_counter() - started >= max_seconds
            if self.state.step % config.log_every == 0 or self.state.step == stop_step or out_of_time:
                seconds = time.perf_counter() - window_start
                self._log({"step": self.state.step, "samples": self.state.samples, "lr": lr,
                           "loss": window_loss / window_steps,
                           "samples_per_s": window_samples / max(seconds, 1e-9),
                           "elapsed_s": round(self.state.elapsed_s, 1)}, on_log)
                window_loss, window_steps, window_samples = 0.0, 0, 0
                window_start = time.perf_counter()
            if config.eval_every and self.eval_scenes and self.state.step % config.eval_every == 0:
                self.save()  # evaluated on the written checkpoint, also at the step time runs out
                self._log_evaluation(on_log)
                self.state.elapsed_s = elapsed_before + time.perf_counter() - started
                window_start = time.perf_counter()
            elif self.state.step % config.checkpoint_every == 0:
                self.save()
            if out_of_time:
                break
        self.save()
        return self.state

    def step(self, scenes: Sequence[SamScene]) -> float:
        """One optimiser step on `scenes`; returns the batch loss (mean over all prompts)."""
        losses = self.losses(scenes)
        loss = losses.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def losses(self, scenes: Sequence[SamScene]) -> torch.Tensor:
        """(sum of K over the scenes,) float32: the loss of every prompt, with gradient."""
        sam = self.sam
        pixels, prompts = model_inputs(scenes, int(sam.image_encoder.img_size),
                                       self.sam_config["pixel_mean"], self.sam_config["pixel_std"])
        features = sam.image_encoder(pixels)
        dense_pe = sam.prompt_encoder.get_dense_pe()
        per_scene = [self._scene_losses(features[i : i + 1], dense_pe, scene_prompts)
                     for i, scene_prompts in enumerate(prompts)]
        return torch.cat(per_scene)

    def _scene_losses(self, features: torch.Tensor, dense_pe: torch.Tensor,
                      prompts: ScenePrompts) -> torch.Tensor:
        """features (1, C, h, w) of one scene -> (K,) losses of its prompts."""
        sam = self.sam
        sparse, dense = sam.prompt_encoder(points=(prompts.points, prompts.point_labels),
                                           boxes=prompts.boxes, masks=None)
        low_res, iou_predictions = sam.mask_decoder.predict_masks(features, dense_pe, sparse, dense)
        logits = sam.postprocess_masks(low_res, prompts.input_size, prompts.original_size)
        return prompt_losses(logits, iou_predictions, prompts.targets,
                             float(self.sam_config["mask_threshold"]), self.config.iou_loss_weight)

    def save(self) -> Path:
        """Write `run_dir/checkpoint`, replacing the previous one only once the new one is complete
        (`checkpoint_swap`)."""
        staging = checkpoint_swap.staging_folder(self.checkpoint_dir)
        write_sam_dir(self.sam, self.sam_config, staging / "sam")
        torch.save(self.optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(torch.get_rng_state(), staging / "rng.pt")
        (staging / checkpoint_swap.STATE_FILE).write_text(json.dumps(
            {"state": asdict(self.state), "config": asdict(self.config)}, indent=2))
        return checkpoint_swap.swap_in(staging, self.checkpoint_dir)

    def _log_evaluation(self, on_log: Callable[[dict[str, Any]], None] | None) -> None:
        result = evaluate(self.checkpoint_dir / "sam", self.eval_scenes)
        self._log({"step": self.state.step, "samples": self.state.samples,
                   "elapsed_s": round(self.state.elapsed_s, 1), "mask_iou": result.mask_iou,
                   "eval_scenes": result.scenes}, on_log)

    def _log(self, row: dict[str, Any], on_log: Callable[[dict[str, Any]], None] | None) -> None:
        csv_log.append_row(self.run_dir / "log.csv", LOG_FIELDS, row)
        if on_log is not None:
            on_log(row)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: train (or resume) a run, evaluate its checkpoint, or export it.

    Without --export or --evaluate: train in --run-dir (a folder holding a checkpoint needs
    --resume; the config given then applies from the resumed step on). --evaluate: mean mask IoU of
    the checkpoint on --test-count scenes of the test split. --export DIR: write the bundle sam/
    folder (float16 if that costs < 0.005 IoU on the test scenes, else float32), with the report in
    run-dir/export_report.json.
    """
    parser = argparse.ArgumentParser(description="Train the demo model's tiny SAM (resumable).")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--max-seconds", type=float, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--export", type=Path, default=None, help="write the sam/ folder here")
    parser.add_argument("--evaluate", action="store_true", help="evaluate the checkpoint on the test split")
    parser.add_argument("--test-count", type=int, default=500, help="test scenes of --export/--evaluate")
    for name, default in asdict(SamTrainConfig()).items():
        parser.add_argument("--" + name.replace("_", "-"), default=default, type=type(default))
    args = parser.parse_args(argv)
    try:
        _run(args)
    except InvalidInputError as exc:
        parser.exit(2, f"error: {exc}\n")


def _run(args: argparse.Namespace) -> None:
    """`main` after parsing."""
    if args.threads:
        torch.set_num_threads(args.threads)
    config = SamTrainConfig(**{name: getattr(args, name) for name in asdict(SamTrainConfig())})
    sam_dir = args.run_dir / "checkpoint" / "sam"
    if args.export or args.evaluate:
        scenes = split_scenes(config.data_seed, "test", args.test_count)
        if args.export:
            report = export_sam(sam_dir, args.export, scenes)
            (args.run_dir / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
        else:
            result = evaluate(sam_dir, scenes)
            report = {"mask_iou": result.mask_iou, "scenes": result.scenes, "prompts": result.prompts}
        print(json.dumps(report), flush=True)
        return
    if any(args.run_dir.glob("checkpoint*")) and not args.resume:  # checkpoint.tmp / .old: a killed save
        raise InvalidInputError(f"{args.run_dir} already holds a run: pass --resume to continue it")
    trainer = SamTrainer(args.run_dir, config,
                         eval_scenes=split_scenes(config.data_seed, config.eval_split, config.eval_count))
    trainer.resume()
    trainer.train(max_steps=args.max_steps, max_seconds=args.max_seconds,
                  on_log=lambda row: print(json.dumps(row), flush=True))


if __name__ == "__main__":
    main()
