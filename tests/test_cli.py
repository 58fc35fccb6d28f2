"""The command line: output files, one-line errors with exit status 2, no heavy imports for --help."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from star_edge.cli import app
from star_edge.export.tiny import make_tiny_bundle

ANSWER = ('<think>It holds coffee.</think><answer>[{"bbox_2d": [30, 40, 190, 200], '
          '"point_2d": [110, 120], "label": "cup"}]</answer>')


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "bundle"
    make_tiny_bundle(path, seed=0, family="qwen2_5_vl", scripted_answers=[ANSWER])
    return path


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(path)
    return path


def _run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_segment_writes_json_and_overlay(bundle, photo, tmp_path):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    result = _run("segment", photo, "what holds coffee?", "--samples", "1", "--bundle", bundle,
                  "--json", out_json, "--out", out_png)
    assert result.exit_code == 0, result.output
    assert "cup" in result.output and "1/1 parsed" in result.output
    payload = json.loads(out_json.read_text())
    assert payload["objects"][0]["label"] == "cup" and payload["image_size"] == [160, 120]
    assert Image.open(out_png).size == (160, 120)


def test_info_shows_the_manifest(bundle):
    result = _run("info", "--bundle", bundle)
    assert result.exit_code == 0, result.output
    assert "qwen2_5_vl" in result.output and "sha256 verified" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["segment", "{tmp}/missing.jpg", "cup"], "image file not found"),
        (["segment", "{photo}", "   "], "query is empty"),
        (["segment", "{photo}", "cup", "--samples", "0"], "samples must be in"),
        (["segment", "{photo}", "cup", "--backend", "jax"], "backend must be"),
        (["segment", "{photo}", "cup", "--device", "tpu"], "device must be"),
        (["segment", "{photo}", "cup", "--bundle", "{tmp}"], "manifest missing"),
        (["segment", "{tmp}", "cup"], "directory"),
        (["info", "--bundle", "{tmp}/nowhere"], "bundle folder not found"),
    ],
)
def test_errors_are_one_line_with_exit_status_2(bundle, photo, tmp_path, args, message):
    filled = [a.format(tmp=tmp_path, photo=photo) for a in args]
    if filled[0] == "segment" and "--bundle" not in filled:
        filled += ["--bundle", str(bundle)]
    result = _run(*filled)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_debug_shows_the_traceback(bundle, photo):
    result = _run("segment", photo, "", "--bundle", bundle, "--debug")
    assert result.exit_code != 0 and result.exception is not None


@pytest.mark.parametrize(
    "args, message",
    [
        (["segment", "photo.png"], r"^error: Missing argument 'query'\. \(see '.*star_edge segment --help'\)$"),
        (["segment", "photo.png", "cup", "-n", "many"], r"^error: Invalid value for '--samples' / '-n': "),
        (["segment", "photo.png", "cup", "--colour"], r"^error: No such option: --colour"),
        (["sgement"], r"^error: No such command 'sgement'"),
    ],
)
def test_usage_mistakes_are_one_line_with_exit_status_2(args, message):
    completed = subprocess.run([sys.executable, "-m", "star_edge", *args], capture_output=True, text=True,
                               timeout=120)
    assert completed.returncode == 2, completed.stderr
    lines = completed.stderr.splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), completed.stderr
    assert completed.stdout == ""


def test_help_works_without_loading_torch():
    script = ("import sys\nfrom star_edge.cli import main\nsys.argv = ['star-edge', '--help']\n"
              "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0\n"
              "assert 'torch' not in sys.modules and 'numba' not in sys.modules\n")
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert "segment" in completed.stdout
