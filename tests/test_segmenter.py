"""End to end on tiny bundles: the real model classes, a reasoner whose answers are scripted
(crafted weights, genuine `generate`), and a tiny random SAM."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from star_edge.answer import parse
from star_edge.bundle import load_bundle
from star_edge.errors import BackendUnavailableError, BundleError, InvalidInputError, StarEdgeError
from star_edge.export.tiny import make_tiny_bundle
from star_edge.segmenter import Segmenter, decode_distinct
from star_edge.vote import majority_vote

INPUT = 224  # the tiny Qwen2.5-VL's input size (pixel frame)
ONE_MUG = ('<think>A mug holds drinks.</think><answer>[{"bbox_2d": [40, 60, 150, 180], '
           '"point_2d": [95, 120], "label": "mug"}]</answer>')
TWO_CUPS = ('<think>Both cups hold drinks.</think><answer>[{"bbox_2d": [40, 60, 150, 180], '
            '"point_2d": [95, 120], "label": "mug"}, {"bbox_2d": [160, 20, 220, 90], '
            '"point_2d": [190, 55], "label": "cup"}]</answer>')
BROKEN = '<think>Hmm.</think><answer>[{"bbox_2d": [1, 2'
NOTHING = "<think>Nothing here holds a drink.</think><answer>[]</answer>"


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("scripted") / "bundle"
    make_tiny_bundle(path, seed=1, family="qwen2_5_vl",
                     scripted_answers=[ONE_MUG, TWO_CUPS, BROKEN, NOTHING])
    return path


@pytest.fixture(scope="module")
def segmenter(bundle_path):
    with Segmenter.from_pretrained(bundle_path) as seg:
        yield seg


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A non-square (H=200, W=300) image with a few flat shapes."""
    pixels = np.full((200, 300, 3), 235, dtype=np.uint8)
    pixels[80:170, 50:200] = (200, 40, 40)
    pixels[20:80, 210:290] = (40, 60, 200)
    return pixels


def _expected_box(box, image) -> tuple[int, ...]:
    """The reference mapping from the 224-px input frame: factor first, then int(v * f + 0.5)."""
    height, width = image.shape[:2]
    fx, fy = width / INPUT, height / INPUT
    x1, y1, x2, y2 = box
    return (int(x1 * fx + 0.5), int(y1 * fy + 0.5), int(x2 * fx + 0.5), int(y2 * fy + 0.5))


def test_greedy_answer_becomes_one_object_with_the_decoders_mask(segmenter, image):
    res = segmenter.segment(image, "what could I drink from?", samples=1)
    assert [s.text for s in res.samples] == [ONE_MUG]
    assert len(res.objects) == 1
    obj = res.objects[0]
    assert obj.box == _expected_box((40, 60, 150, 180), image)
    height, width = image.shape[:2]
    assert obj.point == (int(95 * width / INPUT + 0.5), int(120 * height / INPUT + 0.5))
    assert obj.label == "mug" and obj.votes == 1
    direct_masks, direct_scores = segmenter.mask_decoder.decode(
        segmenter.mask_decoder.embed(image), np.array([obj.box], float), np.array([obj.point], float))
    assert obj.mask.shape == (200, 300) and obj.mask.dtype == bool
    np.testing.assert_array_equal(obj.mask, direct_masks[0])
    assert obj.score == pytest.approx(float(direct_scores[0]), abs=1e-6)
    np.testing.assert_array_equal(res.mask, obj.mask)
    for stage in ("vision", "prefill", "decode", "sam_encode", "sam_decode", "vote", "total"):
        assert res.timings[stage] >= 0.0


