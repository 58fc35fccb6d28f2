"""The synthetic benchmark: deterministic per (seed, index), the documented target conventions,
queries whose targets an independent reading of the scene confirms, the curriculum stages, and a
written split whose polygons rasterise back to the masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from star_edge.cli import app
from star_edge.train.data.reasonseg import ReasonSegFolder
from star_edge.train.data.synthetic import (
    BENCHMARK_CONFIG, SyntheticBenchmark, SyntheticConfig, answer_objects, sample, split_seed, write_split,
)
from star_edge.train.data.synthetic_catalogue import KINDS
from star_edge.train.data.synthetic_queries import FUNCTIONS

SMALL = SyntheticConfig(size_range=(96, 160))


@pytest.fixture(scope="module")
def stream():
    return [sample(7, i, SMALL) for i in range(120)]


def test_a_sample_depends_only_on_seed_index_and_config():
    first = sample(3, 41, SMALL)
    again = sample(3, 41, SMALL)
    assert first.query == again.query and first.trace == again.trace and first.image_id == again.image_id
    np.testing.assert_array_equal(first.image, again.image)
    np.testing.assert_array_equal(first.masks, again.masks)
    others = {sample(3, i, SMALL).query for i in range(40, 46)} | {sample(4, 41, SMALL).query}
    assert len(others) > 3


def test_targets_follow_the_documented_conventions(stream):
    low, high = SMALL.size_range
    for item in stream:
        height, width = item.image.shape[:2]
        assert item.image.dtype == np.uint8 and low <= width <= high and low <= height <= high
        n = len(item.target_ids)
        assert item.boxes.shape == (n, 4) and item.points.shape == (n, 2) and item.masks.shape == (n, height, width)
        np.testing.assert_array_equal(item.masks, item.instance_masks[list(item.target_ids)])
        assert item.labels == [item.objects[i].noun for i in item.target_ids]
        assert (item.instance_masks.sum(axis=0) <= 1).all(), "visible masks are disjoint"
        for mask, (x1, y1, x2, y2), (x, y) in zip(item.masks, item.boxes, item.points):
            rows, cols = np.nonzero(mask)
            assert (x1, y1, x2, y2) == (cols.min(), rows.min(), cols.max(), rows.max()), "inclusive box"
            assert mask[y, x], "the point lies in the visible mask"
        for obj, visible in zip(item.objects, item.instance_masks):
            assert obj.visible_area == visible.sum() >= max(0.4 * obj.area, 48)
        assert {(o.colour, o.noun) for o in item.objects}.__len__() == len(item.objects)
        np.testing.assert_array_equal(item.mask, item.masks.any(axis=0))
        assert answer_objects(item) == [
            {"bbox_2d": list(map(int, b)), "point_2d": list(map(int, p)), "label": label}
            for b, p, label in zip(item.boxes, item.points, item.labels)]


def test_traces_name_the_reasoning_without_repeating_a_sentence(stream):
    for item in stream:
        sentences = [s.strip() for s in item.trace.split(".") if s.strip()]
        assert sentences and len(sentences) == len(set(sentences)), item.trace
        for index in item.target_ids:
            assert item.objects[index].name in item.trace


def test_every_type_and_depth_and_no_target_queries_occur(stream):
    combos = {(item.reasoning_type, item.depth) for item in stream}
    assert combos >= {(t, d) for t in ("attribute", "spatial", "function", "multi") for d in (1, 2, 3)}
    empties = [item for item in stream if not item.target_ids]
    assert 0 < len(empties) < 0.3 * len(stream)
    for item in empties:
        assert not item.mask.any() and item.labels == [] and answer_objects(item) == []


def _independent_targets(item) -> tuple[int, ...] | None:
    """Targets re-derived from the scene for the query forms that read off one fact directly."""
    objects, query = item.objects, item.query
    for key, function in FUNCTIONS.items():
        if query in function.questions:
            return tuple(i for i, o in enumerate(objects) if key in KINDS[o.noun].affordances)
    words = query.split()
    if query.startswith("all the ") and query.endswith(" things") and len(words) == 4:
        return tuple(i for i, o in enumerate(objects) if o.colour == words[2])
    if query.startswith("every ") and len(words) == 2:
        return tuple(i for i, o in enumerate(objects) if o.noun == words[1])
    if item.reasoning_type == "attribute" and item.depth == 1 and query.startswith("the ") and "thing" not in query:
        named = [i for i, o in enumerate(objects) if f"the {o.colour} {o.noun}" == query]
        if "largest" not in query and "smallest" not in query:
            return tuple(named)
    if query in ("the largest object", "the smallest object"):
        areas = [o.area for o in objects]
        return (int(np.argmax(areas) if "largest" in query else np.argmin(areas)),)
    if query == "the leftmost object":
        return (int(np.argmin([o.centre[0] for o in objects])),)
    return None


def test_simple_queries_pick_the_targets_an_independent_reading_finds():
    checked = 0
    config = SyntheticConfig(size_range=(96, 128), depths=(1,))
    for index in range(150):
        item = sample(11, index, config)
        expected = _independent_targets(item)
        if expected is not None:
            assert item.target_ids == expected, (item.query, item.objects)
            checked += 1
    assert checked > 60


def test_spatial_relations_match_the_boxes():
    config = SyntheticConfig(size_range=(96, 128), reasoning_types=("spatial",), depths=(2,),
                             no_target_probability=0.0)
    tests = {"to the left of": lambda t, a: t[2] < a[0] and t[1] <= a[3] and a[1] <= t[3],
             "to the right of": lambda t, a: t[0] > a[2] and t[1] <= a[3] and a[1] <= t[3],
             "above": lambda t, a: t[3] < a[1] and t[0] <= a[2] and a[0] <= t[2],
             "below": lambda t, a: t[1] > a[3] and t[0] <= a[2] and a[0] <= t[2]}
    for index in range(30):
        item = sample(5, index, config)
        relation = next(r for r in tests if item.query.startswith(f"what is {r} "))
        anchor_name = item.trace.split(f" {relation} the ")[-1].rstrip(".")
        anchor = next(i for i, o in enumerate(item.objects) if o.name == anchor_name)
        expected = tuple(i for i, o in enumerate(item.objects)
                         if i != anchor and tests[relation](o.box, item.objects[anchor].box))
        assert item.target_ids == expected, (item.query, item.trace)


def test_curriculum_stages():
    single = [sample(2, i, SyntheticConfig(size_range=(96, 96), stage="single", no_target_probability=0))
              for i in range(10)]
    for item in single:
        name = item.objects[item.target_ids[0]].name
        assert item.reasoning_type == "single" and len(item.target_ids) == 1 and name in item.query
    dense = [sample(2, i, SyntheticConfig(size_range=(96, 96), stage="dense")) for i in range(10)]
    for item in dense:
        assert item.target_ids == tuple(range(len(item.objects))) and item.reasoning_type == "dense"
    mixed = {sample(2, i, SyntheticConfig(size_range=(96, 96), stage="mixed")).reasoning_type
             for i in range(40)}
    assert {"single", "dense"} <= mixed and mixed & {"attribute", "spatial", "function", "multi"}
    nothing = sample(2, 0, SyntheticConfig(size_range=(96, 96), no_target_probability=1.0))
    assert nothing.target_ids == ()


def test_restricted_types_and_depths_and_bad_configs():
    config = SyntheticConfig(size_range=(96, 128), reasoning_types=("multi",), depths=(3,))
    assert {(sample(1, i, config).reasoning_type, sample(1, i, config).depth) for i in range(5)} == {("multi", 3)}
    for bad in ({"stage": "other"}, {"depths": (4,)}, {"reasoning_types": ("magic",)},
                {"size_range": (300, 200)}, {"objects": (0, 3)}, {"no_target_probability": 2.0}):
        with pytest.raises(ValueError):
            SyntheticConfig(**bad)


def test_splits_use_disjoint_seeds():
    streams = {split_seed(seed, split) for seed in range(50) for split in ("train", "val", "test")}
    assert len(streams) == 150
    bench = SyntheticBenchmark(seed=2, count=3)
    assert len(bench) == 3 and bench[1].image_id == sample(split_seed(2, "test"), 1, BENCHMARK_CONFIG).image_id
    assert bench[0].queries and bench[0].mask.shape == bench[0].image.shape[:2] and not bench[0].ignore.any()


def test_written_split_rasterises_back_to_the_masks(tmp_path):
    write_split(tmp_path, seed=4, split="val", count=12, config=SMALL)
    folder = ReasonSegFolder(tmp_path / "val")
    assert len(folder) == 12
    for index, loaded in enumerate(folder):
        item = sample(split_seed(4, "val"), index, SMALL)
        assert loaded.image_id == item.image_id and loaded.queries == (item.query,)
        assert (loaded.reasoning_type, loaded.depth) == (item.reasoning_type, item.depth)
        union = (loaded.mask | item.mask).sum()
        assert union == 0 or (loaded.mask & item.mask).sum() / union >= 0.98
        np.testing.assert_array_equal(loaded.mask, item.mask)  # in fact exact
        record = json.loads((tmp_path / "val" / f"{item.image_id}.json").read_text())
        assert record["labels"] == item.labels and record["trace"] == item.trace
        assert {s["group_id"] for s in record["shapes"]} <= set(range(len(item.labels)))


def test_cli_writes_the_three_splits(tmp_path):
    result = CliRunner().invoke(app, ["data", "synth", "--out", str(tmp_path), "--seed", "1", "--count", "3",
                                      "--val-count", "2", "--test-count", "0", "--max-size", "128",
                                      "--min-size", "96"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "train").glob("*.json"))) == 3
    assert len(list((tmp_path / "val").glob("*.jpg"))) == 2 and not (tmp_path / "test").exists()
    bad = CliRunner().invoke(app, ["data", "synth", "--out", str(tmp_path), "--stage", "nope"])
    assert bad.exit_code == 2 and "stage must be one of" in bad.output
