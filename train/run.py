"""One training stage end to end: what `star-edge train` runs.

`train(config, out)` trains the stage `config.stage` in `out/<stage folder>/` ("sft", "stage1",
"stage2"):

    config.yaml      the resolved configuration
    metrics.jsonl    one JSON object per logged step (GRPO: reward per term, reward/group_std, KL when
                     beta > 0, completion lengths, learning rate, ...; SFT: loss, lr, throughput);
                     a resumed run first drops the rows logged after its checkpoint's step
    checkpoints/     GRPO: TRL checkpoints (LoRA adapter, or the whole model under full fine-tuning;
                     optimiser, scheduler, RNG, trainer state)
    checkpoint/      SFT: the SFT loop's checkpoint (full weights, optimiser, RNG, stream position)
    adapter/         GRPO with LoRA: the final adapter (peft format)
    bundle/          the trained model as a bundle (`Segmenter.from_pretrained(out/<stage>/bundle)`):
                     GRPO merges the adapter into the base (`star_edge.export.merge.merge_lora`, which
                     checks the merged model computes what the unmerged one did), or under full
                     fine-tuning (`lora_rank: 0`) takes the last checkpoint's weights with the base's
                     tokenizer and processor files; SAM is copied.

A stage whose folder holds a checkpoint continues only with `resume=True` (a checkpoint is always
written at the last step, so a stopped run resumes exactly where it stopped); `max_steps` is the
stage's total step count, not a number of further steps.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from star_edge.bundle import MANIFEST_NAME, Bundle, load_bundle
from star_edge.errors import InvalidInputError
from star_edge.train.config import STAGE_PREFIX, TrainConfig

logger = logging.getLogger(__name__)

STAGE_DIRS = {"sft": "sft", "1": "stage1", "2": "stage2"}
"""Stage name -> its folder inside the run's --out."""
DEFAULT_TEMPLATE = "star_v1"
DEFAULT_MAX_NEW_TOKENS = 1024

LogFn = Callable[[dict[str, Any]], None]
ProgressFn = Callable[[int, int], None]


