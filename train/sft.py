"""Supervised fine-tuning (SFT) of a reasoner on answer texts: the warm start of the demo model.

A plain loop in the nanoGPT manner: a config dataclass, explicit tensors, explicit steps.

- Data: a `SampleSource` maps a stream index to a sample (image, query, targets, trace); the
  synthetic generator is deterministic per index, so the stream position is just a number (the
  samples seen) and a resumed run sees exactly the samples it would have seen, also when it is
  resumed with another batch size (a GPU takes larger batches; the schedule counts steps).
- Loss: next-token cross-entropy on the answer tokens only (the prompt and the image are context);
  optionally plus `naming_weight` times a naming loss: a linear head names every object of the
  scene from the merged image tokens pooled over its pixels (`object_pooling`), so the vision tower
  is taught what things are, not only through the few label tokens of the answer.
- Optimiser: AdamW, linear warm-up, then cosine decay to `min_lr_ratio * lr`.
- Checkpoints: `out_dir/checkpoint/` holds `reasoner/` (a complete Hugging Face folder that
  `TorchReasoner.from_dir` loads), the optimiser state, the RNG state and the trainer state, so
  `resume()` continues exactly (with the naming head, when there is one); `out_dir/log.csv` logs
  loss, learning rate, throughput and evaluations (a resumed run first drops the rows logged after
  its checkpoint's step).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from star_edge.answer import AnswerObject, ParseError, parse
from star_edge.errors import InvalidInputError
from star_edge.reasoner.prompts import build_messages
from star_edge.reasoner.torch_backend import TorchReasoner, quiet_transformers
from star_edge.train import checkpoint_swap, csv_log
from star_edge.train.answer_text import format_answer
from star_edge.train.object_pooling import coverage_weights
from star_edge.train.rewards import box_iou

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
#: Parameter names of the vision tower and its patch mergers in both Qwen-VL families.
VISION_PREFIX = "model.visual."
ANSWER_PREFIX = "<|im_start|>assistant\n"
ANSWER_END = "<|im_end|>"
#: The columns of `log.csv`: training rows fill step to elapsed_s (and naming_loss, with the naming
#: loss), evaluation rows step, samples, box_iou, acc50 and parsed.
LOG_FIELDS = ["step", "samples", "lr", "loss", "samples_per_s", "elapsed_s", "box_iou", "acc50", "parsed",
              "naming_loss"]
NAMING_HEAD_FILE = "naming_head.pt"


class GroundingSample(Protocol):
    """What SFT needs of a training sample (the synthetic generator's samples qualify)."""

    image: np.ndarray  # (H, W, 3) uint8
    query: str
    boxes: np.ndarray  # (n, 4) original pixels
    points: np.ndarray  # (n, 2) original pixels
    labels: Sequence[str]
    trace: str


class SceneObjects(Protocol):
    """What the naming loss needs besides: every object of the scene and its visible mask."""

    objects: Sequence  # each with a `noun`
    instance_masks: np.ndarray  # (m, H, W) bool, one per object


SampleSource = Callable[[int], GroundingSample]


@dataclass
class SFTConfig:
    """Every knob of an SFT run (defaults: the measured recipe of DESIGN section 12)."""

    batch_size: int = 32
    """Samples per optimiser step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    warmup_steps: int = 200
    """Linear warm-up from 0 to `lr`."""
    total_steps: int = 10_000
    """Length of the cosine schedule (a run may stop earlier with `max_steps`)."""
    min_lr_ratio: float = 0.05
    """The cosine decays to `min_lr_ratio * lr`."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    log_every: int = 20
    """Steps between CSV log rows."""
    checkpoint_every: int = 500
    """Steps between checkpoints (one is always written at the end)."""
    eval_every: int = 1000
    """Steps between greedy evaluations (0 disables)."""
    eval_count: int = 64
    """Held-out samples per evaluation."""
    seed: int = 0
    """Seeds dropout and the initial RNG state (the data stream is indexed, not random)."""
    num_workers: int = 0
    """DataLoader worker processes building samples (0: in the main process)."""
    with_labels: bool = True
    """False trains without the "label" field (the label-prediction ablation)."""
    amp_dtype: str | None = None
    """"bfloat16" for mixed precision on CUDA; None keeps float32."""
    vision_lr_scale: float = 1.0
    """The vision tower's (and its mergers') learning rate, as a fraction of `lr`."""
    vision_weight_decay: float = 0.0
    """AdamW weight decay of the vision tower."""
    naming_weight: float = 0.0
    """Weight of the naming loss (module docstring); 0 turns it off. Samples then also need
    `SceneObjects`' fields (the synthetic generator's samples have them)."""
    naming_classes: tuple[str, ...] = ()
    """The nouns the naming head tells apart (needed when `naming_weight` > 0)."""

    def __post_init__(self) -> None:
        counts = {"batch_size": 1, "total_steps": 1, "log_every": 1, "checkpoint_every": 1, "warmup_steps": 0,
                  "eval_every": 0, "eval_count": 0, "num_workers": 0}
        low = [f"{name} {getattr(self, name)} (at least {least})" for name, least in counts.items()
               if getattr(self, name) < least]
        if low or not self.lr > 0:
            raise InvalidInputError(f"SFT settings out of range: {', '.join(low) or f'lr {self.lr} (must be > 0)'}")
        if self.amp_dtype not in (None, "bfloat16"):
            raise InvalidInputError(f"amp_dtype must be None or 'bfloat16', got {self.amp_dtype!r} (float16 would "
                                    "need a gradient scaler, which this loop does not have)")


@dataclass
class TrainerState:
    """What a checkpoint needs besides weights and optimiser: where the run is."""

    step: int = 0
    samples_seen: int = 0
    elapsed_s: float = 0.0

    @classmethod
    def read(cls, path: str | Path) -> TrainerState:
        """The state recorded in a checkpoint's trainer_state.json."""
        return cls(**json.loads(Path(path).read_text())["state"])


def answer_for(sample: GroundingSample, reasoner: TorchReasoner, with_labels: bool = True) -> str:
    """The training answer text of `sample` in the reasoner's coordinate frame."""
    height, width = sample.image.shape[:2]
    return format_answer(sample.boxes, sample.points, list(sample.labels), (width, height),
                         reasoner.frame, reasoner.input_size, sample.trace, with_labels)


class SFTBatcher:
    """Turns samples into padded training tensors with labels on the answer tokens only."""

    def __init__(self, reasoner: TorchReasoner, with_labels: bool = True,
                 naming_classes: Sequence[str] = ()) -> None:
        self.processor = reasoner.processor
        self.reasoner_frame = reasoner.frame
        self.input_size = reasoner.input_size
        self.template = reasoner.prompt_template
        self.reasoner = reasoner
        self.with_labels = with_labels
        self.naming_classes = {noun: index for index, noun in enumerate(naming_classes)}
        self.merge = reasoner.model.config.vision_config.spatial_merge_size
        tokenizer = self.processor.tokenizer
        self.answer_prefix_ids = tokenizer(ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
        self.pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")

    def encode(self, sample: GroundingSample) -> dict[str, torch.Tensor]:
        """One sample: input_ids (L,), labels (L,), pixel_values (P, D), image_grid_thw (1, 3); with
        naming classes also naming_weights (m, T) float32, the coverage of the image's T merged
        tokens by each of its m objects, and naming_labels (m,) int64, their nouns' classes."""
        messages = build_messages(sample.query, frame=self.reasoner_frame, template=self.template)
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        text = prompt + answer_for(sample, self.reasoner, self.with_labels) + ANSWER_END
        image = Image.fromarray(sample.image).convert("RGB").resize(self.input_size, Image.Resampling.BICUBIC)
        batch = self.processor(text=[text], images=[image], return_tensors="pt")
        input_ids = batch["input_ids"][0]
        start = _answer_start(input_ids.tolist(), self.answer_prefix_ids)
        labels = input_ids.clone()
        labels[:start] = IGNORE_INDEX
        encoded = {"input_ids": input_ids, "labels": labels, "pixel_values": batch["pixel_values"],
                   "image_grid_thw": batch["image_grid_thw"]}
        if "mm_token_type_ids" in batch:
            encoded["mm_token_type_ids"] = batch["mm_token_type_ids"][0]
        if self.naming_classes:
            encoded.update(self._naming(sample, batch["image_grid_thw"][0]))
        return encoded

    def _naming(self, sample: SceneObjects, grid_thw: torch.Tensor) -> dict[str, torch.Tensor]:
        _, rows, cols = (int(v) for v in grid_thw)
        unknown = sorted({obj.noun for obj in sample.objects} - set(self.naming_classes))
        if unknown:
            raise ValueError(f"nouns {unknown} are not among the naming classes")
        weights = coverage_weights(sample.instance_masks, (rows // self.merge, cols // self.merge))
        return {"naming_weights": torch.from_numpy(weights),
                "naming_labels": torch.tensor([self.naming_classes[obj.noun] for obj in sample.objects])}

    def collate(self, encoded: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Right-pad a list of `encode` outputs into one batch."""
        length = max(len(e["input_ids"]) for e in encoded)
        rows = len(encoded)
        input_ids = torch.full((rows, length), self.pad_id, dtype=torch.long)
        labels = torch.full((rows, length), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((rows, length), dtype=torch.long)
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
        token_types = None
        if "mm_token_type_ids" in encoded[0]:
            token_types = torch.zeros((rows, length), dtype=torch.long)
            batch["mm_token_type_ids"] = token_types
        for row, item in enumerate(encoded):
            size = len(item["input_ids"])
            input_ids[row, :size] = item["input_ids"]
            labels[row, :size] = item["labels"]
            attention[row, :size] = 1
            if token_types is not None:
                token_types[row, :size] = item["mm_token_type_ids"]
        batch["pixel_values"] = torch.cat([e["pixel_values"] for e in encoded])
        batch["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in encoded])
        if "naming_weights" in encoded[0]:  # block-diagonal: each image's objects pool its own tokens
            batch["naming_weights"] = torch.block_diag(*[e["naming_weights"] for e in encoded])
            batch["naming_labels"] = torch.cat([e["naming_labels"] for e in encoded])
        return batch


def _answer_start(ids: list[int], prefix: list[int]) -> int:
    """Index of the first answer token: just after the last occurrence of `prefix` in `ids`."""
    for start in range(len(ids) - len(prefix), -1, -1):
        if ids[start:start + len(prefix)] == prefix:
            return start + len(prefix)
    raise ValueError("the assistant prefix was not found in the encoded sample")


class _IndexedSamples(torch.utils.data.Dataset):
    """Stream positions [first, first + count) of a SampleSource, encoded for training."""

    def __init__(self, source: SampleSource, batcher: SFTBatcher, first: int, count: int) -> None:
        self.source, self.batcher, self.first, self.count = source, batcher, first, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, offset: int) -> dict[str, torch.Tensor]:
        return self.batcher.encode(self.source(self.first + offset))


def _parameter_groups(model: torch.nn.Module, config: SFTConfig) -> list[dict]:
    """AdamW groups: the language model and head, then the vision tower (its own lr scale and decay)."""
    vision, rest = [], []
    for name, parameter in model.named_parameters():
        (vision if name.startswith(VISION_PREFIX) else rest).append(parameter)
    return [{"params": rest, "lr_scale": 1.0, "weight_decay": config.weight_decay},
            {"params": vision, "lr_scale": config.vision_lr_scale, "weight_decay": config.vision_weight_decay}]


def learning_rate(step: int, config: SFTConfig) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr_ratio * lr` at `total_steps`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.total_steps - config.warmup_steps))
    floor = config.min_lr_ratio * config.lr
    return floor + 0.5 * (config.lr - floor) * (1.0 + math.cos(math.pi * progress))


def greedy_objects(reasoner: TorchReasoner, sample: GroundingSample) -> list[AnswerObject] | None:
    """The objects of the reasoner's greedy answer to a sample, in its original pixels; None when
    the answer cannot be read."""
    height, width = sample.image.shape[:2]
    text = reasoner.generate(Image.fromarray(sample.image), sample.query, n=1).texts[0]
    try:
        return parse(text, image_size=(width, height), input_size=reasoner.input_size, frame=reasoner.frame).objects
    except ParseError:
        return None


def greedy_box_iou(reasoner: TorchReasoner, samples: Sequence[GroundingSample]) -> dict[str, float]:
    """Greedy answers on held-out samples: mean best-match box IoU of the first target (boxes
    pixel-inclusive, as the rewards count them), the share with IoU >= 0.5, and the share of answers
    that parse."""
    ious, parsed = [], 0
    for sample in samples:
        objects = greedy_objects(reasoner, sample)
        if objects is None:  # a failed parse scores 0, like a failed sample
            ious.append(0.0)
            continue
        parsed += 1
        if len(sample.boxes) == 0:
            ious.append(1.0 if not objects else 0.0)
            continue
        answered = np.array([o.box for o in objects], dtype=np.float64).reshape(-1, 4)
        ious.append(float(box_iou(answered, sample.boxes[:1]).max(initial=0.0)))
    values = np.asarray(ious)
    return {"box_iou": float(values.mean()), "acc50": float((values >= 0.5).mean()),
            "parsed": parsed / max(1, len(samples))}


def naming_cross_entropy(head: torch.nn.Module, vision_output: Any, weights: torch.Tensor,
                         labels: torch.Tensor) -> torch.Tensor:
    """The naming loss: cross-entropy of `head` on the objects' pooled merged image tokens.

    vision_output: the vision tower's output for a batch's images; its `pooler_output` holds the
    merged tokens (one tensor per image, or all in one), T in all. weights (m, T) float32: each
    object's coverage of those tokens (`SFTBatcher.collate`); labels (m,) int64: their classes.
    """
    merged = vision_output.pooler_output
    tokens = torch.cat(list(merged)) if isinstance(merged, (tuple, list)) else merged
    return torch.nn.functional.cross_entropy(head(weights @ tokens.float()), labels)


class SFTTrainer:
    """Trains `reasoner.model` (loaded from `reasoner_dir`) in place; checkpoints into `out_dir`."""

    def __init__(self, reasoner: TorchReasoner, reasoner_dir: str | Path, source: SampleSource,
                 eval_samples: Sequence[GroundingSample], config: SFTConfig, out_dir: str | Path) -> None:
        self.reasoner = reasoner
        self.reasoner_dir = Path(reasoner_dir)
        self.model = reasoner.model
        self.source = source
        self.eval_samples = list(eval_samples)
        self.config = config
        self.out_dir = Path(out_dir)
        if config.naming_weight < 0 or (config.naming_weight > 0 and not config.naming_classes):
            raise InvalidInputError("naming_weight must be >= 0, and naming_classes given when it is > 0")
        self.batcher = SFTBatcher(reasoner, config.with_labels, config.naming_classes if config.naming_weight else ())
        self.device = self.model.device
        groups = _parameter_groups(self.model, config)
        self.naming_head: torch.nn.Linear | None = None
        torch.manual_seed(config.seed)  # the naming head's initial weights, and dropout where a model has it
        if config.naming_weight:
            self.naming_head = torch.nn.Linear(self.model.config.text_config.hidden_size,
                                               len(config.naming_classes)).to(self.device)
            groups.append({"params": list(self.naming_head.parameters()), "lr_scale": 1.0,
                           "weight_decay": config.weight_decay})
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))
        self.state = TrainerState()

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoint"

    def resume(self) -> bool:
        """Load the checkpoint in `out_dir` if there is one (weights, naming head, optimiser, RNG,
        position); either way the log keeps only the rows up to the step the run goes on from.

        Raises InvalidInputError when the checkpoint was trained with the naming loss and this run
        is not, or the other way round."""
        checkpoint_swap.recover(self.checkpoint_dir)
        state_file = self.checkpoint_dir / checkpoint_swap.STATE_FILE
        found = state_file.is_file()
        if found:
            head_file = self.checkpoint_dir / NAMING_HEAD_FILE
            if head_file.is_file() != (self.naming_head is not None):
                trained = "with" if head_file.is_file() else "without"
                raise InvalidInputError(f"{self.checkpoint_dir} was trained {trained} the naming loss; resume it "
                                        f"{trained} it, or start from its weights (--from-weights)")
            if self.naming_head is not None:
                self.naming_head.load_state_dict(torch.load(head_file, map_location="cpu", weights_only=True))
            saved = type(self.model).from_pretrained(self.checkpoint_dir / "reasoner", dtype=torch.float32)
            self.model.load_state_dict(saved.state_dict())
            # saved on a GPU, resumed on a CPU or another GPU: load_state_dict moves the moments to the
            # parameters' device
            optimizer = torch.load(self.checkpoint_dir / "optimizer.pt", map_location="cpu", weights_only=True)
            settings = [{key: group[key] for key in ("lr_scale", "weight_decay")}
                        for group in self.optimizer.param_groups]
            self.optimizer.load_state_dict(optimizer)  # which also brings back the saved groups' settings:
            for group, setting in zip(self.optimizer.param_groups, settings):  # this run's config decides
                group.update(setting)
            torch.set_rng_state(torch.load(self.checkpoint_dir / "rng.pt", map_location="cpu", weights_only=True))
            self.state = TrainerState.read(state_file)
        self._rewind_log()
        return found

    def start_from(self, weights_file: str | Path, state: TrainerState) -> None:
        """Continue a run from its weights alone (a `model.safetensors`, float16 or float32) at its
        stream position `state`; the optimiser starts afresh (its moments are not kept between
        machines), the learning-rate schedule goes on from `state.step`."""
        weights = {name: tensor.float() for name, tensor in load_file(str(weights_file)).items()}
        self.model.load_state_dict(weights, strict=True)
        self.state = TrainerState(**asdict(state))
        self._rewind_log()

    def train(self, max_steps: int | None = None, max_seconds: float | None = None,
              on_log: Callable[[dict], None] | None = None) -> TrainerState:
        """Run until `total_steps`, `max_steps` more steps, or `max_seconds`, then checkpoint."""
        config = self.config
        if (max_steps is not None and max_steps < 0) or self.state.step > config.total_steps:
            raise InvalidInputError(f"nothing to train: the run is at step {self.state.step} of total_steps "
                                    f"{config.total_steps}, max_steps {max_steps}")
        stop_step = config.total_steps if max_steps is None else min(config.total_steps,
                                                                     self.state.step + max_steps)
        started = time.perf_counter()
        elapsed_before = self.state.elapsed_s
        self.model.train()
        window_loss, window_tokens, window_samples, window_start = 0.0, 0, 0, time.perf_counter()
        window_naming: list[float] = []
        for batch in self._batches(stop_step):
            step = self.state.step
            lr = learning_rate(step, config)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            loss, tokens, naming_loss = self._step(batch)
            self.state.step += 1
            self.state.samples_seen += config.batch_size
            self.state.elapsed_s = elapsed_before + time.perf_counter() - started
            window_loss += loss * tokens
            window_tokens += tokens
            window_samples += config.batch_size
            if naming_loss is not None:
                window_naming.append(naming_loss)
            out_of_time = max_seconds is not None and time.perf_counter() - started >= max_seconds
            if self.state.step % config.log_every == 0 or self.state.step == stop_step or out_of_time:
                seconds = time.perf_counter() - window_start
                row = {"step": self.state.step, "samples": self.state.samples_seen, "lr": lr,
                       "loss": window_loss / max(1, window_tokens),
                       "samples_per_s": window_samples / max(seconds, 1e-9),
                       "elapsed_s": round(self.state.elapsed_s, 1)}
                if window_naming:
                    row["naming_loss"] = sum(window_naming) / len(window_naming)
                self._log(row, on_log)
                window_loss, window_tokens, window_samples, window_start = 0.0, 0, 0, time.perf_counter()
                window_naming = []
            if config.eval_every and self.state.step % config.eval_every == 0 and self.eval_samples:
                evaluated = time.perf_counter()
                self._log({"step": self.state.step, "samples": self.state.samples_seen,
                           **self.evaluate()}, on_log)
                window_start += time.perf_counter() - evaluated  # samples_per_s counts training only
            if self.state.step % config.checkpoint_every == 0:
                self.save()
            if out_of_time:
                break
        self.save()
        return self.state

    def evaluate(self) -> dict[str, float]:
        """Greedy box IoU on the held-out samples (the model is put back in training mode)."""
        self.model.eval()
        try:
            with torch.inference_mode():
                return greedy_box_iou(self.reasoner, self.eval_samples[: self.config.eval_count])
        finally:
            self.model.train()

    def save(self) -> Path:
        """Write the checkpoint into `out_dir/checkpoint`, replacing the previous one only once the
        new one is complete (`checkpoint_swap`)."""
        staging = checkpoint_swap.staging_folder(self.checkpoint_dir)
        reasoner_dir = staging / "reasoner"
        for file in self.reasoner_dir.iterdir():
            if file.is_file() and not file.name.startswith("model"):
                reasoner_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, reasoner_dir / file.name)
        with quiet_transformers():
            self.model.save_pretrained(reasoner_dir)
        torch.save(self.optimizer.state_dict(), staging / "optimizer.pt")
        if self.naming_head is not None:
            torch.save(self.naming_head.state_dict(), staging / NAMING_HEAD_FILE)
        torch.save(torch.get_rng_state(), staging / "rng.pt")
        (staging / checkpoint_swap.STATE_FILE).write_text(json.dumps(
            {"state": asdict(self.state), "config": asdict(self.config)}, indent=2))
        return checkpoint_swap.swap_in(staging, self.checkpoint_dir)

    def _batches(self, stop_step: int) -> Iterator[dict[str, torch.Tensor]]:
        # The stream goes on where the samples seen end, so a run resumed with another batch size
        # neither repeats nor skips samples (with one batch size this is step * batch_size).
        first = self.state.samples_seen
        count = (stop_step - self.state.step) * self.config.batch_size
        dataset = _IndexedSamples(self.source, self.batcher, first, count)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=self.config.batch_size, shuffle=False, drop_last=True,
            num_workers=self.config.num_workers, collate_fn=self.batcher.collate,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if self.config.num_workers else None)
        yield from loader

    def _step(self, batch: dict[str, torch.Tensor]) -> tuple[float, int, float | None]:
        """One optimiser step: (answer loss, answer tokens, naming loss or None)."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        labels = batch.pop("labels")
        naming_weights, naming_labels = batch.pop("naming_weights", None), batch.pop("naming_labels", None)
        autocast = (torch.autocast(self.device.type, dtype=getattr(torch, self.config.amp_dtype))
                    if self.config.amp_dtype else nullcontext())
        vision_outputs: list = []
        hook = (self.model.model.visual.register_forward_hook(lambda module, args, output: vision_outputs.append(output))
                if self.naming_head is not None else None)
        try:
            with autocast:
                logits = self.model(**batch).logits
        finally:
            if hook is not None:
                hook.remove()
        shift_logits = logits[:, :-1].float()
        shift_labels = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                                                 shift_labels.reshape(-1), ignore_index=IGNORE_INDEX)
        total, naming_loss = loss, None
        if self.naming_head is not None:
            naming_loss = naming_cross_entropy(self.naming_head, vision_outputs[0], naming_weights, naming_labels)
            total = loss + self.config.naming_weight * naming_loss
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.config.grad_clip:
            head = [] if self.naming_head is None else list(self.naming_head.parameters())
            torch.nn.utils.clip_grad_norm_(list(self.model.parameters()) + head, self.config.grad_clip)
        self.optimizer.step()
        return (float(loss.detach()), int((shift_labels != IGNORE_INDEX).sum()),
                None if naming_loss is None else float(naming_loss.detach()))

    def _rewind_log(self) -> None:
        """Drop the log rows after `state.step` (`csv_log.rewind`)."""
        csv_log.rewind(self.out_dir / "log.csv", LOG_FIELDS, self.state.step)

    def _log(self, row: dict, on_log: Callable[[dict], None] | None) -> None:
        csv_log.append_row(self.out_dir / "log.csv", LOG_FIELDS, row)
        if on_log is not None:
            on_log(row)
