"""The PyTorch reasoner on tiny checkpoints written by export/tiny_reasoner.py (both families)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

from star_edge.errors import BundleError, InvalidInputError
from star_edge.export.tiny_reasoner import MAX_NUMBER_TOKEN, TinyDims, build_tokenizer, write_tiny_reasoner
from star_edge.reasoner import PROMPT_TEMPLATES, build_messages
from star_edge.reasoner.torch_backend import TorchReasoner

FAMILIES = ("qwen2_5_vl", "qwen3_vl")
PATCH = {"qwen2_5_vl": 14, "qwen3_vl": 16}
ANSWERS = [
    '<think>The red circle is left of the blue square.</think><answer>[{"bbox_2d": [10, 20, 120, 140], '
    '"point_2d": [60, 80], "label": "red circle"}]</answer>',
    '<think>Only one red shape: the circle.</think><answer>[{"bbox_2d": [12, 22, 118, 139], '
    '"point_2d": [61, 79], "label": "red circle"}]</answer>',
    "<think>Nothing in the image is red.</think><answer>[]</answer>",
]
QUERY = "the red circle"


@pytest.fixture(scope="module")
def image() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """family -> (directory, manifest section) of a random tiny checkpoint, max 12 new tokens."""
    built = {}
    for family in FAMILIES:
        directory = tmp_path_factory.mktemp(family)
        built[family] = (directory, write_tiny_reasoner(directory, seed=0, family=family, max_new_tokens=12))
    return built


@pytest.fixture(scope="module")
def reasoners(checkpoints) -> dict[str, TorchReasoner]:
    return {family: TorchReasoner.from_dir(*checkpoints[family]) for family in FAMILIES}


@pytest.fixture(scope="module")
def scripted(tmp_path_factory) -> dict[str, TorchReasoner]:
    built = {}
    for family in FAMILIES:
        directory = tmp_path_factory.mktemp(f"scripted_{family}")
        manifest = write_tiny_reasoner(directory, seed=1, family=family, scripted_answers=ANSWERS)
        built[family] = TorchReasoner.from_dir(directory, manifest)
    return built


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("family", FAMILIES)
def test_manifest_section_describes_the_checkpoint(checkpoints, family):
    directory, manifest = checkpoints[family]
    side = 8 * PATCH[family] * 2
    assert manifest == {
        "family": family,
        "input_size": [side, side],
        "frame": "pixels" if family == "qwen2_5_vl" else "grid1000",
        "prompt_template": "star_v1",
        "max_new_tokens": 12,
    }
    config = json.loads((directory / "config.json").read_text())
    tokenizer = build_tokenizer()
    assert config["model_type"] == family
    assert config["image_token_id"] == tokenizer.token_to_id("<|image_pad|>")
    assert config["vision_start_token_id"] == tokenizer.token_to_id("<|vision_start|>")
    assert config["text_config"]["vocab_size"] == tokenizer.get_vocab_size()
    generation = json.loads((directory / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")]


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_is_small_and_loads_offline_with_the_model_class(reasoners, checkpoints, family):
    directory, _ = checkpoints[family]
    assert sum(p.stat().st_size for p in directory.iterdir()) < 20e6
    model = reasoners[family].model
    expected_class = {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration, "qwen3_vl": Qwen3VLForConditionalGeneration}
    assert type(model) is expected_class[family]
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 5e6
    assert model.dtype == torch.float32


def test_build_is_fast_deterministic_and_leaves_the_global_rng_alone(tmp_path):
    state = torch.get_rng_state()
    start = time.perf_counter()
    write_tiny_reasoner(tmp_path / "a", seed=3)
    assert time.perf_counter() - start < 10.0  # ~0.3 s alone; generous for a shared 2-core machine
    write_tiny_reasoner(tmp_path / "b", seed=3)
    write_tiny_reasoner(tmp_path / "c", seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    a, c = _digest(tmp_path / "a"), _digest(tmp_path / "c")
    assert a["model.safetensors"] != c["model.safetensors"] and a["tokenizer.json"] == c["tokenizer.json"]


def test_tokenizer_round_trips_answers_and_keeps_coordinates_whole(reasoners):
    tokenizer = reasoners["qwen2_5_vl"].processor.tokenizer
    for text in [*ANSWERS, "Ünïcode — 3.5 <think>\n</think>"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    for number in (0, 7, 42, 840, MAX_NUMBER_TOKEN):
        assert len(tokenizer.encode(str(number), add_special_tokens=False)) == 1
    assert len(tokenizer.encode("[10, 20, 120, 140]", add_special_tokens=False)) == 9  # [ 10 ,_ 20 ,_ 120 ,_ 140 ]


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_inputs_carry_one_image_token_per_merged_patch(reasoners, image, family):
    reasoner = reasoners[family]
    inputs = reasoner.hf_inputs(image, QUERY)
    patches_per_side = reasoner.input_size[0] // PATCH[family]
    image_token = reasoner.model.config.image_token_id
    assert int((inputs["input_ids"] == image_token).sum()) == (patches_per_side // 2) ** 2 == 64
    assert inputs["image_grid_thw"].tolist() == [[1, patches_per_side, patches_per_side]]
    assert inputs["pixel_values"].shape == (patches_per_side**2, 3 * 2 * PATCH[family] ** 2)
    assert inputs["mm_token_type_ids"].sum() == 64
    text = reasoner.processor.tokenizer.decode(inputs["input_ids"][0])
    assert QUERY in text and text.endswith("<|im_start|>assistant\n")


def test_processor_is_pinned_to_the_input_size_whatever_the_checkpoint_says(checkpoints, image, tmp_path):
    source, manifest = checkpoints["qwen2_5_vl"]
    directory = tmp_path / "reasoner"
    shutil.copytree(source, directory)
    config_path = directory / "preprocessor_config.json"
    config = json.loads(config_path.read_text())
    config.update(min_pixels=56 * 56, max_pixels=112 * 112)  # alone, these would shrink 224 px to 112 px
    config_path.write_text(json.dumps(config))
    inputs = TorchReasoner.from_dir(directory, manifest).hf_inputs(image, QUERY)
    assert inputs["image_grid_thw"].tolist() == [[1, 16, 16]]


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_processor_agrees_where_torchvision_exists(reasoners, checkpoints, image, family):
    pytest.importorskip("torchvision")  # transformers 5 builds no Qwen-VL processor without it
    from transformers import AutoProcessor

    reasoner = reasoners[family]
    processor = AutoProcessor.from_pretrained(checkpoints[family][0], local_files_only=True)
    ours = reasoner.hf_inputs(image, QUERY)
    messages = build_messages(QUERY, frame=reasoner.frame)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    resized = image.resize(reasoner.input_size, Image.Resampling.BICUBIC)
    theirs = processor(text=[text], images=[resized], return_tensors="pt")
    assert torch.equal(theirs["input_ids"], ours["input_ids"])
    torch.testing.assert_close(theirs["pixel_values"], ours["pixel_values"], atol=1e-5, rtol=0)


def test_image_tokens_follow_the_dims(tmp_path, image):
    manifest = write_tiny_reasoner(tmp_path, family="qwen3_vl", dims=TinyDims(image_tokens_per_side=4, num_layers=1))
    assert manifest["input_size"] == [128, 128]
    reasoner = TorchReasoner.from_dir(tmp_path, manifest)
    inputs = reasoner.hf_inputs(image.convert("L"), QUERY)
    assert int((inputs["input_ids"] == reasoner.model.config.image_token_id).sum()) == 16


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_matches_hf_generate_token_for_token(reasoners, image, family):
    reasoner = reasoners[family]
    output = reasoner.generate(image, QUERY)
    inputs = reasoner.hf_inputs(image, QUERY)
    with torch.no_grad():
        reference = reasoner.model.generate(**inputs, do_sample=False, max_new_tokens=reasoner.max_new_tokens)
    expected = reference[0, inputs["input_ids"].shape[1] :].tolist()
    assert output.token_ids == [expected[: len(output.token_ids[0])]]
    assert output.texts == [reasoner.processor.tokenizer.decode(output.token_ids[0], skip_special_tokens=True)]
    prompt_length, generated = inputs["input_ids"].shape[1], len(output.token_ids[0])
    assert output.token_counts == {"prompt": prompt_length, "image": 64, "generated": generated}
    assert {"preprocess", "vision", "prefill", "decode", "generate"} <= set(output.timings)
    assert all(value >= 0 for value in output.timings.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_scripted_model_greedily_answers_the_first_script(scripted, image, family):
    output = scripted[family].generate(image, QUERY)
    assert output.texts == [ANSWERS[0]]
    assert output.token_ids[0][-1] == scripted[family].processor.tokenizer.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize("family", FAMILIES)
def test_scripted_sampling_draws_several_answers_reproducibly(scripted, image, family):
    reasoner = scripted[family]
    state = torch.get_rng_state()
    first = reasoner.generate(image, QUERY, n=16, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    again = reasoner.generate(image, QUERY, n=16, seed=7)
    assert first.texts == again.texts
    assert len(first.texts) == 16 and set(first.texts) <= set(ANSWERS)
    assert len(set(first.texts)) >= 2
    assert first.token_counts["generated"] == sum(len(ids) for ids in first.token_ids)


def test_invalid_calls_raise_invalid_input_error(reasoners, image, tmp_path):
    reasoner = reasoners["qwen2_5_vl"]
    with pytest.raises(InvalidInputError):
        reasoner.generate(image, QUERY, n=0)
    with pytest.raises(InvalidInputError):
        reasoner.generate(image, "   ")
    with pytest.raises(InvalidInputError):
        reasoner.generate(image, "find <|image_pad|>")
    with pytest.raises(InvalidInputError):
        reasoner.hf_inputs(np.zeros((8, 8, 3), np.uint8), QUERY)
    with pytest.raises(InvalidInputError):
        write_tiny_reasoner(tmp_path / "never", scripted_answers=["same", "same"])
    with pytest.raises(InvalidInputError, match="hidden size"):
        write_tiny_reasoner(tmp_path / "never", scripted_answers=["a long answer " * 200])
    assert not (tmp_path / "never").exists()


def test_bad_checkpoints_raise_bundle_error_naming_the_problem(checkpoints, tmp_path):
    source, manifest = checkpoints["qwen2_5_vl"]
    with pytest.raises(BundleError, match="does not exist"):
        TorchReasoner.from_dir(tmp_path / "missing", manifest)
    with pytest.raises(BundleError, match="unknown reasoner family 'llava'"):
        TorchReasoner.from_dir(source, {**manifest, "family": "llava"})
    with pytest.raises(BundleError, match="'qwen2_5_vl' model"):
        TorchReasoner.from_dir(source, {**manifest, "family": "qwen3_vl", "frame": "grid1000"})
    with pytest.raises(BundleError, match="max_new_tokens"):
        TorchReasoner.from_dir(source, {key: v for key, v in manifest.items() if key != "max_new_tokens"})
    with pytest.raises(BundleError, match="multiple of 28"):
        TorchReasoner.from_dir(source, {**manifest, "input_size": [230, 230]})
    for name in ("tokenizer.json", "model.safetensors", "preprocessor_config.json"):
        broken = tmp_path / name
        shutil.copytree(source, broken)
        (broken / name).unlink()
        with pytest.raises(BundleError, match=name):
            TorchReasoner.from_dir(broken, manifest)
    truncated = tmp_path / "truncated"
    shutil.copytree(source, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(BundleError, match="cannot load"):
        TorchReasoner.from_dir(truncated, manifest)


def test_sharded_checkpoints_load_and_a_missing_shard_is_named(reasoners, checkpoints, image, tmp_path):
    """A checkpoint saved in shards (model.safetensors.index.json) loads to the same model; a shard
    the index lists but the folder lacks, or an index that is not one, is a BundleError naming it."""
    source, manifest = checkpoints["qwen3_vl"]
    sharded = tmp_path / "sharded"
    shutil.copytree(source, sharded, ignore=shutil.ignore_patterns("model.safetensors"))
    reasoners["qwen3_vl"].model.save_pretrained(sharded, max_shard_size="200KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and not (sharded / "model.safetensors").exists()
    loaded = TorchReasoner.from_dir(sharded, manifest)
    assert loaded.generate(image, QUERY, n=1).texts == reasoners["qwen3_vl"].generate(image, QUERY, n=1).texts
    (sharded / shards[-1]).unlink()
    with pytest.raises(BundleError, match=f"lacks {shards[-1]}"):
        TorchReasoner.from_dir(sharded, manifest)
    (sharded / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(BundleError, match="is not a safetensors index"):
        TorchReasoner.from_dir(sharded, manifest)


def test_messages_ask_for_the_star_answer_format():
    messages = build_messages("  the thing used for cutting ", frame="grid1000")
    assert [part["type"] for part in messages[0]["content"]] == ["image", "text"]
    text = messages[0]["content"][1]["text"]
    assert '"the thing used for cutting"' in text and "0 to 1000" in text
    for marker in ("<think>", "</think>", "<answer>", "</answer>", "bbox_2d", "point_2d", "label", "[]"):
        assert marker in text
    assert "pixel" in build_messages("x")[0]["content"][1]["text"]
    assert "star_v1" in PROMPT_TEMPLATES
    for bad in ({"query": ""}, {"query": "x", "frame": "inches"}, {"query": "x", "template": "v0"}):
        with pytest.raises(InvalidInputError):
            build_messages(**bad)


def test_importing_the_reasoner_package_loads_no_torch():
    code = "import sys, star_edge.reasoner; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