def test_sampling_records_failures_and_votes_over_one_batched_sam_call(segmenter, image, monkeypatch):
    calls = []
    decode = segmenter.mask_decoder.decode

    def counting_decode(embedding, boxes, points, multimask=True):
        calls.append(len(boxes))
        return decode(embedding, boxes, points, multimask)

    monkeypatch.setattr(segmenter.mask_decoder, "decode", counting_decode)
    res = segmenter.segment(image, "what could I drink from?", samples=16, seed=3)
    texts = [s.text for s in res.samples]
    assert len(texts) == 16 and set(texts) <= {ONE_MUG, TWO_CUPS, BROKEN, NOTHING}
    assert len(set(texts)) >= 3, "sampling should draw several scripted answers"
    for sample in res.samples:
        assert sample.ok == (sample.text != BROKEN)
        assert (sample.error is None) == sample.ok
    valid = [s for s in res.samples if s.ok]
    assert res.objects, "this seed draws a majority for the mug"

    # The same vote computed from the public pieces, candidate by candidate.
    width_height = (image.shape[1], image.shape[0])
    answers = [parse(s.text, image_size=width_height, input_size=(INPUT, INPUT)) for s in valid]
    boxes = np.array([o.box for a in answers for o in a.objects], float)
    points = np.array([o.point for a in answers for o in a.objects], float)
    distinct = len(np.unique(np.hstack([boxes, points]), axis=0))
    assert distinct < len(boxes) and calls == [distinct], \
        "every distinct prompt of every sample goes through SAM once, all in one call"
    embedding = segmenter.mask_decoder.embed(image)
    masks, scores = zip(*(decode(embedding, boxes[i:i + 1], points[i:i + 1]) for i in range(len(boxes))))
    masks, scores = np.concatenate(masks), np.concatenate(scores)
    sample_ids = np.array([k for k, a in enumerate(answers) for _ in a.objects])
    labels = [o.label for a in answers for o in a.objects]
    expected = majority_vote(masks, scores, sample_ids, labels, len(answers),
                             [len(a.objects) for a in answers])
    assert [(o.label, o.votes) for o in res.objects] == [(o.label, o.votes) for o in expected]
    for got, want in zip(res.objects, expected):
        np.testing.assert_array_equal(got.mask, want.mask)
    union = np.zeros(image.shape[:2], bool)
    for obj in res.objects:
        union |= obj.mask
    np.testing.assert_array_equal(res.mask, union)


class _PromptEcho:
    """A stand-in SAM whose mask and score are functions of each prompt alone; records calls."""

    def __init__(self) -> None:
        self.calls: list[np.ndarray] = []

    def decode(self, embedding, boxes, points, multimask=True):
        self.calls.append(np.hstack([boxes, points]))
        masks = np.zeros((len(boxes), 4, 5), bool)
        for mask, (x1, _, _, _), (px, _) in zip(masks, boxes, points):
            mask.flat[int(x1 + px) % 20] = True
        return masks, (boxes[:, 0] + points[:, 1]).astype(np.float32)


def test_decode_distinct_decodes_each_new_prompt_once_and_copies_repeats():
    rng = np.random.default_rng(0)
    pool_boxes, pool_points = rng.integers(0, 9, (4, 4)).astype(float), rng.integers(0, 9, (4, 2)).astype(float)
    pick = rng.integers(0, 4, 13)
    boxes, points = pool_boxes[pick], pool_points[pick]
    direct_masks, direct_scores = _PromptEcho().decode(None, boxes, points)
    for done in (0, 5, 13):
        echo = _PromptEcho()
        masks, scores = decode_distinct(echo, None, boxes, points, direct_masks[:done], direct_scores[:done])
        np.testing.assert_array_equal(masks, direct_masks)
        np.testing.assert_array_equal(scores, direct_scores)
        decoded = np.concatenate(echo.calls) if echo.calls else np.zeros((0, 6))
        seen = {tuple(row) for row in np.hstack([boxes, points])[:done]}
        new = {tuple(row) for row in np.hstack([boxes, points])[done:]} - seen
        assert len(echo.calls) == (1 if new else 0) and sorted(map(tuple, decoded)) == sorted(new)


def test_seeded_sampling_is_reproducible(segmenter, image):
    first = segmenter.segment(image, "what could I drink from?", samples=8, seed=11).to_json()
    again = segmenter.segment(image, "what could I drink from?", samples=8, seed=11).to_json()
    first.pop("timings_ms"), again.pop("timings_ms")
    assert first == again
    others = {tuple(s.text for s in segmenter.segment(image, "cup", samples=8, seed=s).samples)
              for s in range(4)}
    assert len(others) > 1


