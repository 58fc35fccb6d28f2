"""The demo model's recipe: the curriculum stream is a pure function of the index; the compact
prompt is what the demo reasoner is initialised with; the smooth initial codes; traces without
locations."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from star_edge.reasoner.prompts import build_messages
from star_edge.reasoner.torch_backend import TorchReasoner
from star_edge.train.data.synthetic import SyntheticConfig, sample
from star_edge.train.demo import CurriculumSource, Phase, demo_curriculum, init_reasoner
from star_edge.train.demo_init import number_rows, position_grid

LOCATION_WORDS = re.compile(r"\b(left|right|top|bottom|middle)\b")
WHERE_PHRASE = re.compile(r"at the (top |bottom )?(left|right)\b|at the (top|bottom)\b|in the middle")


def test_curriculum_switches_phase_at_the_boundary_and_repeats_exactly():
    single, mixed = SyntheticConfig(stage="single", objects=(1, 3)), SyntheticConfig(stage="mixed")
    source = CurriculumSource((Phase(3, single), Phase(10, mixed)), seed=5)
    assert [source.config_at(i).stage for i in (0, 2, 3, 12, 99)] == ["single", "single", "mixed",
                                                                     "mixed", "mixed"]
    first, again = source(4), CurriculumSource((Phase(3, single), Phase(10, mixed)), seed=5)(4)
    assert first.query == again.query and np.array_equal(first.image, again.image)
    assert source(0).reasoning_type == "single"


def test_demo_reasoner_uses_the_compact_prompt(tmp_path):
    section = init_reasoner(tmp_path / "r")
    assert section["prompt_template"] == "star_compact_v1" and section["frame"] == "grid1000"
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl"
    compact = build_messages("the red cup", "grid1000", "star_compact_v1")[0]["content"][1]["text"]
    full = build_messages("the red cup", "grid1000", "star_v1")[0]["content"][1]["text"]
    assert "the red cup" in compact and len(compact) < len(full) / 2


def test_no_label_templates_drop_only_the_label():
    for template in ("star_v1", "star_compact_v1"):
        with_label = build_messages("the cup", "pixels", template)[0]["content"][1]["text"]
        without = build_messages("the cup", "pixels", template + "_nolabel")[0]["content"][1]["text"]
        assert "label" in with_label and "label" not in without
        assert "bbox_2d" in without and "point_2d" in without and "the cup" in without


def test_position_grid_codes_row_and_column_separately_and_keeps_its_scale():
    side, width = 16, 128
    grid = position_grid(side, width, rms=0.25).reshape(side, side, width)
    assert grid.dtype == torch.float32
    assert float(grid.pow(2).mean().sqrt()) == pytest.approx(0.25, rel=1e-3)
    quarter = width // 4
    rows, columns = grid[..., : 2 * quarter], grid[..., 2 * quarter:]
    # the row half does not change along a row, the column half not down a column
    assert torch.equal(rows, rows[:, :1].expand_as(rows)) and torch.equal(columns, columns[:1].expand_as(columns))
    flat = grid.reshape(side * side, width)
    distances = torch.cdist(flat, flat)
    assert float(distances.masked_fill(torch.eye(side * side, dtype=torch.bool), 1e9).min()) > 0.05
    # nearer patches are more alike: the code of (5, 5) is closer to (5, 6) than to (5, 12)
    assert torch.dist(grid[5, 5], grid[5, 6]) < torch.dist(grid[5, 5], grid[5, 12])


def test_number_rows_are_smooth_in_the_number_and_keep_their_scale():
    rows = number_rows(1001, 256, rms=0.02)
    assert rows.shape == (1001, 256) and float(rows.pow(2).mean().sqrt()) == pytest.approx(0.02, rel=1e-3)
    cosine = torch.nn.functional.normalize(rows, dim=1) @ torch.nn.functional.normalize(rows, dim=1).T
    # similarity falls with the distance between numbers: 500 vs 501 > 500 vs 520 > 500 vs 900
    assert cosine[500, 501] > cosine[500, 520] > cosine[500, 900]
    assert float(cosine[500, 501]) > 0.9


def test_demo_init_rewrites_only_the_coded_rows_and_the_model_loads(tmp_path):
    plain_section = init_reasoner(tmp_path / "plain", demo_init=False)
    init_reasoner(tmp_path / "demo")
    plain = load_file(str(tmp_path / "plain" / "model.safetensors"))
    demo = load_file(str(tmp_path / "demo" / "model.safetensors"))
    tokenizer = Tokenizer.from_file(str(tmp_path / "demo" / "tokenizer.json"))
    numbers = torch.tensor([tokenizer.token_to_id(str(n)) for n in range(1001)])
    others = torch.ones(len(plain["lm_head.weight"]), dtype=torch.bool)
    others[numbers] = False
    side = int(len(plain["model.visual.pos_embed.weight"]) ** 0.5)
    torch.testing.assert_close(demo["model.visual.pos_embed.weight"],
                               position_grid(side, plain["model.visual.pos_embed.weight"].shape[1]))
    for name in ("lm_head.weight", "model.language_model.embed_tokens.weight"):
        torch.testing.assert_close(demo[name][numbers], number_rows(1001, demo[name].shape[1]))
        assert torch.equal(demo[name][others], plain[name][others])
    untouched = set(plain) - {"lm_head.weight", "model.language_model.embed_tokens.weight",
                              "model.visual.pos_embed.weight"}
    assert all(torch.equal(plain[name], demo[name]) for name in untouched)
    reasoner = TorchReasoner.from_dir(tmp_path / "demo", plain_section, dtype=torch.float32)
    torch.testing.assert_close(reasoner.model.lm_head.weight.detach()[numbers[7]], number_rows(1001, 256)[7])


def test_traces_without_locations_change_nothing_else():
    changed = 0
    for stage in ("single", "reasoning", "mixed"):
        for index in range(40):
            located = sample(3, index, SyntheticConfig(stage=stage))
            plain = sample(3, index, SyntheticConfig(stage=stage, trace_locations=False))
            assert plain.query == located.query and np.array_equal(plain.image, located.image)
            assert np.array_equal(plain.boxes, located.boxes) and plain.labels == located.labels
            assert plain.trace == WHERE_PHRASE.sub("in the image", located.trace)
            changed += plain.trace != located.trace
            if stage == "single" and len(plain.boxes):
                assert not LOCATION_WORDS.search(plain.trace) and LOCATION_WORDS.search(located.trace)
    assert changed > 60
    assert all(not phase.config.trace_locations for phase in demo_curriculum())


def test_demo_bundle_is_rebuilt_byte_for_byte_from_its_weights_and_card(tmp_path):
    from safetensors.torch import save_file

    from star_edge.bundle import load_bundle
    from star_edge.defaults import DEMO_BUNDLE_DIR
    from star_edge.errors import BundleError
    from star_edge.train.demo_bundle import write_demo_bundle

    shipped = load_bundle(DEMO_BUNDLE_DIR)
    rebuilt = write_demo_bundle(tmp_path / "b", shipped.reasoner_dir / "model.safetensors", shipped.sam_dir,
                                shipped.manifest["card"])
    assert rebuilt.trained and "onnx" in rebuilt.backends
    if rebuilt.manifest["onnx"] == shipped.manifest["onnx"]:  # the exporter's versions are the shipped one's
        assert rebuilt.manifest == shipped.manifest
    else:  # graphs written by other torch / transformers / onnx versions: all else is the same
        def without_graphs(manifest: dict) -> dict:
            files = {path: entry for path, entry in manifest["files"].items() if not path.startswith("onnx/")}
            return {**{key: value for key, value in manifest.items() if key != "onnx"}, "files": files}

        assert without_graphs(rebuilt.manifest) == without_graphs(shipped.manifest)
    weights = load_file(str(shipped.reasoner_dir / "model.safetensors"))
    weights.pop("lm_head.weight")
    save_file(weights, str(tmp_path / "partial.safetensors"))
    with pytest.raises(BundleError, match="do not match"):
        write_demo_bundle(tmp_path / "c", tmp_path / "partial.safetensors", shipped.sam_dir)
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 16)
    for weights in (tmp_path / "broken.safetensors", tmp_path / "nowhere.safetensors"):
        with pytest.raises(BundleError, match="not a readable safetensors file"):
            write_demo_bundle(tmp_path / "d", weights, shipped.sam_dir)
    with pytest.raises(BundleError, match="SAM folder"):
        write_demo_bundle(tmp_path / "e", shipped.reasoner_dir / "model.safetensors", tmp_path / "no-sam")


def test_run_sft_until_step_stops_there_across_reruns(tmp_path):
    from star_edge.train.demo import run_sft
    from star_edge.train.sft import SFTConfig

    config = SFTConfig(batch_size=2, warmup_steps=1, log_every=1, checkpoint_every=1000, eval_every=0)
    assert run_sft(tmp_path, config, until_step=2).step == 2
    assert run_sft(tmp_path, config, until_step=2).step == 2  # a rerun adds nothing
    assert run_sft(tmp_path, config, until_step=3, max_steps=5).step == 3
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["1", "2", "3"]


def test_demo_eval_reports_every_phase_and_the_end_to_end_score(tmp_path):
    from star_edge.train.demo_eval import main

    main(["--val", "3", "--dense", "2", "--scenes", "2", "--samples", "2", "--json", str(tmp_path / "card.json")])
    report = json.loads((tmp_path / "card.json").read_text())
    assert sorted(report["box_iou"]) == ["phase 1", "phase 2", "phase 3"]
    assert report["dense_naming"]["objects"] >= 4 and 0.0 <= report["dense_naming"]["named"] <= 1.0
    assert report["box_iou"]["phase 1"]["parsed"] == 1.0  # the trained model answers named targets
    assert all(0.0 <= scores["box_iou"] <= 1.0 for scores in report["box_iou"].values())
    end_to_end = report["end_to_end"]
    assert end_to_end["backend"] == "onnx" and end_to_end["scenes"] == 2 and 0.0 <= end_to_end["mean_mask_iou"] <= 1.0


def test_naming_counts_found_objects_and_right_labels_of_a_scripted_answer(tmp_path):
    from dataclasses import replace

    from star_edge.export.tiny_reasoner import write_tiny_reasoner
    from star_edge.train.answer_text import format_answer
    from star_edge.train.demo_eval import greedy_naming

    config = replace(demo_curriculum()[-1].config, stage="dense")
    scene = next(s for s in (sample(7, i, config) for i in range(50)) if len(s.labels) >= 3)
    kept = len(scene.labels) - 1  # the last object is left out, the second is misnamed
    labels = [scene.labels[0], "zebra", *scene.labels[2:kept]]
    answer = format_answer(scene.boxes[:kept], scene.points[:kept], labels, (256, 256), "grid1000", (256, 256))
    section = write_tiny_reasoner(tmp_path / "r", seed=0, family="qwen3_vl", scripted_answers=[answer])
    scores = greedy_naming(TorchReasoner.from_dir(tmp_path / "r", section), [scene])
    assert scores == {"objects": len(scene.labels), "found": kept / len(scene.labels),
                      "named": (kept - 1) / kept, "precision": 1.0}


def test_demo_eval_skips_a_part_asked_for_zero_times(tmp_path, capsys):
    from star_edge.train.demo_eval import main

    main(["--val", "0", "--dense", "0", "--scenes", "1", "--samples", "1", "--json", str(tmp_path / "card.json")])
    report = json.loads((tmp_path / "card.json").read_text())
    assert "box_iou" not in report and "dense_naming" not in report and report["end_to_end"]["scenes"] == 1
    with pytest.raises(SystemExit):
        main(["--val", "-1"])
    assert "--val must be at least 0" in capsys.readouterr().err


def test_demo_sft_without_labels_trains_and_bundles_the_no_label_format(tmp_path, capsys):
    from star_edge.bundle import load_bundle
    from star_edge.defaults import DEMO_BUNDLE_DIR
    from star_edge.train.demo import main
    from star_edge.train.demo_bundle import write_demo_bundle
    from star_edge.train.sft import SFTBatcher

    run = ["--run-dir", str(tmp_path / "run"), "--batch-size", "2", "--warmup-steps", "1", "--log-every", "1"]
    main([*run, "--no-labels", "--until-step", "1"])
    section = json.loads((tmp_path / "run" / "reasoner_manifest.json").read_text())
    assert section["prompt_template"] == "star_compact_v1_nolabel"
    reasoner = TorchReasoner.from_dir(tmp_path / "run" / "init", section, dtype=torch.float32)
    target = CurriculumSource()(130_000)  # the mixed stream: several targets, each with a label
    tokenizer = reasoner.processor.tokenizer
    for with_labels in (True, False):
        text = tokenizer.decode(SFTBatcher(reasoner, with_labels).encode(target)["input_ids"])
        answer = text.rsplit("<answer>", 1)[1]
        assert ('"label"' in answer) is with_labels and answer.count('"bbox_2d"') == len(target.boxes)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:  # the run folder keeps its answer format
        main([*run, "--until-step", "2"])
    assert stopped.value.code == 2 and "star_compact_v1_nolabel" in capsys.readouterr().err
    # resumed without its settings: the checkpoint's (batch 2, warm-up 1 step), not DEMO_SFT's (batch 32)
    main(["--run-dir", str(tmp_path / "run"), "--no-labels", "--until-step", "2"])
    saved = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert saved["state"]["samples_seen"] == 4
    assert (saved["config"]["batch_size"], saved["config"]["warmup_steps"]) == (2, 1)
    with pytest.raises(SystemExit) as stopped:
        main([*run, "--from-state", str(tmp_path / "state.json")])
    assert stopped.value.code == 2 and "--from-state goes with --from-weights" in capsys.readouterr().err

    shipped = load_bundle(DEMO_BUNDLE_DIR)
    weights = tmp_path / "run" / "checkpoint" / "reasoner" / "model.safetensors"
    bundle = write_demo_bundle(tmp_path / "b", weights, shipped.sam_dir, onnx=False, with_labels=False)
    assert bundle.manifest["reasoner"]["prompt_template"] == "star_compact_v1_nolabel"
    asked = TorchReasoner.from_dir(bundle.reasoner_dir, bundle.manifest["reasoner"], dtype=torch.float32)
    assert asked.prompt_template == "star_compact_v1_nolabel"


def test_the_sft_recipe_imports_none_of_the_grpo_stages_dependencies():
    # A GPU machine runs the SFT phase with torch and transformers alone: no datasets, trl or peft.
    code = ("import sys, star_edge.train.demo; "
            "loaded = sorted({'datasets', 'trl', 'peft'} & set(sys.modules)); assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)
