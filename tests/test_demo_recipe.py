"""The demo model's recipe: the curriculum stream is a pure function of the index; the compact
prompt is what the demo reasoner is initialised with."""

from __future__ import annotations

import json

import numpy as np

from star_edge.reasoner.prompts import build_messages
from star_edge.train.data.synthetic import SyntheticConfig
from star_edge.train.demo import CurriculumSource, Phase, init_reasoner


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
