"""The configuration of a training run (`star-edge train --config NAME|PATH`), read from YAML.

A YAML file holds `TrainConfig`'s fields; its `grpo` and `sft` mappings hold fields of
`StarGRPOConfig` (any TRL GRPOConfig / TrainingArguments field too) and `SFTConfig`, and `data` those
of `DataConfig`. An optional `stages` mapping holds per-stage overrides ("sft", "1", "2") merged over
the rest when that stage runs, so one file can describe a whole recipe:

    stage: sft
    base: tiny
    grpo: {num_generations: 8}
    stages:
      "1": {base: "stage:sft", grpo: {learning_rate: 1.0e-4}}
      "2": {base: "stage:sft", adapter: "stage:1", grpo: {rest_rollouts: 32}}

Names resolve to the files in train/configs/ (`tiny`, `stage1`, `stage2`).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from star_edge.errors import InvalidInputError
from star_edge.train.grpo import StarGRPOConfig
from star_edge.train.grpo_data import DataConfig
from star_edge.train.sft import SFTConfig

CONFIG_DIR = Path(__file__).parent / "configs"
"""The named configurations shipped with star-edge."""
STAGES = ("sft", "1", "2")
"""Stage names: supervised warm start, GRPO Stage 1, GRPO Stage 2 (REST, mask reward)."""
STAGE_PREFIX = "stage:"
"""`base` / `adapter` values naming another stage's output in the same run folder: "stage:sft"."""


@dataclass
class TrainConfig:
    """Every knob of a training run (defaults: StAR Stage 1 on the tiny demo reasoner)."""

    stage: str = "1"
    """"sft" (supervised warm start), "1" (GRPO, StAR's Stage-1 reward) or "2" (GRPO with REST and the
    mask-only reward)."""
    base: str = "tiny"
    """The reasoner trained: a bundle folder, a Hugging Face Qwen2.5-VL / Qwen3-VL checkpoint folder,
    "stage:<name>" (that stage's bundle in the same --out), or "tiny" (the demo reasoner built from
    config with random weights: what a from-scratch SFT starts from)."""
    adapter: str | None = None
    """A LoRA adapter over `base` to go on training (a peft folder or "stage:<name>"); StAR's Stage 2
    continues Stage 1's adapter. None starts a fresh LoRA (or, with `grpo: lora_rank: 0`, trains the
    base's own weights: full fine-tuning continues a stage through `base`, never an adapter)."""
    sam: str | None = None
    """SAM for the mask rewards and the written bundle: a bundle folder, a sam/ folder, or "tiny"
    (the untrained tiny SAM); None takes `base`'s bundle's SAM."""
    prompt_template: str | None = None
    """The question asked (a prompt template id); None: the base bundle's, else "star_v1"."""
    input_size: int | None = None
    """Square reasoner input in pixels for a plain checkpoint base; None: the family default (840 for
    Qwen2.5-VL, 832 for Qwen3-VL). A bundle base keeps its own."""
    max_new_tokens: int | None = None
    """The answer budget written into the bundle; None: the base bundle's, else 1024."""
    with_labels: bool = True
    """Labels are asked for and rewarded; False is the label-prediction ablation (needs a prompt
    template "<id>_nolabel")."""
    empty_answer_format: bool = True
    """`[]` earns the full object format (see star_edge.train.rewards); False: the reference's 0."""
    lenient_answers: bool = False
    """Score answers the runtime parser reads but the reference's json.loads does not."""
    device: str = "auto"
    """Device of SFT and of SAM inside the reward ("auto": CUDA when available); GRPO's model goes
    where accelerate puts it."""
    data: DataConfig = field(default_factory=DataConfig)
    """Where prompts come from."""
    sft: dict[str, Any] = field(default_factory=dict)
    """SFTConfig fields for stage "sft"."""
    grpo: dict[str, Any] = field(default_factory=dict)
    """StarGRPOConfig fields for stages "1" and "2"."""

    def __post_init__(self) -> None:
        self.stage = str(self.stage)
        if self.stage not in STAGES:
            raise InvalidInputError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if isinstance(self.data, dict):
            self.data = DataConfig(**_known(self.data, DataConfig, "data"))
        _known(self.sft, SFTConfig, "sft")
        _known(self.grpo, StarGRPOConfig, "grpo")
        if "output_dir" in self.grpo:
            raise InvalidInputError("grpo output_dir is not a setting: checkpoints go under --out")

    def sft_config(self) -> SFTConfig:
        """The SFTConfig of stage "sft" (labels follow `with_labels`)."""
        return SFTConfig(**{"with_labels": self.with_labels, **self.sft})

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain data (for the run folder's config.yaml)."""
        return dataclasses.asdict(self)


def _known(values: dict[str, Any], kind: type, section: str) -> dict[str, Any]:
    """`values` if every key is a field of the dataclass `kind`, else InvalidInputError."""
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise InvalidInputError(f"unknown {section} field(s) {', '.join(unknown)}")
    tuples = {f.name for f in dataclasses.fields(kind) if "tuple" in str(f.type)}
    return {key: tuple(value) if key in tuples and isinstance(value, list) else value for key, value in values.items()}


def config_path(name_or_path: str | Path) -> Path:
    """A YAML path as given, or the shipped config of that name (train/configs/<name>.yaml)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise InvalidInputError(f"config file {path} not found")
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if not shipped.is_file():
        names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise InvalidInputError(f"no config named {name_or_path!r} (shipped: {names}); or give a YAML path")
    return shipped


def load_config(name_or_path: str | Path, stage: str | None = None) -> TrainConfig:
    """The TrainConfig of a YAML file or shipped name, with `stage` (default: the file's) and that
    stage's overrides applied.

    Raises InvalidInputError for a missing file, invalid YAML, unknown fields or stage.
    """
    path = config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise InvalidInputError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise InvalidInputError(f"{path} must hold a mapping of config fields")
    stages = _stage_overrides(raw.pop("stages", None) or {}, path)
    chosen = str(stage if stage is not None else raw.get("stage", TrainConfig.stage))
    for name in stages:  # every stage's overrides are checked, not only the chosen one's
        if name != chosen:
            _stage_config(raw, stages, name, path)
    return _stage_config(raw, stages, chosen, path)


def _stage_overrides(stages: Any, path: Path) -> dict[str, dict[str, Any]]:
    """The `stages` mapping with its keys as stage names ("1" for YAML's 1); InvalidInputError for a
    key that names no stage or a value that is not a mapping."""
    if not isinstance(stages, dict):
        raise InvalidInputError(f"{path}: stages must map stage names ({', '.join(STAGES)}) to overrides")
    named = {}
    for key, overrides in stages.items():
        if str(key) not in STAGES:
            raise InvalidInputError(f"{path}: stages has {key!r}, not a stage ({', '.join(STAGES)})")
        if not isinstance(overrides or {}, dict):
            raise InvalidInputError(f"{path}: stages {key!r} must be a mapping of overrides")
        named[str(key)] = overrides or {}
    return named


def _stage_config(raw: dict[str, Any], stages: dict[str, dict[str, Any]], name: str, path: Path) -> TrainConfig:
    """The TrainConfig of stage `name`: `raw` with that stage's overrides merged in."""
    merged = _merge(raw, stages.get(name, {}))
    merged["stage"] = name
    try:
        return TrainConfig(**_known(merged, TrainConfig, "top-level"))
    except (InvalidInputError, TypeError) as error:
        raise InvalidInputError(f"{path}, stage {name}: {error}") from None


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` merged in, mappings merged key by key."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged
