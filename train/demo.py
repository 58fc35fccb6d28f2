"""The demo model's recipe (DESIGN section 12): a tiny Qwen3-VL taught the synthetic world.

- `DEMO_DIMS`: about 7 M parameters, 256 px input, 64 image tokens, 0-1000 coordinate grid, our
  tokenizer with one token per coordinate integer.
- `DEMO_CURRICULUM`: the SFT stream in phases (one named target among 1-3 plain shapes, as
  measured in DESIGN section 12; then one named target among shapes and everyday items, some
  queries without a target; then the mixed stream of single targets, dense grounding and the
  reasoning types), traces without location words; `CurriculumSource` serves it by stream
  index, so a resumed run continues with exactly the samples it would have seen.
- `init_reasoner`: the untrained model, its vision position table and coordinate-token rows
  started from smooth codes (`demo_init`).
- `DEMO_SFT`: the optimiser settings (the vision tower at a tenth of the learning rate).
- `run_sft`: initialise (or resume) a run folder and train for a time or step budget;
  `python -m star_edge.train.demo --run-dir DIR [...]` runs it from a shell (a GPU machine, say).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tokenizers import Tokenizer

from star_edge.bundle import load_bundle
from star_edge.errors import InvalidInputError
from star_edge.export.tiny_reasoner import MAX_NUMBER_TOKEN, TinyDims, write_tiny_reasoner
from star_edge.reasoner.torch_backend import TorchReasoner
from star_edge.train import checkpoint_swap
from star_edge.train.data.synthetic import SyntheticConfig, SyntheticSample, sample, split_seed
from star_edge.train.data.synthetic_catalogue import KINDS
from star_edge.train.demo_init import apply_demo_init
from star_edge.train.grpo_data import prompt_template_for
from star_edge.train.sft import SFTConfig, SFTTrainer, TrainerState

DEMO_FAMILY = "qwen3_vl"
DEMO_DIMS = TinyDims(
    hidden_size=256, num_layers=6, num_heads=4, num_kv_heads=2, intermediate_size=768,
    vision_hidden_size=128, vision_depth=4, vision_heads=4, vision_intermediate_size=512,
    image_tokens_per_side=8,
)
DEMO_MAX_NEW_TOKENS = 256
DEMO_PROMPT_TEMPLATE = "star_compact_v1"
DEMO_DATA_SEED = 0


@dataclass(frozen=True)
class Phase:
    """`samples` consecutive stream positions drawn with `config`."""

    samples: int
    config: SyntheticConfig


def demo_curriculum(trace_locations: bool = False) -> tuple[Phase, ...]:
    """The SFT phases; `trace_locations` keeps "... is at the top left." in the traces (off: the
    coordinates must come from the image, not from the trace before them)."""
    return (
        Phase(60_000, SyntheticConfig(stage="single", objects=(1, 3), item_probability=0.0,
                                      no_target_probability=0.0, trace_locations=trace_locations)),
        Phase(60_000, SyntheticConfig(stage="single", objects=(1, 3), trace_locations=trace_locations)),
        Phase(10**12, SyntheticConfig(stage="mixed", trace_locations=trace_locations)),
    )


DEMO_CURRICULUM: tuple[Phase, ...] = demo_curriculum()
#: The SFT settings of the shipped model (docs/demo-model/README.md, SFT run 3): DESIGN section 12's
#: recipe with the vision tower at a tenth of the learning rate and weight decay 0.1 there.
DEMO_SFT = SFTConfig(total_steps=20_000, vision_lr_scale=0.1, vision_weight_decay=0.1)


class CurriculumSource:
    """Stream index -> training sample: phase by phase, each sample a pure function of its index."""

    def __init__(self, phases: Sequence[Phase] = DEMO_CURRICULUM, seed: int = DEMO_DATA_SEED) -> None:
        self.phases = tuple(phases)
        self.seed = split_seed(seed, "train")

    def config_at(self, index: int) -> SyntheticConfig:
        """The generator settings of stream position `index`."""
        for phase in self.phases:
            if index < phase.samples:
                return phase.config
            index -= phase.samples
        return self.phases[-1].config

    def __call__(self, index: int) -> SyntheticSample:
        return sample(self.seed, index, self.config_at(index))


def dense_config() -> SyntheticConfig:
    """The mixed stream's dense-grounding stage on its own: "find every object" among 2-6."""
    return replace(demo_curriculum()[-1].config, stage="dense")