def test_json_masks_are_pycocotools_rle(segmenter, image):
    res = segmenter.segment(image, "what could I drink from?", samples=1)
    payload = res.to_json()
    assert payload["image_size"] == [300, 200] and payload["query"] == "what could I drink from?"
    assert set(payload["objects"][0]) == {"label", "box", "point", "votes", "score", "area", "mask"}
    rle = dict(payload["objects"][0]["mask"])
    rle["counts"] = rle["counts"].encode()
    np.testing.assert_array_equal(coco_mask.decode(rle).astype(bool), res.objects[0].mask)
    union = dict(payload["mask"], counts=payload["mask"]["counts"].encode())
    np.testing.assert_array_equal(coco_mask.decode(union).astype(bool), res.mask)
    assert payload["samples"][0]["ok"] is True


def test_overlay_is_an_image_of_the_input_size(segmenter, image):
    picture = segmenter.segment(image, "what could I drink from?", samples=1).overlay()
    assert picture.size == (300, 200) and picture.mode == "RGB"
    assert not np.array_equal(np.asarray(picture), image)
    for alpha in (-0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(InvalidInputError, match="alpha must be a number in"):
            segmenter.segment(image, "what could I drink from?", samples=1).overlay(alpha)


def test_when_every_sample_fails_the_result_is_empty_and_says_why(tmp_path, image):
    path = tmp_path / "broken"
    make_tiny_bundle(path, seed=2, family="qwen2_5_vl", scripted_answers=[BROKEN])
    with Segmenter.from_pretrained(path) as seg:
        res = seg.segment(image, "anything", samples=4, seed=0)
    assert res.objects == [] and not res.mask.any() and res.mask.shape == (200, 300)
    assert all(not s.ok and s.error for s in res.samples)


def test_a_closed_segmenter_says_so(bundle_path, image):
    with Segmenter.from_pretrained(bundle_path) as seg:
        seg.segment(image, "a cup", samples=1)
    for adaptive in (False, True):
        with pytest.raises(StarEdgeError, match="this Segmenter is closed"):
            seg.segment(image, "a cup", samples=4, adaptive=adaptive)


def test_threads_sharing_a_segmenter_match_serial_calls(segmenter, image):
    seeds = list(range(4))
    serial = [segmenter.segment(image, "cup", samples=4, seed=s) for s in seeds]
    threaded: dict[int, object] = {}

    def run(seed: int) -> None:
        threaded[seed] = segmenter.segment(image, "cup", samples=4, seed=seed)

    workers = [threading.Thread(target=run, args=(s,)) for s in seeds]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert not any(worker.is_alive() for worker in workers)
    for seed, expected in zip(seeds, serial):
        got = threaded[seed]
        assert [s.text for s in got.samples] == [s.text for s in expected.samples]
        np.testing.assert_array_equal(got.mask, expected.mask)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"samples": 0}, r"samples must be in \[1, 64\]"),
        ({"samples": 65}, r"samples must be in \[1, 64\]"),
        ({"samples": True}, "samples must be an integer"),
        ({"samples": "8"}, "samples must be an integer"),
        ({"seed": -1}, "seed must be in"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"query": "  "}, "query is empty"),
    ],
)
def test_bad_arguments_raise_invalid_input(segmenter, image, kwargs, message):
    arguments = {"query": "cup", **kwargs}
    with pytest.raises(InvalidInputError, match=message):
        segmenter.segment(image, **arguments)


def test_unavailable_backends_and_devices(bundle_path):
    with pytest.raises(InvalidInputError, match="backend must be"):
        Segmenter.from_pretrained(bundle_path, backend="jax")
    with pytest.raises(InvalidInputError, match="device must be"):
        Segmenter.from_pretrained(bundle_path, device="gpu")
    with pytest.raises(BackendUnavailableError, match="has no 'onnx' files"):
        Segmenter.from_pretrained(bundle_path, backend="onnx")


