"""`star-edge train`: configs, the three stages end to end on the tiny demo reasoner, resume, bundles."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from star_edge.cli import app
from star_edge.errors import InvalidInputError
from star_edge.reasoner.prompts import PROMPT_TEMPLATES
from star_edge.segmenter import Segmenter
from star_edge.train.config import TrainConfig, load_config
from star_edge.train.grpo import StarGRPOConfig
from star_edge.train.grpo_data import NO_LABEL_SUFFIX, prompt_template_for

MINI = {
    "stage": "sft",
    "base": "tiny",
    "sam": "tiny",
    "device": "cpu",
    "data": {"synthetic_stage": "single", "objects": [1, 2], "train_samples": 64},
    "sft": {"batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "total_steps": 50, "log_every": 1,
            "checkpoint_every": 100, "eval_every": 0},
    "grpo": {"use_cpu": True, "bf16": False, "activation_checkpointing": False, "per_device_train_batch_size": 4,
             "gradient_accumulation_steps": 1, "num_generations": 4, "max_completion_length": 6,
             "learning_rate": 1e-3, "lora_rank": 4, "lora_alpha": 4, "max_steps": 2, "save_steps": 10},
    "stages": {"1": {"base": "stage:sft"},
               "2": {"base": "stage:sft", "adapter": "stage:1", "grpo": {"rest_rollouts": 8}}},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_shipped_configs_load_with_their_stage_overrides():
    tiny = load_config("tiny")
    assert tiny.stage == "sft" and tiny.base == "tiny" and tiny.sft_config().total_steps == 200
    stage2 = load_config("tiny", stage="2")
    assert (stage2.stage, stage2.base, stage2.adapter) == ("2", "stage:sft", "stage:1")
    assert stage2.grpo["rest_rollouts"] == 16 and stage2.grpo["num_generations"] == 4
    assert stage2.grpo["lora_rank"] == 16 and stage2.grpo["max_completion_length"] == 64
    args = StarGRPOConfig(output_dir="unused", **stage2.grpo)
    assert (args.rest_rollouts, args.num_generations, args.lora_rank) == (16, 4, 16)
    paper1, paper2 = load_config("stage1"), load_config("stage2")
    assert (paper1.grpo["learning_rate"], paper1.grpo["num_generations"], paper1.grpo["beta"]) == (1e-5, 16, 0.0)
    assert (paper2.grpo["learning_rate"], paper2.grpo["rest_rollouts"], paper2.adapter) == (5e-6, 256, "stage:1")
    assert paper1.grpo["lora_rank"] == paper1.grpo["lora_alpha"] == 64
    demo1, demo2 = load_config("demo"), load_config("demo", stage="2")
    assert (demo1.stage, demo1.base, demo1.data.synthetic_stage) == ("1", "runs/demo/bundle", "mixed")
    assert (demo2.base, demo2.adapter, demo2.grpo["rest_rollouts"]) == ("runs/demo/bundle", "stage:1", 32)
    vanilla = load_config("demo_vanilla")  # Stage 2 without REST, otherwise as demo's Stage 2
    assert (vanilla.stage, vanilla.base, vanilla.grpo.get("rest_rollouts", 0)) == ("2", demo2.base, 0)
    assert {k: v for k, v in vanilla.grpo.items() if k != "max_steps"} == {
        k: v for k, v in demo2.grpo.items() if k not in ("max_steps", "rest_rollouts")}
    full = load_config("demo_full")  # Stage 1 with full fine-tuning, otherwise as demo's Stage 1
    assert (full.stage, full.base, full.data, full.grpo["lora_rank"]) == ("1", demo1.base, demo1.data, 0)
    assert {k: v for k, v in full.grpo.items() if k not in ("learning_rate", "lora_rank")} == {
        k: v for k, v in demo1.grpo.items() if k not in ("learning_rate", "lora_rank", "lora_alpha")}
    for demo in (demo1, demo2, vanilla, full):
        StarGRPOConfig(output_dir="unused", **demo.grpo)  # REST's group constraints hold


def test_bad_configs_name_the_problem(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"stage": "1", "grpo": {"learning_rat": 1.0}}))
    with pytest.raises(InvalidInputError, match="learning_rat"):
        load_config(path)
    with pytest.raises(InvalidInputError, match="stage"):
        TrainConfig(stage="3")
    with pytest.raises(InvalidInputError, match="no config named"):
        load_config("no-such-config")
    for stages, message in (({"stage2": {"grpo": {"rest_rollouts": 8}}}, "'stage2', not a stage"),
                            ({3: {}}, "3, not a stage"),
                            ({"2": [1]}, "must be a mapping"),
                            ({"2": {"grpo": {"rest_rollout": 8}}}, "stage 2: unknown grpo field"),
                            ({"sft": {"grpo": {"output_dir": "x"}}}, "output_dir is not a setting")):
        path.write_text(yaml.safe_dump({"stage": "1", "stages": stages}))
        with pytest.raises(InvalidInputError, match=message):
            load_config(path)  # stage 1 is chosen: the other stages' overrides are checked too


def test_the_label_ablation_asks_with_a_no_label_template():
    variant = "star_v1" + NO_LABEL_SUFFIX
    assert prompt_template_for("star_v1", with_labels=True) == "star_v1"
    if variant in PROMPT_TEMPLATES:
        assert prompt_template_for("star_v1", with_labels=False) == variant
    else:
        with pytest.raises(InvalidInputError, match=variant):
            prompt_template_for("star_v1", with_labels=False)


def run(*args: str):
    result = CliRunner().invoke(app, ["train", *args])
    return result.exit_code, result.output


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_three_stages_resume_and_write_loadable_bundles(tmp_path):
    config = tmp_path / "mini.yaml"
    config.write_text(yaml.safe_dump(MINI))
    out = tmp_path / "run"

    code, output = run("--config", str(config), "--max-steps", "2", "--out", str(out))
    assert code == 0, output
    assert [row["step"] for row in rows(out / "sft" / "metrics.jsonl")] == [1, 2]
    Segmenter.from_pretrained(out / "sft" / "bundle").close()

    code, output = run("--config", str(config), "--stage", "1", "--max-steps", "1", "--out", str(out))
    assert code == 0, output
    code, output = run("--config", str(config), "--stage", "1", "--max-steps", "2", "--out", str(out))
    assert code == 2 and "--resume" in output
    code, output = run("--config", str(config), "--stage", "1", "--max-steps", "2", "--out", str(out), "--resume")
    assert code == 0, output
    logged = rows(out / "stage1" / "metrics.jsonl")
    assert [row["step"] for row in logged if "reward" in row] == [1, 2]
    assert {"reward/format", "reward/accuracy", "reward/mask", "reward/group_std", "completions/mean_length"} <= set(
        logged[0])
    state = json.loads((out / "stage1" / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    # A run stopped after logging step 2 but before its checkpoint: the resumed run trains step 2
    # again and its log keeps one row per step.
    shutil.rmtree(out / "stage1" / "checkpoints" / "checkpoint-2")
    code, output = run("--config", str(config), "--stage", "1", "--max-steps", "2", "--out", str(out), "--resume")
    assert code == 0, output
    assert [row["step"] for row in rows(out / "stage1" / "metrics.jsonl") if "reward" in row] == [1, 2]
    # Resuming a run that has reached --max-steps only writes its bundle (no step 3).
    code, output = run("--config", str(config), "--stage", "1", "--max-steps", "2", "--out", str(out), "--resume")
    assert code == 0, output
    assert [row["step"] for row in rows(out / "stage1" / "metrics.jsonl") if "reward" in row] == [1, 2]
    assert sorted(p.name for p in (out / "stage1" / "checkpoints").glob("checkpoint-*")) == ["checkpoint-1",
                                                                                          "checkpoint-2"]
    saved = (out / "stage1" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert saved == (out / "stage1" / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors").read_bytes()
    with Segmenter.from_pretrained(out / "stage1" / "bundle") as segmenter:
        assert segmenter.bundle.trained and segmenter.bundle.reasoner.prompt_template == "star_compact_v1"

    code, output = run("--config", str(config), "--stage", "2", "--max-steps", "1", "--out", str(out))
    assert code == 0, output
    first = rows(out / "stage2" / "metrics.jsonl")[0]
    assert {"rest/std_before", "rest/std_after", "rest/range_before", "rest/range_after"} <= set(first)
    assert json.loads((out / "stage2" / "adapter" / "adapter_config.json").read_text())["r"] == 4
    Segmenter.from_pretrained(out / "stage2" / "bundle").close()


def test_lora_settings_that_a_continued_adapter_would_ignore_are_refused(tmp_path):
    from star_edge.train.run import check_adapter_settings

    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 32, "lora_alpha": 32, "lora_dropout": 0.0}))
    check_adapter_settings({"lora_rank": 32, "lora_alpha": 32, "learning_rate": 1e-4}, tmp_path)
    check_adapter_settings({}, tmp_path)
    with pytest.raises(InvalidInputError, match="lora_rank is 64, but the adapter continued .* has r 32"):
        check_adapter_settings({"lora_rank": 64}, tmp_path)
    with pytest.raises(InvalidInputError, match="lora_dropout"):
        check_adapter_settings({"lora_dropout": 0.1}, tmp_path)


def test_a_stage_planned_in_epochs_trains_them_and_resumes_as_finished(tmp_path):
    """StAR's own configs (stage1.yaml, stage2.yaml) set num_train_epochs and no max_steps."""
    grpo = {key: value for key, value in MINI["grpo"].items() if key != "max_steps"}
    settings = {key: value for key, value in MINI.items() if key != "stages"}
    config = tmp_path / "epochs.yaml"
    config.write_text(yaml.safe_dump({**settings, "stage": "1", "data": {**MINI["data"], "train_samples": 2},
                                      "grpo": {**grpo, "num_train_epochs": 1}}))
    out = tmp_path / "run"
    code, output = run("--config", str(config), "--out", str(out))
    assert code == 0, output
    steps = lambda: [row["step"] for row in rows(out / "stage1" / "metrics.jsonl") if "reward" in row]  # noqa: E731
    assert steps() == [1, 2], "one epoch of 2 prompts, one prompt's 4 rollouts a step"
    saved = (out / "stage1" / "adapter" / "adapter_model.safetensors").read_bytes()
    code, output = run("--config", str(config), "--out", str(out), "--resume")
    assert code == 0, output
    assert steps() == [1, 2] and (out / "stage1" / "adapter" / "adapter_model.safetensors").read_bytes() == saved
    Segmenter.from_pretrained(out / "stage1" / "bundle").close()


