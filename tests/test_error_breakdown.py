"""error_breakdown: outcomes and groundings of answers built by hand on regenerated synthetic scenes,
and on a real `star-edge eval --synthetic` report, whose losses must add up to its 1 - gIoU."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from star_edge.cli import app
from star_edge.errors import InvalidInputError
from star_edge.export.tiny import make_tiny_bundle
from star_edge.kernels import rle_encode
from star_edge.train.data.synthetic import BENCHMARK_CONFIG, sample, split_seed
from star_edge.train.error_breakdown import breakdown, main
from star_edge.train.metrics import intersection_union, iou

STREAM = split_seed(0, "val")
META = {"synthetic": {"split": "val", "seed": 0, "count": 40}}


def _first(condition):
    return next(i for i in range(40) if condition(sample(STREAM, i, BENCHMARK_CONFIG)))


def _record(index: int, query_index: int, predicted: np.ndarray, labels: list[str], n_valid: int = 1) -> dict:
    scene = sample(STREAM, index, BENCHMARK_CONFIG)
    intersection, union = intersection_union(predicted, scene.mask)
    return {"index": index, "query_index": query_index, "image_id": scene.image_id, "n_samples": 1,
            "n_objects": len(labels), "labels": labels, "iou": iou(intersection, union),
            "target_area": int(scene.mask.sum()), "pred_area": int(predicted.sum()), "n_valid": n_valid,
            "pred_mask": rle_encode(predicted[None])[0]}


def test_outcomes_and_groundings_of_answers_built_on_the_scenes():
    with_target = _first(lambda s: len(s.target_ids) == 1 and len(s.objects) >= 2)
    without = _first(lambda s: not s.target_ids)
    scene = sample(STREAM, with_target, BENCHMARK_CONFIG)
    target = scene.target_ids[0]
    other = next(i for i in range(len(scene.objects)) if i != target)
    masks, nouns = scene.instance_masks, [obj.noun for obj in scene.objects]
    background = np.zeros_like(scene.mask)
    ys, xs = np.nonzero(~masks.any(axis=0))
    background[ys[:50], xs[:50]] = True
    empty = np.zeros_like(scene.mask)
    records = [
        _record(with_target, 0, masks[target], [nouns[target].upper()]),  # hit, target named right
        _record(with_target, 1, masks[target], ["zebra"]),  # hit, target named wrong
        _record(with_target, 2, masks[other], [nouns[other]]),  # miss, another object named right
        _record(with_target, 3, masks[other], ["zebra"]),  # miss, another object named wrong
        _record(with_target, 4, background, ["cup"]),  # miss, no object
        _record(with_target, 5, empty, []),  # empty
        _record(with_target, 6, masks[other] | background, ["a", "b"]),  # miss; two objects: no grounding
    ]
    no_target_scene = sample(STREAM, without, BENCHMARK_CONFIG)
    records += [_record(without, 0, np.zeros_like(no_target_scene.mask), []),  # rejected
                _record(without, 1, no_target_scene.instance_masks[0], [no_target_scene.objects[0].noun]),
                _record(without, 2, np.zeros_like(no_target_scene.mask), [], n_valid=0),  # failed, not rejected
                _record(with_target, 7, empty, [], n_valid=0)]  # failed, not empty
    rows = {row.category: row for row in breakdown({"meta": META, "samples": records})}

    assert {name: rows[name].queries for name in rows} == {
        "failed": 2, "rejected": 1, "false positive": 1, "empty": 1, "miss": 4, "partial": 0, "hit": 2,
        "target, named right": 1, "target, named wrong": 1, "another object, named right": 2,
        "another object, named wrong": 1, "no object": 1}
    assert rows["hit"].share == pytest.approx(2 / 11)
    # the failed query with a target scored 0, the failed "no target" one 1.0
    assert rows["failed"].giou_lost == pytest.approx(1 / 11)
    assert rows["another object, named right"].share == pytest.approx(2 / 6)  # six one-object answers
    assert rows["miss"].giou_lost == pytest.approx(4 / 11)  # the other object and the background: IoU 0
    assert rows["hit"].giou_lost == pytest.approx((1 - records[0]["iou"]) * 2 / 11)
    assert records[0]["iou"] == 1.0 and rows["target, named right"].giou_lost == 0.0


def test_reports_of_other_data_or_other_scenes_are_refused():
    index = _first(lambda s: True)
    record = _record(index, 0, np.zeros_like(sample(STREAM, index, BENCHMARK_CONFIG).mask), [])
    with pytest.raises(InvalidInputError, match="synthetic split"):
        breakdown({"meta": {"data": "reasonseg/val"}, "samples": [record]})
    with pytest.raises(InvalidInputError, match="^record .* not the scenes this report scored$"):
        breakdown({"meta": {"synthetic": {"split": "test", "seed": 0}}, "samples": [record]})
    for field in ("n_samples", "n_valid", "iou"):  # read for every record, "rejected" ones included
        partial = {key: value for key, value in record.items() if key != field}
        with pytest.raises(InvalidInputError, match=f"^not a `star-edge eval --json` report: KeyError\\('{field}'\\)"):
            breakdown({"meta": META, "samples": [partial]})


def test_a_synthetic_eval_report_names_its_split_and_loses_exactly_its_missing_giou(tmp_path, capsys):
    bundle = tmp_path / "bundle"
    answer = ('<think>A cup.</think><answer>[{"bbox_2d": [300, 300, 700, 700], "point_2d": [500, 500], '
              '"label": "cup"}]</answer>')
    make_tiny_bundle(bundle, seed=0, family="qwen3_vl", scripted_answers=[answer])
    report_path = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["eval", "--synthetic", "--split", "val", "--count", "3", "--bundle",
                                      str(bundle), "--json", str(report_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["meta"]["synthetic"] == {"split": "val", "seed": 0, "count": 3}
    assert report["meta"]["data"] == "synthetic val split, seed 0, 3 samples"

    main([str(report_path), "--json", str(tmp_path / "rows.json")])
    assert "one-object answers" in capsys.readouterr().out
    rows = json.loads((tmp_path / "rows.json").read_text())
    outcomes = [row for row in rows if row["category"] in ("failed", "rejected", "false positive", "empty",
                                                           "miss", "partial", "hit")]
    assert sum(row["queries"] for row in outcomes) == 3
    assert sum(row["giou_lost"] for row in outcomes) == pytest.approx(1 - report["summary"]["giou"])