def test_cuda_without_cuda_is_a_clear_error(bundle_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(BackendUnavailableError, match="no CUDA device"):
        Segmenter.from_pretrained(bundle_path, device="cuda")


@pytest.mark.gpu
def test_cuda_segment_matches_cpu(bundle_path, image):
    with Segmenter.from_pretrained(bundle_path, device="cuda") as gpu, \
            Segmenter.from_pretrained(bundle_path) as cpu:
        got = gpu.segment(image, "what could I drink from?", samples=1)
        want = cpu.segment(image, "what could I drink from?", samples=1)
    assert [s.text for s in got.samples] == [s.text for s in want.samples]
    intersection = np.logical_and(got.mask, want.mask).sum()
    union = np.logical_or(got.mask, want.mask).sum()
    assert union == 0 or intersection / union >= 0.98


def test_import_star_edge_loads_no_torch_until_a_torch_backend_is_used(bundle_path):
    script = (
        "import sys, star_edge\n"
        "from star_edge import Segmenter\n"
        "assert 'torch' not in sys.modules, 'import star_edge pulled in torch'\n"
        f"seg = Segmenter.from_pretrained({str(bundle_path)!r})\n"
        "assert 'torch' in sys.modules\n"
        "assert not [m for m in sys.modules if m.startswith(('star_edge.export', 'star_edge.train'))]\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)


def test_auto_backend_prefers_onnx_on_the_cpu_and_falls_back_to_what_is_there(bundle_path, tmp_path, monkeypatch):
    import importlib.util

    from star_edge.export.bundle_export import export_bundle
    from star_edge.segmenter import _automatic_backend

    torch_only = load_bundle(bundle_path)
    assert torch_only.backends == ("torch",) and Segmenter.from_pretrained(bundle_path).backend == "torch"
    both = export_bundle(bundle_path, tmp_path / "both", onnx=True)
    assert Segmenter.from_pretrained(both.root).backend == "onnx"
    from star_edge.sam.onnx_backend import check_export_of

    declared = both.sam.model
    assert declared == {"kind": both.sam.kind, "variant": both.sam.variant, "image_size": both.sam.image_size}
    check_export_of(both.root / "onnx", declared)
    wrong = declared["image_size"] * 2
    with pytest.raises(BundleError, match=rf"sam_onnx\.json was exported for .*, the manifest declares .*: {wrong}"):
        check_export_of(both.root / "onnx", {**declared, "image_size": wrong})
    assert _automatic_backend(both, "cuda") == "torch" and _automatic_backend(both, "cuda:1") == "torch"
    find_spec = importlib.util.find_spec
    missing = {"onnxruntime"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else find_spec(name, *a))
    assert _automatic_backend(both, "cpu") == "torch"
    missing.update({"torch", "transformers"})
    with pytest.raises(BackendUnavailableError, match=r"pip install 'star-edge\[onnx\]' or 'star-edge\[torch\]'"):
        _automatic_backend(both, "cpu")
    missing.clear()
    missing.add("torch")
    assert _automatic_backend(both, "cuda") == "onnx"
    with pytest.raises(InvalidInputError, match="'auto', 'torch', 'onnx' or 'tensorrt'"):
        Segmenter.from_pretrained(bundle_path, backend="fastest")


@pytest.mark.parametrize("answer", [NOTHING, BROKEN])
def test_an_answer_without_objects_leaves_sam_idle(tmp_path, image, answer):
    """"No target" and failed samples give SAM no prompt: its image encoder is not run for them."""
    make_tiny_bundle(tmp_path / "bundle", seed=1, family="qwen2_5_vl", scripted_answers=[answer])
    with Segmenter.from_pretrained(tmp_path / "bundle", backend="torch") as seg:
        encoded = []
        embed = seg.mask_decoder.embed
        seg.mask_decoder.embed = lambda pixels: encoded.append(pixels.shape) or embed(pixels)
        result = seg.segment(image, "what holds a drink?", samples=1)
        assert not result.objects and not result.mask.any() and encoded == []
        assert result.timings["sam_encode"] == result.timings["sam_decode"] == 0.0
        assert seg.segment(image, "what holds a drink?", samples=4, seed=0).objects == []
        adaptive = seg.segment(image, "what holds a drink?", samples=4, seed=0, adaptive=True)
        assert adaptive.objects == [] and adaptive.timings["sam_encode"] == 0.0
        assert encoded == []
