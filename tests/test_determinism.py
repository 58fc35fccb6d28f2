"""Same seed, same result: across processes (a fresh interpreter, with another hash seed, making its
first calls, against this one's later calls), and across SAM backends (torch and onnxruntime; slow:
the ONNX export takes a while).

Results are compared as `Result.to_json()` without timings, plus the exact float scores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from star_edge.export.tiny import make_tiny_bundle
from star_edge.result import Result
from star_edge.segmenter import Segmenter

ONE_MUG = ('<think>A mug holds drinks.</think><answer>[{"bbox_2d": [40, 60, 150, 180], '
           '"point_2d": [95, 120], "label": "mug"}]</answer>')
TWO_CUPS = ('<think>Both cups hold drinks.</think><answer>[{"bbox_2d": [40, 60, 150, 180], '
            '"point_2d": [95, 120], "label": "mug"}, {"bbox_2d": [160, 20, 220, 90], '
            '"point_2d": [190, 55], "label": "cup"}]</answer>')
BROKEN = '<think>Hmm.</think><answer>[{"bbox_2d": [1, 2'
NOTHING = "<think>Nothing here holds a drink.</think><answer>[]</answer>"
JOBS = [  # (samples, seed, adaptive)
    (1, None, False),
    (4, 0, False),
    (8, 7, False),
    (8, 3, True),
]
IMAGE_SEED = 5


def scene() -> np.ndarray:
    """(150, 220, 3) uint8: noise under two flat shapes, the same in every process."""
    pixels = np.random.default_rng(IMAGE_SEED).integers(0, 256, (150, 220, 3), dtype=np.uint8)
    pixels[60:140, 30:120] = (200, 40, 40)
    pixels[10:60, 150:210] = (40, 60, 200)
    return pixels


def fingerprint(result: Result) -> dict:
    """What a result says, timings left out, scores exact."""
    payload = result.to_json()
    payload.pop("timings_ms")
    payload["scores"] = [obj.score.hex() for obj in result.objects]
    return payload


RUN_JOBS = f"""
import json, sys
import numpy as np, torch
torch.set_num_threads(1)
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_determinism import run
from star_edge.segmenter import Segmenter
with Segmenter.from_pretrained(sys.argv[1]) as segmenter:
    print(json.dumps(run(segmenter)))
"""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("determinism") / "bundle"
    make_tiny_bundle(path, seed=1, family="qwen2_5_vl", scripted_answers=[ONE_MUG, TWO_CUPS, BROKEN, NOTHING])
    return path


def run(segmenter: Segmenter) -> list[dict]:
    """The fingerprints of JOBS, each call encoding the image afresh (no embedding from the cache)."""
    fingerprints = []
    for samples, seed, adaptive in JOBS:
        segmenter.mask_decoder.cache.clear()
        result = segmenter.segment(scene(), "what could I drink from?", samples=samples, seed=seed, adaptive=adaptive)
        fingerprints.append(fingerprint(result))
    return fingerprints


def test_same_seed_same_result_across_processes(bundle_path):
    with Segmenter.from_pretrained(bundle_path) as segmenter:
        run(segmenter)  # this process has now voted (Numba kernels reset OpenMP's thread count)
        here = run(segmenter)
    completed = subprocess.run([sys.executable, "-c", RUN_JOBS, str(bundle_path)], capture_output=True,
                               text=True, timeout=300, env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert completed.returncode == 0, completed.stderr
    fresh = json.loads(completed.stdout)
    for job, a, b in zip(JOBS, here, fresh):
        assert a == b, f"job {job}: this process and a fresh one disagree"
    assert any(payload["objects"] for payload in here) and len({json.dumps(p) for p in here}) == len(JOBS)


def test_same_seed_same_result_on_a_fresh_segmenter(bundle_path):
    """No state carried between Segmenters (caches, RNG): a new one repeats an old one's results."""
    with Segmenter.from_pretrained(bundle_path) as first:
        before = run(first)
    with Segmenter.from_pretrained(bundle_path) as second:
        assert run(second) == before


@pytest.mark.slow
def test_same_seed_same_result_across_sam_backends(bundle_path, tmp_path):
    """The torch reasoner with the torch SAM or the onnxruntime SAM: the same samples, boxes, labels
    and votes; masks nearly equal (the graphs round differently); each backend repeats itself."""
    from star_edge.export.sam_onnx import export_sam_onnx
    from star_edge.sam.onnx_backend import OnnxMaskDecoder

    export_sam_onnx(bundle_path / "sam", tmp_path / "onnx", variants=("fp32",))
    with Segmenter.from_pretrained(bundle_path) as segmenter:
        on_torch = [segmenter.segment(scene(), "cup", samples=n, seed=s, adaptive=a) for n, s, a in JOBS]
        onnx_segmenter = Segmenter(segmenter.bundle, segmenter.reasoner,
                                   OnnxMaskDecoder.from_dir(tmp_path / "onnx", threads=1))
        on_onnx = [onnx_segmenter.segment(scene(), "cup", samples=n, seed=s, adaptive=a) for n, s, a in JOBS]
        again = [onnx_segmenter.segment(scene(), "cup", samples=n, seed=s, adaptive=a) for n, s, a in JOBS]
    assert [fingerprint(r) for r in again] == [fingerprint(r) for r in on_onnx]
    for a, b in zip(on_torch, on_onnx):
        assert [s.text for s in a.samples] == [s.text for s in b.samples]
        assert [(o.label, o.votes, o.box, o.point) for o in a.objects] == \
               [(o.label, o.votes, o.box, o.point) for o in b.objects]
        for x, y in zip(a.objects, b.objects):
            assert abs(x.score - y.score) < 1e-4
            union = np.logical_or(x.mask, y.mask).sum()
            assert union == 0 or np.logical_and(x.mask, y.mask).sum() / union >= 0.99