def test_grpo_from_the_demo_bundle_takes_prompts_of_different_lengths_in_one_batch(tmp_path):
    """TRL re-encodes the prompts for the policy's forward pass: with right padding the image-token
    types of the shorter prompt were shifted off its image tokens and Qwen3-VL's position index
    failed. Two prompts of very different token counts share the one step here."""
    from star_edge.defaults import DEMO_BUNDLE_DIR
    from star_edge.train.grpo_data import DataConfig, synthetic_items

    data = {"synthetic_stage": "reasoning", "train_samples": 2}  # one step: both prompts, 8 rollouts each
    words = sorted(len(synthetic_items(DataConfig(**data))(index).query.split()) for index in range(2))
    assert words[1] - words[0] >= 8  # more padding than there are tokens before the image
    config = tmp_path / "demo.yaml"
    settings = {key: value for key, value in MINI.items() if key != "stages"}
    config.write_text(yaml.safe_dump({**settings, "stage": "1", "base": str(DEMO_BUNDLE_DIR), "sam": None,
                                      "data": data, "grpo": {**MINI["grpo"], "num_generations": 8,
                                                                  "per_device_train_batch_size": 16}}))
    code, output = run("--config", str(config), "--max-steps", "1", "--out", str(tmp_path / "run"))
    assert code == 0, output
    assert [row["step"] for row in rows(tmp_path / "run" / "stage1" / "metrics.jsonl") if "reward" in row] == [1]


