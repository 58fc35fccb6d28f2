"""SAM on ONNX: the exported graphs (checked, described, dynamic in the number of prompts), the
onnxruntime backend against the torch backend, the fp16 / int8 decoder variants, and a runtime
that works with torch absent."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file

from sam_reference import PHOTOS, mask_iou, natural_image, noisy_tiny_sam, photo, random_prompts
from star_edge.errors import BundleError, InvalidInputError
from star_edge.export.sam_onnx import DECODER_FILES, ENCODER_FILE, export_sam_onnx
from star_edge.export.tiny_sam import TINY_SAM_CONFIG, write_sam_dir
from star_edge.export.weight_links import materialize_graph
from star_edge.sam import MaskDecoder
from star_edge.sam.inputs import labelled_points
from star_edge.sam.onnx_backend import (
    DESCRIPTION_FILE,
    OnnxImageEmbedding,
    OnnxMaskDecoder,
    onnxruntime_sessions,
    read_description,
)
from star_edge.sam.prompt_decoder import PromptDecoder


@pytest.fixture(scope="module")
def tiny_sam() -> torch.nn.Module:
    return noisy_tiny_sam()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, tiny_sam: torch.nn.Module) -> Path:
    """A folder with sam/ (the tiny SAM with random position embeddings) and its onnx/ export."""
    root = tmp_path_factory.mktemp("bundle")
    write_sam_dir(tiny_sam, json.loads(json.dumps(TINY_SAM_CONFIG)), root / "sam")
    export_sam_onnx(root / "sam", root / "onnx")
    return root


@pytest.fixture(scope="module")
def torch_decoder(tiny_sam: torch.nn.Module) -> MaskDecoder:
    return MaskDecoder.from_module(tiny_sam)


@pytest.fixture(scope="module")
def onnx_decoder(bundle: Path) -> OnnxMaskDecoder:
    return OnnxMaskDecoder.from_dir(bundle / "onnx")


def test_export_writes_checked_graphs_and_declares_their_inputs_and_outputs(bundle: Path, tmp_path: Path) -> None:
    folder = bundle / "onnx"
    description = json.loads((folder / DESCRIPTION_FILE).read_text())
    assert description["opset"] >= 17
    assert sorted(description["decoders"]) == ["fp16", "fp32", "int8"]
    assert description["sam"]["low_res_size"] == [64, 64] and description["sam"]["num_outputs"] == 4
    encoder = description["encoder"]
    assert encoder["file"] == ENCODER_FILE
    assert encoder["inputs"] == [{"name": "pixels", "dtype": "float32", "shape": [1, 3, 256, 256]}]
    assert encoder["outputs"] == [
        {"name": "image_embeddings", "dtype": "float32", "shape": [1, 64, 16, 16]}
    ]
    for variant, graph in description["decoders"].items():
        assert graph["file"] == DECODER_FILES[variant]
        assert graph["inputs"] == [
            {"name": "image_embeddings", "dtype": "float32", "shape": [1, 64, 16, 16]},
            {"name": "point_coords", "dtype": "float32", "shape": ["prompts", "points", 2]},
            {"name": "point_labels", "dtype": "int64", "shape": ["prompts", "points"]},
        ]
        assert graph["outputs"] == [
            {"name": "low_res_masks", "dtype": "float32", "shape": ["prompts", 4, 64, 64]},
            {"name": "iou_predictions", "dtype": "float32", "shape": ["prompts", 4]},
        ]
        whole = materialize_graph(folder / graph["file"], graph, tmp_path / graph["file"])
        model = onnx.load(str(whole))
        onnx.checker.check_model(model, full_check=True)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17


@pytest.mark.parametrize("kind", ["box_and_point", "box", "point"])
@pytest.mark.parametrize("count", [1, 7])
def test_decoder_graph_equals_torch_within_1e3(
    bundle: Path, tiny_sam: torch.nn.Module, kind: str, count: int
) -> None:
    boxes, points = random_prompts(200, 300, count, seed=count)
    coords, labels = labelled_points(
        boxes if kind != "point" else None, points if kind != "box" else None, (200, 300), 256
    )
    features = torch.randn((1, 64, 16, 16), generator=torch.Generator().manual_seed(count))
    graph = read_description(bundle / "onnx")["decoders"]["fp32"]
    session = onnxruntime_sessions("cpu", None)(bundle / "onnx" / DECODER_FILES["fp32"], graph)
    found = session.run(
        None, {"image_embeddings": features.numpy(), "point_coords": coords, "point_labels": labels}
    )
    with torch.inference_mode():
        expected = PromptDecoder(tiny_sam.prompt_encoder, tiny_sam.mask_decoder)(
            features, torch.from_numpy(coords), torch.from_numpy(labels)
        )
    assert found[0].shape == (count, 4, 64, 64) and found[1].shape == (count, 4)
    np.testing.assert_allclose(found[0], expected[0].numpy(), rtol=0, atol=1e-3)
    np.testing.assert_allclose(found[1], expected[1].numpy(), rtol=0, atol=1e-3)


@pytest.mark.parametrize("name", PHOTOS)
def test_onnx_backend_matches_the_torch_backend_on_photos(
    onnx_decoder: OnnxMaskDecoder, torch_decoder: MaskDecoder, name: str
) -> None:
    image = photo(name)
    boxes, points = random_prompts(*image.shape[:2], count=12, seed=len(name))
    embedding = onnx_decoder.embed(image)
    expected_embedding = torch_decoder.embed(image)
    np.testing.assert_allclose(
        embedding.features, expected_embedding.features.numpy(), rtol=0, atol=1e-3
    )
    assert (embedding.original_size, embedding.input_size) == (
        expected_embedding.original_size,
        expected_embedding.input_size,
    )
    for given in ((boxes, points), (boxes, None), (None, points)):
        masks, scores = onnx_decoder.decode(embedding, *given)
        expected_masks, expected_scores = torch_decoder.decode(expected_embedding, *given)
        assert masks.shape == expected_masks.shape == (12, *image.shape[:2])
        assert 0.02 < expected_masks.mean() < 0.98, "degenerate reference masks prove nothing"
        assert min(mask_iou(a, b) for a, b in zip(masks, expected_masks)) >= 0.99
        np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=1e-3)


@pytest.mark.parametrize(("variant", "floor"), [("fp16", 0.99), ("int8", 0.9)])
def test_decoder_variants_stay_close_to_fp32(
    bundle: Path, onnx_decoder: OnnxMaskDecoder, variant: str, floor: float
) -> None:
    reduced = OnnxMaskDecoder.from_dir(bundle / "onnx", decoder_variant=variant)
    image = photo("chelsea.jpg")
    boxes, points = random_prompts(*image.shape[:2], count=12, seed=3)
    masks, _ = reduced.decode(reduced.embed(image), boxes, points)
    expected, _ = onnx_decoder.decode(onnx_decoder.embed(image), boxes, points)
    assert np.mean([mask_iou(a, b) for a, b in zip(masks, expected)]) >= floor


def test_groups_of_prompts_give_the_same_masks(bundle: Path, onnx_decoder: OnnxMaskDecoder) -> None:
    small_groups = OnnxMaskDecoder.from_dir(bundle / "onnx", max_batch=2)
    image = natural_image(200, 300, seed=4)
    boxes, points = random_prompts(200, 300, count=5, seed=4)
    masks, scores = small_groups.decode(small_groups.embed(image), boxes, points, multimask=False)
    expected_masks, expected_scores = onnx_decoder.decode(
        onnx_decoder.embed(image), boxes, points, multimask=False
    )
    assert np.array_equal(masks, expected_masks)
    np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=1e-6)


def test_embeddings_are_cached_by_content(bundle: Path) -> None:
    decoder = OnnxMaskDecoder.from_dir(bundle / "onnx", cache_size=1)
    image = natural_image(200, 300, seed=5)
    first = decoder.embed(image)
    assert decoder.embed(image.copy()) is first
    assert decoder.embed(natural_image(200, 300, seed=6)) is not first
    assert decoder.embed(image) is not first  # evicted


def test_bad_inputs_raise_the_same_errors_as_the_torch_backend(
    onnx_decoder: OnnxMaskDecoder,
) -> None:
    embedding = onnx_decoder.embed(natural_image(40, 60, seed=0))
    with pytest.raises(InvalidInputError, match="neither"):
        onnx_decoder.decode(embedding)
    with pytest.raises(InvalidInputError, match="finite"):
        onnx_decoder.decode(embedding, boxes=np.array([[0.0, 0.0, np.nan, 4.0]]))
    with pytest.raises(InvalidInputError, match="OnnxImageEmbedding"):
        onnx_decoder.decode(embedding.features, boxes=np.zeros((1, 4)))
    wrong = OnnxImageEmbedding(np.zeros((1, 32, 16, 16), np.float32), (40, 60), (171, 256))
    with pytest.raises(InvalidInputError, match="do not come from this decoder"):
        onnx_decoder.decode(wrong, boxes=np.zeros((1, 4)))
    masks, scores = onnx_decoder.decode(embedding, points=np.zeros((0, 2)))
    assert masks.shape == (0, 40, 60) and scores.shape == (0,)
    with pytest.raises(InvalidInputError, match="uint8"):
        onnx_decoder.embed(np.zeros((4, 4, 3), np.float32))


@pytest.mark.parametrize("damage", ["no_description", "no_graph", "bad_json", "version", "garbage",
                                    "no_checkpoint", "other_checkpoint", "escaping_link", "no_threshold",
                                    "bad_mean", "no_inputs"])
def test_broken_folders_name_the_file(bundle: Path, tmp_path: Path, damage: str) -> None:
    folder = shutil.copytree(bundle, tmp_path / "bundle") / "onnx"
    description = folder / DESCRIPTION_FILE
    checkpoint = folder.parent / "sam" / "model.safetensors"
    if damage == "no_description":
        description.unlink()
        expected = rf"{DESCRIPTION_FILE} is missing"
    elif damage == "no_graph":
        (folder / DECODER_FILES["fp32"]).unlink()
        expected = r"sam_decoder\.onnx is missing"
    elif damage == "bad_json":
        description.write_text("{")
        expected = r"sam_onnx\.json is not readable JSON"
    elif damage == "version":
        content = json.loads(description.read_text())
        description.write_text(json.dumps({**content, "format_version": 9}))
        expected = r"sam_onnx\.json: format_version 9"
    elif damage == "garbage":
        (folder / DECODER_FILES["fp32"]).write_bytes(b"not a graph")
        expected = r"sam_decoder\.onnx is not a loadable ONNX graph"
    elif damage == "no_checkpoint":
        checkpoint.unlink()
        expected = r"sam/model\.safetensors is missing \(the weights of .*sam_decoder\.onnx are read from it\)"
    elif damage == "other_checkpoint":  # a SAM of other dimensions put in place of the exported one
        tensors = load_file(checkpoint)
        save_file({name: torch.zeros(3, 5) if value.ndim == 2 else value for name, value in tensors.items()},
                  checkpoint)
        expected = r"model\.safetensors: tensor '.*' gives shape \[\d+, \d+\], the graph's initializer"
    elif damage == "no_threshold":
        content = json.loads(description.read_text())
        del content["sam"]["mask_threshold"]
        description.write_text(json.dumps(content))
        expected = r"sam_onnx\.json: sam\.mask_threshold is missing or malformed \(None\)"
    elif damage == "bad_mean":
        content = json.loads(description.read_text())
        content["sam"]["pixel_mean"] = [1.0, 2.0]
        description.write_text(json.dumps(content))
        expected = r"sam_onnx\.json: sam\.pixel_mean is missing or malformed \(\[1\.0, 2\.0\]\)"
    elif damage == "no_inputs":
        content = json.loads(description.read_text())
        del content["decoders"]["fp32"]["inputs"]
        description.write_text(json.dumps(content))
        expected = r"sam_onnx\.json: a graph entry lacks 'inputs'"
    else:
        content = json.loads(description.read_text())
        content["decoders"]["fp32"]["linked"] = {"../../elsewhere.safetensors": {}}
        description.write_text(json.dumps(content))
        expected = r"links weights from \.\./\.\./elsewhere\.safetensors, which lies outside the bundle"
    with pytest.raises(BundleError, match=expected):
        OnnxMaskDecoder.from_dir(folder)


def test_unknown_variant_or_device_is_rejected(bundle: Path) -> None:
    with pytest.raises(InvalidInputError, match="decoder_variant"):
        OnnxMaskDecoder.from_dir(bundle / "onnx", decoder_variant="int4")
    with pytest.raises(InvalidInputError, match="device"):
        OnnxMaskDecoder.from_dir(bundle / "onnx", device="tpu")
    assert OnnxMaskDecoder.available_variants(bundle / "onnx") == ["fp32", "fp16", "int8"]


def test_the_onnx_backend_runs_with_torch_absent(bundle: Path) -> None:
    code = f"""
import sys
sys.modules["torch"] = None  # any import of torch now raises ImportError
import numpy as np
from star_edge.sam.onnx_backend import OnnxMaskDecoder
decoder = OnnxMaskDecoder.from_dir({str(bundle / "onnx")!r})
image = np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)
boxes, points = np.array([[5.0, 5.0, 50.0, 40.0]]), np.array([[20.0, 20.0]])
masks, scores = decoder.decode(decoder.embed(image), boxes, points)
assert masks.shape == (1, 60, 90) and scores.shape == (1,)
assert sys.modules["torch"] is None
assert not any(m.startswith(("star_edge.export", "star_edge.train")) for m in sys.modules)
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
