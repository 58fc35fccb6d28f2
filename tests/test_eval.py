"""Evaluation: gIoU / cIoU against hand-computed cases, the per-sample bookkeeping with known
predictions, shard merging as a data-parallel run does it, and `star-edge eval` end to end on a
tiny bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as coco_mask
from typer.testing import CliRunner

from star_edge.cli import app
from star_edge.export.tiny import make_tiny_bundle
from star_edge.result import Result, Sample
from star_edge.train.data.reasonseg import ReasonSegFolder
from star_edge.train.data.sample import SegSample
from star_edge.train.data.synthetic import SyntheticConfig, write_split
from star_edge.train.eval import Processes, build_report, evaluate, merge_reports, run
from star_edge.train.metrics import aggregate, intersection_union, iou, summarize


def _mask(shape, *boxes):
    out = np.zeros(shape, dtype=bool)
    for x1, y1, x2, y2 in boxes:
        out[y1:y2, x1:x2] = True
    return out


def test_intersection_and_union_leave_the_ignore_region_out():
    prediction = _mask((10, 10), (0, 0, 6, 4))          # 24 pixels
    target = _mask((10, 10), (3, 0, 9, 4))              # 24 pixels, 12 shared
    assert intersection_union(prediction, target) == (12, 36)
    ignore = _mask((10, 10), (0, 0, 2, 10))             # hides 8 predicted pixels
    assert intersection_union(prediction, target, ignore) == (12, 28)
    ignore_shared = _mask((10, 10), (4, 0, 5, 10))      # hides 4 shared pixels
    assert intersection_union(prediction, target, ignore_shared) == (8, 32)
    assert intersection_union(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == (0, 0)
    with pytest.raises(ValueError, match="differ in shape"):
        intersection_union(np.zeros((3, 3), bool), np.zeros((3, 4), bool))


def test_giou_and_ciou_by_hand():
    records = [
        {"intersection": 12, "union": 36, "reasoning_type": "spatial", "depth": 1},   # 1/3
        {"intersection": 0, "union": 0, "reasoning_type": "spatial", "depth": 2},     # empty union: 1.0
        {"intersection": 30, "union": 40, "reasoning_type": "multi", "depth": 2},     # 0.75
        {"intersection": 0, "union": 24, "reasoning_type": None, "depth": None},      # 0.0
    ]
    assert iou(0, 0) == 1.0 and iou(1, 4) == 0.25
    overall = aggregate(records)
    assert overall["count"] == 4
    assert overall["giou"] == pytest.approx((1 / 3 + 1.0 + 0.75 + 0.0) / 4)
    assert overall["ciou"] == pytest.approx((12 + 0 + 30 + 0) / (36 + 0 + 40 + 24))
    summary = summarize(records)
    assert list(summary["per_type"]) == ["multi", "spatial"] and list(summary["per_depth"]) == ["1", "2"]
    assert summary["per_type"]["spatial"] == {"count": 2, "giou": pytest.approx((1 / 3 + 1) / 2),
                                              "ciou": pytest.approx(12 / 36)}
    assert summary["per_depth"]["2"] == {"count": 2, "giou": pytest.approx(0.875), "ciou": pytest.approx(0.75)}
    assert aggregate([]) == {"count": 0, "giou": None, "ciou": None}
    assert aggregate([{"intersection": 0, "union": 0}])["ciou"] == 1.0


class _KnownSegmenter:
    """Answers each query with a fixed mask: the mask registered for it."""

    def __init__(self, answers: dict[str, np.ndarray]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, int, int | None]] = []

    def segment(self, image, query, samples=1, seed=None):
        self.calls.append((query, samples, seed))
        ok = Sample(text="<answer>[]</answer>", answer=None, error="scripted")
        return Result(query=query, image=image, objects=[], mask=self.answers[query], samples=[ok] * samples,
                      timings={"total": 1.0})


def _dataset():
    shape = (8, 10)
    image = np.zeros((*shape, 3), dtype=np.uint8)
    return [
        SegSample("a", image, ("qa1", "qa2"), False, _mask(shape, (0, 0, 4, 4)), _mask(shape, (8, 0, 10, 8)),
                  "attribute", 1),
        SegSample("b", image, ("qb",), True, np.zeros(shape, bool), np.zeros(shape, bool), "multi", 3),
        SegSample("c", image, ("qc",), False, _mask(shape, (2, 2, 6, 6)), np.zeros(shape, bool), "multi", 2),
    ], {
        "qa1": _mask(shape, (2, 0, 10, 4)),   # 32 pixels, 8 of them in ignore; 8 on the target
        "qa2": _mask(shape, (0, 0, 4, 4)),    # exact
        "qb": np.zeros(shape, bool),          # nothing asked, nothing predicted
        "qc": _mask(shape, (0, 0, 1, 1)),     # a miss
    }


def test_records_count_every_query_and_n_with_hand_computed_numbers():
    dataset, answers = _dataset()
    segmenter = _KnownSegmenter(answers)
    records, worst = evaluate(segmenter, dataset, samples=(1, 4), worst=2, all_queries=True)
    assert [(r["image_id"], r["query_index"], r["n_samples"]) for r in records] == [
        ("a", 0, 1), ("a", 0, 4), ("a", 1, 1), ("a", 1, 4), ("b", 0, 1), ("b", 0, 4), ("c", 0, 1), ("c", 0, 4)]
    assert [call[2] for call in segmenter.calls[::2]] == [0, 1, 1000, 2000], "seed = 1000 * image + query"
    by_query = {r["query"]: r for r in records if r["n_samples"] == 1}
    assert (by_query["qa1"]["intersection"], by_query["qa1"]["union"]) == (8, 16 + 24 - 8)
    assert by_query["qa1"]["pred_area"] == 24 and by_query["qa1"]["target_area"] == 16
    assert (by_query["qa2"]["intersection"], by_query["qa2"]["union"], by_query["qa2"]["iou"]) == (16, 16, 1.0)
    assert (by_query["qb"]["union"], by_query["qb"]["iou"]) == (0, 1.0)
    assert (by_query["qc"]["intersection"], by_query["qc"]["union"], by_query["qc"]["iou"]) == (0, 17, 0.0)
    assert by_query["qa1"]["n_valid"] == 0 and by_query["qa1"]["reasoning_type"] == "attribute"
    assert [case.record["query"] for case in worst] == ["qc", "qa1"], "lowest IoU first, largest N only"
    assert all(case.record["n_samples"] == 4 for case in worst)
    report = build_report(records, {"data": "hand"})
    assert report["summary"] is report["summary_by_samples"]["4"]
    assert report["summary"]["giou"] == pytest.approx((8 / 32 + 1 + 1 + 0) / 4)
    assert report["summary"]["ciou"] == pytest.approx((8 + 16 + 0 + 0) / (32 + 16 + 0 + 17))
    assert report["summary"]["per_type"]["multi"]["count"] == 2
    assert report["summary"]["per_depth"]["3"]["giou"] == 1.0
    assert report["summary"]["timings_ms"]["total"] == 1.0
    assert len(json.loads(json.dumps(report))["samples"]) == 8


def test_an_image_is_scored_on_its_first_query_unless_all_are_asked_for():
    dataset, answers = _dataset()
    segmenter = _KnownSegmenter(answers)
    records, _ = evaluate(segmenter, dataset)
    assert [r["query"] for r in records] == ["qa1", "qb", "qc"], "LISA scores an image's first query only"
    report = run(_KnownSegmenter(answers), dataset, {"data": "hand"})
    assert report["meta"]["queries"] == "first" and report["summary"]["count"] == 3
    report = run(_KnownSegmenter(answers), dataset, {"data": "hand"}, all_queries=True)
    assert report["meta"]["queries"] == "all" and report["summary"]["count"] == 4


def test_sharded_runs_merge_into_the_single_process_report(tmp_path):
    dataset, answers = _dataset()
    single = run(_KnownSegmenter(answers), dataset, {"data": "hand"}, samples=(1, 2), json_path=tmp_path / "one.json",
                 plots=tmp_path / "one", worst=2, all_queries=True)
    path = tmp_path / "sharded.json"
    barrier_calls = []
    for index in (1, 0):  # the main process merges after the barrier, so it runs last here
        procs = Processes(index, 2, index, lambda: barrier_calls.append(index))
        result = run(_KnownSegmenter(answers), dataset, {"data": "hand"}, samples=(1, 2), json_path=path,
                     plots=tmp_path / "sharded", worst=2, procs=procs, all_queries=True)
        assert (result is None) == (index == 1)
    merged = json.loads(path.read_text())
    assert barrier_calls == [1, 0] and not list(tmp_path.glob("sharded.json.shard*"))
    overlays = lambda name: sorted(p.name for p in (tmp_path / name / "worst").glob("*.png"))  # noqa: E731
    assert len(overlays("one")) == 2 and overlays("sharded") == overlays("one"), "the worst of all shards"
    strip = lambda records: [{k: v for k, v in r.items() if k != "timings_ms"} for r in records]  # noqa: E731
    assert strip(merged["samples"]) == strip(single["samples"])
    assert merged["summary"]["giou"] == single["summary"]["giou"]
    assert merged["summary"]["ciou"] == single["summary"]["ciou"]
    assert merged["meta"]["processes"] == 2 and merged["meta"]["images"] == 3


def test_merge_refuses_overlapping_or_mismatched_shards(tmp_path):
    dataset, answers = _dataset()
    report = run(_KnownSegmenter(answers), dataset, {"data": "hand"}, samples=(1,), json_path=tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps(report))
    with pytest.raises(Exception, match="overlap"):
        merge_reports([tmp_path / "a.json", tmp_path / "b.json"])
    other = dict(report, meta={**report["meta"], "samples": [8]}, samples=[])
    (tmp_path / "c.json").write_text(json.dumps(other))
    with pytest.raises(Exception, match="evaluated N"):
        merge_reports([tmp_path / "a.json", tmp_path / "c.json"])


ANSWER = ('<think>The cup holds coffee.</think><answer>[{"bbox_2d": [30, 40, 190, 200], '
          '"point_2d": [110, 120], "label": "cup"}]</answer>')
NOTHING = "<think>Nothing fits.</think><answer>[]</answer>"


def test_cli_eval_end_to_end_on_a_tiny_bundle(tmp_path):
    bundle = tmp_path / "bundle"
    make_tiny_bundle(bundle, seed=0, family="qwen2_5_vl", scripted_answers=[ANSWER, NOTHING])
    write_split(tmp_path / "data", seed=0, split="test", count=3, config=SyntheticConfig(size_range=(96, 128)))
    report_path, plots = tmp_path / "report.json", tmp_path / "plots"
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "data" / "test"), "--bundle", str(bundle),
                                      "--samples", "1,2", "--limit", "2", "--json", str(report_path),
                                      "--plots", str(plots), "--worst", "2"])
    assert result.exit_code == 0, result.output
    assert "gIoU" in result.output
    report = json.loads(report_path.read_text())
    assert set(report) == {"meta", "samples", "summary", "summary_by_samples"}
    assert {"giou", "ciou", "per_type", "per_depth"} <= set(report["summary"])
    assert report["meta"]["samples"] == [1, 2] and report["meta"]["images"] == 2
    assert len(report["samples"]) == 4 and set(report["summary_by_samples"]) == {"1", "2"}
    folder = ReasonSegFolder(tmp_path / "data" / "test")
    greedy = [r for r in report["samples"] if r["n_samples"] == 1]
    for record in report["samples"]:
        item = folder[record["index"]]
        rle = dict(record["pred_mask"], counts=record["pred_mask"]["counts"].encode())
        predicted = coco_mask.decode(rle).astype(bool)
        assert (record["intersection"], record["union"]) == intersection_union(predicted, item.mask, item.ignore)
        assert record["reasoning_type"] == item.reasoning_type and record["depth"] == item.depth
        assert {"intersection", "union", "iou", "n_valid", "timings_ms"} <= set(record)
    assert all(r["labels"] == ["cup"] for r in greedy), "greedy decoding gives the first scripted answer"
    assert (plots / "giou_per_type.png").is_file() and (plots / "giou_vs_samples.png").is_file()
    assert len(list((plots / "worst").glob("*.png"))) == 2


def test_cli_eval_reports_bad_arguments_on_one_line(tmp_path):
    runner = CliRunner()
    bad = runner.invoke(app, ["eval", "--synthetic", "--samples", "1,x"])
    assert bad.exit_code == 2 and "--samples must be integers" in bad.output
    too_many = runner.invoke(app, ["eval", "--synthetic", "--samples", "1,65"])
    assert too_many.exit_code == 2 and "samples must be in [1, 64]" in too_many.output
    wrong_split = runner.invoke(app, ["eval", "--synthetic", "--split", "dev"])
    assert wrong_split.exit_code == 2 and "needs a split in train, val, test" in wrong_split.output
    write_split(tmp_path / "data", seed=0, split="val", count=1, config=SyntheticConfig(size_range=(64, 64)))
    split_of_a_folder = runner.invoke(app, ["eval", str(tmp_path / "data" / "val"), "--split", "val"])
    assert split_of_a_folder.exit_code == 2 and "is a ReasonSeg folder, which has no splits" in split_of_a_folder.output
    missing = runner.invoke(app, ["eval", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "data folder not found" in missing.output
    neither = runner.invoke(app, ["eval"])
    assert neither.exit_code == 2 and "give a data folder" in neither.output


def _report(ious: dict[tuple[int, int], float]) -> dict:
    return {"samples": [{"index": i, "query_index": 0, "n_samples": n, "iou": value}
                        for (i, n), value in ious.items()]}


def test_paired_differences_match_scipys_paired_t_test(tmp_path, capsys):
    from scipy import stats

    from star_edge.train.compare_reports import main, paired_differences

    generator = np.random.default_rng(0)
    before = {(i, n): float(generator.uniform()) for i in range(40) for n in (1, 8)}
    after = {key: min(1.0, value + float(generator.normal(0.05, 0.1))) for key, value in before.items()}
    del after[(3, 8)]  # a query scored in one report only is left out
    rows = paired_differences(_report(before), _report(after))
    assert [(row.samples, row.queries) for row in rows] == [(1, 40), (8, 39)]
    for row in rows:
        keys = [(i, row.samples) for i in range(40) if (i, row.samples) in after]
        a, b = np.array([before[k] for k in keys]), np.array([after[k] for k in keys])
        t = stats.ttest_rel(b, a).statistic
        assert row.difference / row.standard_error == pytest.approx(t, rel=1e-9)
        assert (row.before, row.after) == (pytest.approx(a.mean()), pytest.approx(b.mean()))
    paths = [tmp_path / "before.json", tmp_path / "after.json"]
    for path, ious in zip(paths, (before, after)):
        path.write_text(json.dumps(_report(ious)))
    main([str(paths[0]), str(paths[1]), "--json", str(tmp_path / "rows.json")])
    assert "N = 8: 39 queries" in capsys.readouterr().out
    assert json.loads((tmp_path / "rows.json").read_text())[0]["queries"] == 40


def test_paired_differences_name_what_is_wrong():
    from star_edge.errors import InvalidInputError
    from star_edge.train.compare_reports import paired_differences

    with pytest.raises(InvalidInputError, match="second report"):
        paired_differences(_report({(0, 1): 0.5, (1, 1): 0.2}), {"summary": {}})
    with pytest.raises(InvalidInputError, match="share 0 scored queries"):
        paired_differences(_report({(0, 1): 0.5, (1, 1): 0.2}), _report({(5, 1): 0.5, (6, 1): 0.2}))
    with pytest.raises(InvalidInputError, match="share 2 scored queries, not two of the same N"):
        paired_differences(_report({(0, 1): 0.5, (1, 8): 0.2}), _report({(0, 1): 0.4, (1, 8): 0.3}))
    val, test = _report({(0, 1): 0.5, (1, 1): 0.2}), _report({(0, 1): 0.4, (1, 1): 0.3})
    for report, stream in ((val, 1), (test, 2)):
        for record in report["samples"]:
            record["image_id"] = f"synth-s{stream}-{record['index']:07d}"
    with pytest.raises(InvalidInputError, match="different images at index 0"):
        paired_differences(val, test)