def test_full_fine_tuning_trains_the_language_model_and_leaves_the_vision_tower(tmp_path):
    from safetensors.torch import load_file

    settings = {**MINI, "grpo": {**MINI["grpo"], "lora_rank": 0},
                "stages": {"1": {"base": "stage:sft"}, "2": {"base": "stage:sft", "adapter": "stage:1"}}}
    config = tmp_path / "full.yaml"
    config.write_text(yaml.safe_dump(settings))
    out = tmp_path / "run"
    assert run("--config", str(config), "--max-steps", "1", "--out", str(out))[0] == 0
    code, output = run("--config", str(config), "--stage", "1", "--max-steps", "2", "--out", str(out))
    assert code == 0, output
    assert not (out / "stage1" / "adapter").exists()
    base = load_file(str(out / "sft" / "bundle" / "reasoner" / "model.safetensors"))
    tuned = load_file(str(out / "stage1" / "bundle" / "reasoner" / "model.safetensors"))
    assert base.keys() == tuned.keys()
    vision = [name for name in base if name.startswith("model.visual.")]
    language = [name for name in base if name.startswith("model.language_model.")]
    assert vision and all(base[name].equal(tuned[name]) for name in vision)
    changed = [name for name in language if not base[name].equal(tuned[name])]
    assert any("mlp" in name for name in changed) and any("embed_tokens" in name for name in changed)
    first = (out / "stage1" / "bundle" / "reasoner" / "model.safetensors").read_bytes()
    # Resumed at --max-steps: the same weights again, from the last checkpoint, no step 3.
    code, output = run("--config", str(config), "--stage", "1", "--max-steps", "2", "--out", str(out), "--resume")
    assert code == 0, output
    assert (out / "stage1" / "bundle" / "reasoner" / "model.safetensors").read_bytes() == first
    assert [row["step"] for row in rows(out / "stage1" / "metrics.jsonl") if "reward" in row] == [1, 2]
    with Segmenter.from_pretrained(out / "stage1" / "bundle") as segmenter:
        assert segmenter.bundle.trained and segmenter.bundle.reasoner.prompt_template == "star_compact_v1"
    code, output = run("--config", str(config), "--stage", "2", "--max-steps", "1", "--out", str(out))
    assert code == 2 and "full fine-tuning" in output and "stage:1" in output