def bundle_reasoner(bundle_dir: str | Path) -> TorchReasoner:
    """The reasoner of a bundle in float32 on the CPU (the card's numbers are measured so)."""
    bundle = load_bundle(bundle_dir)
    return TorchReasoner.from_dir(bundle.reasoner_dir, bundle.manifest["reasoner"], dtype=torch.float32)


def held_out(count: int, config: SyntheticConfig, seed: int = DEMO_DATA_SEED) -> list[SyntheticSample]:
    """`count` validation samples (the val split's seed, disjoint from training)."""
    return [sample(split_seed(seed, "val"), index, config) for index in range(count)]


def init_reasoner(directory: str | Path, seed: int = 0, demo_init: bool = True, with_labels: bool = True) -> dict:
    """Write the untrained demo reasoner; returns the manifest's reasoner section.

    `demo_init` starts the vision position table and the coordinate tokens' rows from smooth codes
    (`demo_init.apply_demo_init`); False keeps Hugging Face's random initialisation throughout.
    `with_labels` False asks with the prompt template's no-label variant (the label-prediction
    ablation: answers carry boxes and points only).
    """
    section = write_tiny_reasoner(directory, seed=seed, family=DEMO_FAMILY, dims=DEMO_DIMS,
                                  max_new_tokens=DEMO_MAX_NEW_TOKENS)
    if demo_init:
        tokenizer = Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))
        apply_demo_init(Path(directory) / "model.safetensors",
                        [tokenizer.token_to_id(str(n)) for n in range(MAX_NUMBER_TOKEN + 1)])
    return {**section, "prompt_template": prompt_template_for(DEMO_PROMPT_TEMPLATE, with_labels)}


def run_sft(
    run_dir: str | Path,
    config: SFTConfig,
    device: str = "cpu",
    max_steps: int | None = None,
    max_seconds: float | None = None,
    source: Callable[[int], SyntheticSample] | None = None,
    eval_samples: Sequence[SyntheticSample] = (),
    on_log: Callable[[dict], None] | None = None,
    demo_init: bool = True,
    start_weights: str | Path | None = None,
    start_state: TrainerState | None = None,
    until_step: int | None = None,
) -> TrainerState:
    """Train the demo reasoner's SFT phase in `run_dir`, resuming from its checkpoint if any.

    `until_step` stops at that step whatever the run's position (a rerun after it is a no-op
    beyond rewriting the checkpoint). Without a checkpoint in `run_dir`, `start_weights` (with the
    run's `start_state`) continues a run whose weights alone were kept (`SFTTrainer.start_from`).
    `run_dir/init/` holds the initial checkpoint (`demo_init`: see `init_reasoner`) and
    `run_dir/reasoner_manifest.json` its manifest section (both written on first use),
    `run_dir/checkpoint/` the latest state, `run_dir/log.csv` the log.

    Raises:
        InvalidInputError: `config.with_labels` disagrees with the prompt template `run_dir` was
            started with (a run keeps its answer format).
    """
    run_dir = Path(run_dir)
    init_dir = run_dir / "init"
    manifest_file = run_dir / "reasoner_manifest.json"
    if not manifest_file.is_file():
        manifest_file.parent.mkdir(parents=True, exist_ok=True)
        section = init_reasoner(init_dir, seed=config.seed, demo_init=demo_init, with_labels=config.with_labels)
        manifest_file.write_text(json.dumps(section, indent=2))
    manifest = json.loads(manifest_file.read_text())
    expected = prompt_template_for(DEMO_PROMPT_TEMPLATE, config.with_labels)
    if manifest.get("prompt_template") != expected:
        raise InvalidInputError(
            f"{run_dir} was started with prompt template {manifest.get('prompt_template')!r}; training "
            f"{'with' if config.with_labels else 'without'} labels asks with {expected!r} "
            "(add or drop --no-labels, or use another run folder)")
    reasoner = TorchReasoner.from_dir(init_dir, manifest, device=device, dtype=torch.float32)
    trainer = SFTTrainer(reasoner, init_dir, source or CurriculumSource(), eval_samples, config, run_dir)
    if not trainer.resume() and start_weights is not None:
        trainer.start_from(start_weights, start_state or TrainerState())
    if until_step is not None:
        remaining = max(0, until_step - trainer.state.step)
        max_steps = remaining if max_steps is None else min(max_steps, remaining)
    return trainer.train(max_steps=max_steps, max_seconds=max_seconds, on_log=on_log)


