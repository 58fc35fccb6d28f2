"""`star-edge bench` and star_edge/bench.py on a tiny bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from star_edge.bench import STAGES, _stage_ms, bench_image, parse_sample_counts, run_bench
from star_edge.cli import app
from star_edge.errors import InvalidInputError
from star_edge.export.tiny import make_tiny_bundle
from star_edge.segmenter import Segmenter

ANSWER = ('<think>Red.</think><answer>[{"bbox_2d": [100, 200, 400, 500], "point_2d": [250, 350], '
          '"label": "red circle"}]</answer>')


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bundle"
    make_tiny_bundle(path, seed=0, family="qwen3_vl", scripted_answers=[ANSWER])
    return path


def test_run_bench_reports_every_stage_per_sample_count(bundle):
    with Segmenter.from_pretrained(bundle) as segmenter:
        rows = run_bench(segmenter, bench_image(), samples=[1, 2], repeat=2)
        # every timed call encodes the image afresh: 1 warm-up miss, then 2 x 2 timed misses
        assert (segmenter.mask_decoder.cache.misses, segmenter.mask_decoder.cache.hits) == (5, 1)
    assert [row.samples for row in rows] == [1, 2] and all(row.repeat == 2 for row in rows)
    for row in rows:
        assert set(row.p50) == set(row.p95) == set(STAGES)
        assert all(0.0 <= row.p50[stage] <= row.p95[stage] for stage in STAGES)
        assert row.p50["total"] >= row.p50["decode"]
        assert row.samples_used == row.samples and row.parsed == row.samples
        assert json.loads(json.dumps(row.to_json()))["p95_ms"] == row.p95
        assert row.p50["sam_encode"] > 0.1  # the encoder ran, not a cache lookup


def test_other_is_what_the_total_holds_outside_the_stages():
    timings = {"preprocess": 1.0, "vision": 2.0, "prefill": 3.0, "decode": 4.0, "sam_encode": 5.0,
               "sam_decode": 6.0, "vote": 7.0, "generate": 9.0, "total": 30.0}
    assert _stage_ms(timings, "other") == pytest.approx(2.0)  # "generate" sums stages already counted
    assert _stage_ms(timings, "total") == 30.0 and _stage_ms({"total": 1.0}, "vote") == 0.0


def test_bench_command_prints_the_table_and_writes_json(bundle, tmp_path):
    image = tmp_path / "scene.png"
    Image.fromarray(bench_image(160, 120)).save(image)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--bundle", str(bundle), "--samples", "1,4", "--repeat", "2",
                                      "--image", str(image), "--json", str(out), "--adaptive"])
    assert result.exit_code == 0, result.output
    assert "p50 / p95" in result.output and "N=4" in result.output
    assert all(stage in result.output for stage in STAGES)
    payload = json.loads(out.read_text())
    assert payload["image_size"] == [160, 120] and payload["adaptive"] is True and payload["backend"] == "torch"
    assert [row["samples"] for row in payload["rows"]] == [1, 4]
    assert set(payload["rows"][1]["p50_ms"]) == set(STAGES)
    assert "p95 of fewer than 20 calls is close to the slowest" in " ".join(result.output.split())
    assert payload["sam_embedding_cache"] == "emptied before every timed call" and payload["warmup_calls"] == 1
    machine = payload["machine"]
    assert machine["device_name"] == "cpu" and machine["torch_threads"] >= 1 and machine["torch"]
    assert machine["star_edge"] and machine["cpu_count"] >= 1


def test_bench_takes_the_backend_and_names_it(bundle, tmp_path):
    """A bundle with ONNX graphs: "auto" times them on the CPU, --backend torch the torch models."""
    from star_edge.export.bundle_export import export_bundle

    exported = export_bundle(bundle, tmp_path / "exported", onnx=True).root
    for flags, expected in (([], "onnx"), (["--backend", "torch"], "torch")):
        out = tmp_path / f"{expected}.json"
        result = CliRunner().invoke(app, ["bench", "--bundle", str(exported), "--samples", "1", "--repeat", "1",
                                          "--json", str(out), *flags])
        assert result.exit_code == 0, result.output
        assert f"backend {expected}, device cpu" in result.output and json.loads(out.read_text())["backend"] == expected


def test_bad_sample_lists_are_refused(bundle):
    assert parse_sample_counts("1, 2,8") == [1, 2, 8]
    for text in ("", "a,b", "0,4", "65", "1,,2", "2,"):
        with pytest.raises(InvalidInputError):
            parse_sample_counts(text)
    result = CliRunner().invoke(app, ["bench", "--bundle", str(bundle), "--samples", "two"])
    assert result.exit_code == 2 and "--samples" in result.stderr
    result = CliRunner().invoke(app, ["bench", "--bundle", "/no/such/bundle", "--repeat", "0"])
    assert result.exit_code == 2 and "repeat must be a positive integer" in result.stderr  # before loading
    with Segmenter.from_pretrained(bundle) as segmenter:
        with pytest.raises(InvalidInputError, match="repeat"):
            run_bench(segmenter, np.zeros((8, 8, 3), np.uint8), repeat=0)