def test_a_stage_carried_without_its_optimiser_resumes_with_the_same_prompts_draws_and_rate(tmp_path):
    """`carry` drops optimizer.pt; the resumed step 3 then samples the same completions from the same
    weights as an uninterrupted run and trains at the same point of a warm-up schedule (Trainer
    alone restarts the schedule when the optimiser state is missing)."""
    from star_edge.train.carry import carry

    settings = {**MINI, "grpo": {**MINI["grpo"], "lr_scheduler_type": "constant_with_warmup", "warmup_steps": 4}}
    config = tmp_path / "mini.yaml"
    config.write_text(yaml.safe_dump(settings))
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run("--config", str(config), "--max-steps", "1", "--out", str(whole))[0] == 0
    shutil.copytree(whole / "sft", split / "sft")
    code, output = run("--config", str(config), "--stage", "1", "--max-steps", "3", "--out", str(whole))
    assert code == 0, output

    code, output = run("--config", str(config), "--stage", "1", "--max-steps", "2", "--out", str(split))
    assert code == 0, output
    carried = carry(split / "stage1", tmp_path / "carried")
    assert carried == tmp_path / "carried" / "checkpoints" / "checkpoint-2"
    assert [p.name for p in (tmp_path / "carried" / "checkpoints").iterdir()] == ["checkpoint-2"]
    assert not (carried / "optimizer.pt").exists() and (carried / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "carried" / "adapter").exists(), "a finished stage's adapter/ is its last checkpoint's"
    shutil.rmtree(split / "stage1")
    shutil.copytree(tmp_path / "carried", split / "stage1")
    code, output = run("--config", str(config), "--stage", "1", "--max-steps", "2", "--out", str(split), "--resume")
    assert code == 0, output  # at its last step: adapter/ and the bundle written again from the checkpoint
    adapter = (split / "stage1" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert adapter == (carried / "adapter_model.safetensors").read_bytes()
    code, output = run("--config", str(config), "--stage", "1", "--max-steps", "3", "--out", str(split), "--resume")
    assert code == 0, output

    expected = [row for row in rows(whole / "stage1" / "metrics.jsonl") if "reward" in row]
    resumed = [row for row in rows(split / "stage1" / "metrics.jsonl") if "reward" in row]
    assert [row["step"] for row in resumed] == [1, 2, 3]
    assert 0 < expected[2]["learning_rate"] < settings["grpo"]["learning_rate"]  # still warming up
    for key in ("learning_rate", "reward", "completions/mean_length", "loss", "grad_norm"):
        assert resumed[2][key] == pytest.approx(expected[2][key], rel=1e-6), key

    with pytest.raises(InvalidInputError, match="not an empty folder"):
        carry(split / "stage1", tmp_path / "carried")
    with pytest.raises(InvalidInputError, match="no GRPO checkpoint"):
        carry(split / "sft", tmp_path / "elsewhere")
    with pytest.raises(InvalidInputError, match="inside the stage folder"):
        carry(split / "stage1", split / "stage1" / "copy")