class MetricsLog:
    """`metrics.jsonl`: one JSON object per logged row, each with its "step", also passed to on_log."""

    def __init__(self, path: Path, on_log: LogFn | None = None) -> None:
        self.path, self.on_log = path, on_log

    def __call__(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.on_log is not None:
            self.on_log(row)

    def rewind(self, step: int) -> None:
        """Drop the rows after `step`, the step a run resumes at: a run stopped between checkpoints
        logged steps that the resumed run trains again."""
        if not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


@dataclass(frozen=True)
class RunResult:
    """What a finished stage left: its folder, the bundle written, the step reached, the metrics file."""

    stage_dir: Path
    bundle: Bundle
    step: int
    metrics: Path


@dataclass(frozen=True)
class ModelSource:
    """A resolved reasoner: its checkpoint folder, its manifest reasoner section (without "path"),
    and the SAM of the bundle it came from (None for a plain checkpoint)."""

    reasoner_dir: Path
    section: dict[str, Any]
    sam_dir: Path | None = None
    sam_section: dict[str, Any] | None = None


def train(
    config: TrainConfig,
    out: str | Path,
    max_steps: int | None = None,
    resume: bool = False,
    on_log: LogFn | None = None,
    on_progress: ProgressFn | None = None,
) -> RunResult:
    """Train `config.stage` into `out` (module docstring) and write its bundle.

    on_log receives every metrics row (also written to metrics.jsonl); on_progress(step, total).

    Raises:
        InvalidInputError: an unusable configuration, or a stage folder holding a run without
            `resume`.
        BundleError: unreadable base, adapter or SAM files.
    """
    out = Path(out)
    stage_dir = out / STAGE_DIRS[config.stage]
    existing = [stage_dir / name for name in ("checkpoint", "checkpoints", "bundle")]
    if not resume and any(path.exists() for path in existing):
        raise InvalidInputError(f"{stage_dir} already holds a run: pass --resume to continue it, or another --out")
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
    metrics = MetricsLog(stage_dir / "metrics.jsonl", on_log)
    progress = on_progress or (lambda step, total: None)
    if config.stage == "sft":
        step, bundle = _train_sft(config, out, stage_dir, max_steps, metrics, progress)
    else:
        step, bundle = _train_grpo(config, out, stage_dir, max_steps, resume, metrics, progress)
    return RunResult(stage_dir=stage_dir, bundle=bundle, step=step, metrics=metrics.path)


# --- sources ----------------------------------------------------------------------------------------

def _stage_output(value: str, out: Path, what: str) -> Path:
    """The folder named by "stage:<name>/<part>" inside the run, checked to exist."""
    name = value[len(STAGE_PREFIX):]
    if name not in STAGE_DIRS:
        raise InvalidInputError(f"{value!r}: unknown stage {name!r} (expected one of {', '.join(STAGE_DIRS)})")
    path = out / STAGE_DIRS[name] / what
    if not path.exists():
        raise InvalidInputError(f"{value!r} needs {path}: train stage {name} into the same --out first")
    return path


def resolve_base(config: TrainConfig, out: Path, stage_dir: Path) -> ModelSource:
    """The reasoner `config.base` names (TrainConfig.base), initialising "tiny" in stage_dir/init."""
    base = config.base
    if base == "tiny":
        return _tiny_base(stage_dir, config)
    path = _stage_output(base, out, "bundle") if base.startswith(STAGE_PREFIX) else Path(base)
    if (path / MANIFEST_NAME).is_file():
        bundle = load_bundle(path)
        section = {key: value for key, value in bundle.manifest["reasoner"].items() if key != "path"}
        sam = {key: value for key, value in bundle.manifest["sam"].items() if key != "path"}
        return ModelSource(bundle.reasoner_dir, section, bundle.sam_dir, sam)
    if (path / "config.json").is_file():
        return ModelSource(path, _checkpoint_section(path, config))
    raise InvalidInputError(f"base {base!r} is neither a bundle (star_edge.json) nor a checkpoint (config.json)")


def _tiny_base(stage_dir: Path, config: TrainConfig) -> ModelSource:
    """The demo reasoner built from config (DESIGN section 12), written once into stage_dir/init
    (its manifest section beside it, in reasoner_manifest.json, as `demo.run_sft` keeps it)."""
    from star_edge.train.demo import init_reasoner

    directory, manifest = stage_dir / "init", stage_dir / "reasoner_manifest.json"
    if not manifest.is_file():
        section = init_reasoner(directory, seed=config.sft_config().seed)
        manifest.write_text(json.dumps(section, indent=2), encoding="utf-8")
    return ModelSource(directory, json.loads(manifest.read_text(encoding="utf-8")))


def _checkpoint_section(path: Path, config: TrainConfig) -> dict[str, Any]:
    """The manifest's reasoner section for a plain Hugging Face checkpoint (family defaults)."""
    from star_edge.export.merge import DEFAULT_INPUT_SIZE, FAMILY_FRAMES, checkpoint_family

    family = checkpoint_family(path)
    side = config.input_size or DEFAULT_INPUT_SIZE[family]
    return {"family": family, "input_size": [side, side], "frame": FAMILY_FRAMES[family],
            "prompt_template": config.prompt_template or DEFAULT_TEMPLATE,
            "max_new_tokens": config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS}


def resolve_sam(config: TrainConfig, base: ModelSource, stage_dir: Path) -> tuple[Path, dict[str, Any]]:
    """(sam/ folder, manifest SAM section without "path") for `config.sam` (TrainConfig.sam)."""
    from star_edge.sam.checkpoints import read_sam_config

    if config.sam is None:
        if base.sam_dir is None:
            raise InvalidInputError("the base is not a bundle: set `sam` (a bundle, a sam/ folder or \"tiny\")")
        return base.sam_dir, base.sam_section
    if config.sam == "tiny":
        from star_edge.export.tiny_sam import make_tiny_sam, write_sam_dir

        folder = stage_dir / "tiny_sam"
        if not (folder / "model.safetensors").is_file():
            write_sam_dir(*make_tiny_sam(seed=0), folder)
        path = folder
    else:
        path = Path(config.sam)
        if (path / MANIFEST_NAME).is_file():
            bundle = load_bundle(path)
            return bundle.sam_dir, {key: value for key, value in bundle.manifest["sam"].items() if key != "path"}
    sam_config = read_sam_config(path)
    return path, {key: sam_config[key] for key in ("kind", "variant", "image_size")}


def resolve_adapter(config: TrainConfig, out: Path) -> Path | None:
    """The LoRA adapter folder to continue (TrainConfig.adapter), or None."""
    if config.adapter is None:
        return None
    if config.adapter.startswith(STAGE_PREFIX):
        return _stage_output(config.adapter, out, "adapter")
    path = Path(config.adapter)
    if not (path / "adapter_config.json").is_file():
        raise InvalidInputError(f"adapter {path} lacks adapter_config.json (a peft LoRA folder)")
    return path


_ADAPTER_KEYS = {"lora_rank": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout"}
"""grpo settings of a fresh LoRA -> the adapter_config.json key a continued adapter keeps instead."""


def check_adapter_settings(grpo: dict[str, Any], adapter: Path) -> None:
    """A continued adapter keeps its own rank, alpha and dropout: refuse a `grpo` section that sets
    one of them to something else (it would be silently ignored)."""
    saved = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    for setting, key in _ADAPTER_KEYS.items():
        if setting in grpo and key in saved and grpo[setting] != saved[key]:
            raise InvalidInputError(f"grpo {setting} is {grpo[setting]}, but the adapter continued ({adapter}) "
                                    f"has {key} {saved[key]}: it keeps its own; drop {setting} or match it")


def _device(config: TrainConfig) -> str:
    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return config.device


def _reasoner_section(base: ModelSource, config: TrainConfig, template: str) -> dict[str, Any]:
    section = dict(base.section)
    section["prompt_template"] = template
    if config.max_new_tokens:
        section["max_new_tokens"] = config.max_new_tokens
    return section


# --- SFT --------------------------------------------------------------------------------------------

def _train_sft(config: TrainConfig, out: Path, stage_dir: Path, max_steps: int | None, log: MetricsLog,
               progress: ProgressFn) -> tuple[int, Bundle]:
    from star_edge.reasoner.torch_backend import TorchReasoner
    from star_edge.train.demo import CurriculumSource
    from star_edge.train.grpo_data import open_items, prompt_template_for
    from star_edge.train.sft import SFTTrainer

    sft_config = config.sft_config()
    base = resolve_base(config, out, stage_dir)
    sam_dir, sam_section = resolve_sam(config, base, stage_dir)
    template = prompt_template_for(config.prompt_template or base.section["prompt_template"], config.with_labels)
    section = _reasoner_section(base, config, template)
    reasoner = TorchReasoner.from_dir(base.reasoner_dir, section, device=_device(config), dtype=torch.float32)
    if config.data.source == "synthetic":
        source = CurriculumSource(seed=config.data.seed)
    else:
        items, count = open_items(config.data)

        def source(index: int) -> Any:
            return items(index % count)  # the folder, cycled
    trainer = SFTTrainer(reasoner, base.reasoner_dir, source, [], sft_config, stage_dir)
    trainer.resume()
    log.rewind(trainer.state.step)
    target = sft_config.total_steps if max_steps is None else min(max_steps, sft_config.total_steps)

    def on_row(row: dict[str, Any]) -> None:
        log(row)
        progress(int(row["step"]), target)

    if target > trainer.state.step:
        trainer.train(max_steps=target - trainer.state.step, on_log=on_row)
    bundle = _write_bundle(stage_dir / "bundle", section, sam_dir, sam_section,
                           lambda folder: shutil.copytree(trainer.checkpoint_dir / "reasoner", folder),
                           name=f"{stage_dir.parent.name}-sft")
    return trainer.state.step, bundle


# --- GRPO -------------------------------------------------------------------------------------------

def _train_grpo(config: TrainConfig, out: Path, stage_dir: Path, max_steps: int | None, resume: bool,
                log: MetricsLog, progress: ProgressFn) -> tuple[int, Bundle]:
    from peft import PeftModel
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.trainer_utils import get_last_checkpoint
    from trl.import_utils import is_vllm_available

    from star_edge.reasoner.torch_backend import TorchReasoner
    from star_edge.sam import MaskDecoder
    from star_edge.train.grpo import StarGRPOConfig, StarGRPOTrainer, freeze_vision_tower, lora_config
    from star_edge.train.grpo_data import grpo_dataset, open_items, prompt_template_for
    from star_edge.train.rewards import RewardConfig
    from star_edge.train.rollout_reward import StarReward

    checkpoints = stage_dir / "checkpoints"
    settings = dict(config.grpo)
    if max_steps is not None:
        settings["max_steps"] = max_steps
    settings.setdefault("use_vllm", is_vllm_available() and torch.cuda.is_available())
    args = StarGRPOConfig(output_dir=str(checkpoints), **settings)
    peft_config = lora_config(args)
    full = peft_config is None
    if full and config.adapter is not None:
        raise InvalidInputError(f"full fine-tuning (lora_rank 0) trains the base's own weights, not the adapter "
                                f"{config.adapter}: continue another stage with base: stage:<name> and no adapter")
    base = resolve_base(config, out, stage_dir)
    adapter = resolve_adapter(config, out)
    if adapter is not None:
        check_adapter_settings(config.grpo, adapter)
    sam_dir, sam_section = resolve_sam(config, base, stage_dir)
    template = prompt_template_for(config.prompt_template or base.section["prompt_template"], config.with_labels)
    section = _reasoner_section(base, config, template)
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    reasoner = TorchReasoner.from_dir(base.reasoner_dir, section, device="cpu", dtype=dtype)
    model = reasoner.model.train()
    if full:
        freeze_vision_tower(model)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
        peft_config = None
    items, count = open_items(config.data)
    dataset = grpo_dataset(items, count, reasoner.frame, reasoner.input_size, template)
    reward_config = RewardConfig(frame=reasoner.frame, input_size=tuple(reasoner.input_size),
                                 with_labels=config.with_labels, empty_answer_format=config.empty_answer_format,
                                 lenient_answers=config.lenient_answers)
    device = str(args.device) if _device(config) == "cuda" else "cpu"
    reward = StarReward(MaskDecoder.from_dir(sam_dir, device=device), reward_config, stage=int(config.stage))

    class Reporter(TrainerCallback):
        """Metrics rows to `log`, progress to `progress`, and a checkpoint at the last step."""

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001 - TrainerCallback API
            if state.is_world_process_zero and logs:
                log({"step": state.global_step, **logs})

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 - TrainerCallback API
            if state.global_step >= state.max_steps:
                control.should_save = True
            if state.is_world_process_zero:
                progress(state.global_step, state.max_steps)

    # TRL pads the prompts it generates from on the left and, for the policy's forward pass, encodes
    # them again with this processor: its padding must be on the left too, or the image-token types
    # (mm_token_type_ids) of prompts shorter than the batch's longest land beside their tokens.
    reasoner.processor.tokenizer.padding_side = "left"
    trainer = StarGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                              processing_class=reasoner.processor, peft_config=peft_config, callbacks=[Reporter()])
    for printing in (PrinterCallback, ProgressCallback):  # the caller shows progress (the CLI: rich)
        trainer.remove_callback(printing)
    last = get_last_checkpoint(str(checkpoints)) if resume and checkpoints.is_dir() else None
    trained, planned = _checkpoint_steps(Path(last)) if last is not None else (0, 0)
    if args.max_steps > 0:  # else the run is planned in epochs, and its checkpoint knows their steps
        planned = args.max_steps
    done = last is not None and trained >= planned
    if not done:  # Trainer resumed at max_steps would still train one step more
        log.rewind(trained)
        trainer.train(resume_from_checkpoint=last)
    adapter_dir, bundle_dir = stage_dir / "adapter", stage_dir / "bundle"
    accelerator = trainer.accelerator
    if accelerator.is_main_process and full:  # the step's checkpoint holds the weights (saved at the last step)
        final = Path(get_last_checkpoint(str(checkpoints)))
        _write_bundle(bundle_dir, section, sam_dir, sam_section,
                      lambda folder: _copy_full_weights(base.reasoner_dir, final, folder),
                      name=f"{stage_dir.parent.name}-{stage_dir.name}")
    elif accelerator.is_main_process:
        if done:
            adapter_dir.mkdir(exist_ok=True)
            for file in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copyfile(Path(last) / file, adapter_dir / file)
        else:
            accelerator.unwrap_model(trainer.model).save_pretrained(str(adapter_dir))
        _write_bundle(bundle_dir, section, sam_dir, sam_section,
                      lambda folder: _merge(base.reasoner_dir, adapter_dir, folder),
                      name=f"{stage_dir.parent.name}-{stage_dir.name}")
    accelerator.wait_for_everyone()
    return (trained if done else trainer.state.global_step), load_bundle(bundle_dir)


def _checkpoint_steps(checkpoint: Path) -> tuple[int, int]:
    """(optimiser steps taken, steps planned for the run) of a Trainer checkpoint folder, from its
    trainer_state.json."""
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    return int(state["global_step"]), int(state["max_steps"])


def _copy_full_weights(base_dir: Path, checkpoint: Path, folder: Path) -> None:
    """A reasoner folder from a fully fine-tuned Trainer checkpoint: the weights and the files saved
    with them (config, generation config, shard index), then the base's tokenizer, chat template and
    processor files, as `merge_lora` writes a merged model."""
    from star_edge.bundle import checkpoint_weight_files
    from star_edge.export.merge import WRITTEN_FILES, copy_processor_files

    folder.mkdir(parents=True)
    optional = [checkpoint / name for name in WRITTEN_FILES if name != "config.json"]
    saved = [checkpoint / "config.json", *(path for path in optional if path.is_file())]
    for source in [*checkpoint_weight_files(checkpoint), *saved]:
        shutil.copyfile(source, folder / source.name)
    copy_processor_files(base_dir, folder)


def _merge(base_dir: Path, adapter_dir: Path, folder: Path) -> None:
    from star_edge.export.merge import merge_lora

    report = merge_lora(base_dir, adapter_dir, folder)
    logger.debug("merged %d LoRA modules: max |merged - unmerged| logit %.3g of %.3g", report.lora_modules,
                 report.max_abs_diff, report.max_abs_logit)


# --- bundle -----------------------------------------------------------------------------------------

def _write_bundle(folder: Path, section: dict[str, Any], sam_dir: Path, sam_section: dict[str, Any],
                  write_reasoner: Callable[[Path], Any], name: str) -> Bundle:
    """A fresh bundle in `folder`: reasoner/ from `write_reasoner`, sam/ copied, manifest verified."""
    from star_edge.export.bundle_writer import write_manifest

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    write_reasoner(folder / "reasoner")
    (folder / "sam").mkdir()
    for file in ("config.json", "model.safetensors"):
        shutil.copyfile(sam_dir / file, folder / "sam" / file)
    return write_manifest(folder, name=name, reasoner={**section, "path": "reasoner"},
                          sam={**sam_section, "path": "sam"}, trained=True)