RESUMED_SETTINGS = ("batch_size", "lr", "warmup_steps", "total_steps", "num_workers", "log_every", "checkpoint_every",
                    "amp_dtype", "vision_lr_scale", "vision_weight_decay", "naming_weight")
"""SFTConfig fields the command line sets; a resumed run keeps its checkpoint's unless given."""


def checkpoint_config(run_dir: Path) -> dict[str, Any]:
    """The SFTConfig fields `run_dir`'s checkpoint was saved with ({} without a checkpoint)."""
    checkpoint_swap.recover(run_dir / "checkpoint")
    state_file = run_dir / "checkpoint" / checkpoint_swap.STATE_FILE
    return json.loads(state_file.read_text()).get("config", {}) if state_file.is_file() else {}


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry: one SFT session of the demo reasoner (resumes `--run-dir`; the settings
    not given on the command line are the checkpoint's)."""
    parser = argparse.ArgumentParser(description="Train the demo reasoner's SFT phase (resumable).")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--max-seconds", type=float, default=None)
    parser.add_argument("--until-step", type=int, default=None, help="stop at this step (resumed runs too)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="steps between greedy evaluations on held-out scenes of the first phase")
    parser.add_argument("--eval-count", type=int, default=64)
    parser.add_argument("--plain-init", action="store_true",
                        help="Hugging Face's random init throughout (no smooth position / number codes)")
    parser.add_argument("--trace-locations", action="store_true",
                        help='keep "... is at the top left." in the training traces')
    parser.add_argument("--no-labels", action="store_true",
                        help="answers without labels (the label-prediction ablation; the run folder keeps it)")
    parser.add_argument("--from-weights", type=Path, default=None,
                        help="continue from these weights (model.safetensors) when RUN_DIR has no checkpoint")
    parser.add_argument("--from-state", type=Path, default=None,
                        help="the trainer_state.json that goes with --from-weights (stream position)")
    for name in RESUMED_SETTINGS:
        default = getattr(DEMO_SFT, name)
        parser.add_argument("--" + name.replace("_", "-"), default=None,
                            type=type(default) if default is not None else str,
                            help=f"default: the checkpoint's when resuming, else {default}")
    args = parser.parse_args(argv)
    if args.from_state is not None and args.from_weights is None:
        parser.error("--from-state goes with --from-weights (the stream position of those weights)")
    if args.threads:
        torch.set_num_threads(args.threads)
    saved = checkpoint_config(args.run_dir)
    given = {name: getattr(args, name) for name in RESUMED_SETTINGS if getattr(args, name) is not None}
    settings = {name: given.get(name, saved.get(name, getattr(DEMO_SFT, name))) for name in RESUMED_SETTINGS}
    phases = demo_curriculum(args.trace_locations)
    eval_samples = held_out(args.eval_count, phases[0].config) if args.eval_every else ()
    try:
        config = SFTConfig(**settings, eval_every=args.eval_every, eval_count=args.eval_count,
                           with_labels=not args.no_labels,
                           naming_classes=tuple(sorted(KINDS)) if settings["naming_weight"] else ())
        run_sft(args.run_dir, config, device=args.device, max_steps=args.max_steps,
                max_seconds=args.max_seconds, source=CurriculumSource(phases), eval_samples=eval_samples,
                on_log=lambda row: print(json.dumps(row), flush=True), demo_init=not args.plain_init,
                start_weights=args.from_weights, until_step=args.until_step,
                start_state=TrainerState.read(args.from_state) if args.from_state else None)
    except InvalidInputError as exc:
        parser.exit(2, f"error: {exc}\n")


if __name__ == "__main__":
    main()
