"""LoRA merge (export/merge.py) on tiny checkpoints with random adapters, and `star-edge export`."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from star_edge.cli import app
from star_edge.errors import BundleError, InvalidInputError
from star_edge.export.merge import merge_lora, write_merged_bundle
from star_edge.export.tiny import make_tiny_bundle
from star_edge.export.tiny_reasoner import write_tiny_reasoner
from star_edge.reasoner.torch_backend import FAMILIES, TorchReasoner
from star_edge.segmenter import Segmenter

# peft's get_peft_model calls a transformers method deprecated in 5.x
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

LANGUAGE_LINEARS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VISION_AND_LANGUAGE = r".*(language_model.*\.(q_proj|v_proj|down_proj)|visual.*\.(qkv|linear_fc1|fc1|gate_proj))"
QUERY = "the red circle"


def _write_adapter(base: Path, directory: Path, target_modules: str, seed: int) -> None:
    """A LoRA adapter with random A and B (a fresh adapter has B = 0 and would change nothing)."""
    model = FAMILIES[json.loads((base / "config.json").read_text())["model_type"]][0].from_pretrained(base)
    wrapped = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=target_modules))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    wrapped.save_pretrained(directory)


def _rewritten_adapter(adapter: Path, folder: Path, rewrite) -> Path:
    """A copy of `adapter` in `folder` whose tensors went through rewrite(dict) -> dict."""
    folder.mkdir()
    shutil.copyfile(adapter / "adapter_config.json", folder / "adapter_config.json")
    save_file(rewrite(load_file(adapter / "adapter_model.safetensors")), folder / "adapter_model.safetensors")
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, Path, dict]]:
    """family -> (base folder, adapter folder, base manifest section)."""
    built = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(f"merge_{family}")
        manifest = write_tiny_reasoner(root / "base", seed=5, family=family, max_new_tokens=8)
        _write_adapter(root / "base", root / "adapter", LANGUAGE_LINEARS, seed=1)
        built[family] = (root / "base", root / "adapter", manifest)
    return built


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(180, 240, 3), dtype=np.uint8))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_merged_checkpoint_computes_what_the_unmerged_adapter_does(checkpoints, image, tmp_path, family):
    base, adapter, manifest = checkpoints[family]
    report = merge_lora(base, adapter, tmp_path / "merged")
    assert report.family == family and report.dtype == torch.float32
    assert report.lora_modules == 7 * 4  # 7 linear layers in each of the 4 language-model layers
    assert report.max_abs_diff < 1e-4 * report.max_abs_logit
    assert report.adapter_effect > 0.1, "the random adapter must change the model"

    merged = TorchReasoner.from_dir(tmp_path / "merged", manifest)
    inputs = merged.hf_inputs(image, QUERY)
    reference = PeftModel.from_pretrained(FAMILIES[family][0].from_pretrained(base), adapter).eval()
    with torch.no_grad():
        expected = reference(**inputs).logits
        got = merged.model(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not any("lora" in name for name in merged.model.state_dict())
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.jinja"):
        assert (tmp_path / "merged" / name).read_bytes() == (base / name).read_bytes()


def test_adapters_on_the_vision_tower_merge_too(checkpoints, tmp_path):
    base, _, _ = checkpoints["qwen3_vl"]
    _write_adapter(base, tmp_path / "adapter", VISION_AND_LANGUAGE, seed=2)
    report = merge_lora(base, tmp_path / "adapter", tmp_path / "merged")
    assert report.lora_modules > 3 * 4 and report.max_abs_diff < 1e-4 * report.max_abs_logit


def test_adapters_in_the_pre_4_52_layout_are_renamed(checkpoints, tmp_path):
    base, adapter, _ = checkpoints["qwen2_5_vl"]
    legacy = _rewritten_adapter(adapter, tmp_path / "legacy", lambda tensors: {
        key.replace("model.language_model.", "model."): value for key, value in tensors.items()})
    assert load_file(legacy / "adapter_model.safetensors").keys() != load_file(
        adapter / "adapter_model.safetensors").keys()
    merge_lora(base, adapter, tmp_path / "new")
    merge_lora(base, legacy, tmp_path / "old")
    new, old = load_file(tmp_path / "new" / "model.safetensors"), load_file(tmp_path / "old" / "model.safetensors")
    assert new.keys() == old.keys() and all(torch.equal(new[key], old[key]) for key in new)


def test_adapters_that_do_not_fit_or_are_missing_are_refused(checkpoints, tmp_path):
    base, adapter, _ = checkpoints["qwen3_vl"]
    misfit = _rewritten_adapter(adapter, tmp_path / "misfit", lambda tensors: {
        key.replace(".layers.", ".blocks."): value for key, value in tensors.items()})
    with pytest.raises(BundleError, match="does not fit the base model"):
        merge_lora(base, misfit, tmp_path / "out")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copyfile(adapter / "adapter_config.json", pickled / "adapter_config.json")
    (pickled / "adapter_model.bin").write_bytes(b"\x80")
    with pytest.raises(BundleError, match="pickle-based"):
        merge_lora(base, pickled, tmp_path / "out")
    with pytest.raises(BundleError, match="adapter_config.json"):
        merge_lora(base, tmp_path / "nowhere", tmp_path / "out")
    no_tokenizer = tmp_path / "base"
    shutil.copytree(base, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer.json"):
        merge_lora(no_tokenizer, adapter, tmp_path / "out")


def test_an_adapter_of_another_width_or_that_cannot_merge_is_refused_in_one_line(checkpoints, tmp_path):
    base, adapter, _ = checkpoints["qwen3_vl"]
    narrow = _rewritten_adapter(adapter, tmp_path / "narrow", lambda tensors: {
        key: value[:, :-8].contiguous() if "lora_A" in key else value for key, value in tensors.items()})
    with pytest.raises(BundleError) as refused:
        merge_lora(base, narrow, tmp_path / "out")
    message = str(refused.value)
    assert "\n" not in message and "size mismatch" in message and "more)" in message, message
    biased = tmp_path / "biased"
    model = FAMILIES["qwen3_vl"][0].from_pretrained(base)
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LANGUAGE_LINEARS, lora_bias=True)
                   ).save_pretrained(biased)
    with pytest.raises(BundleError, match=r"cannot merge the LoRA adapter .*biased"):
        merge_lora(base, biased, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def sam_folder(tmp_path_factory) -> Path:
    bundle = make_tiny_bundle(tmp_path_factory.mktemp("sam_source") / "bundle", seed=0, family="qwen3_vl")
    return bundle.sam_dir


def test_export_command_writes_a_bundle_that_segments(checkpoints, sam_folder, tmp_path):
    base, adapter, _ = checkpoints["qwen3_vl"]
    out = tmp_path / "bundle"
    result = CliRunner().invoke(app, ["export", "--base", str(base), "--adapter", str(adapter), "--sam",
                                      str(sam_folder), "--out", str(out), "--input-size", "256",
                                      "--max-new-tokens", "8", "--name", "tiny-star"])
    assert result.exit_code == 0, result.output
    assert "merged 28 LoRA modules" in result.output
    manifest = json.loads((out / "star_edge.json").read_text())
    assert manifest["name"] == "tiny-star" and manifest["trained"] is True
    assert manifest["reasoner"] == {"family": "qwen3_vl", "path": "reasoner", "input_size": [256, 256],
                                    "frame": "grid1000", "prompt_template": "star_v1", "max_new_tokens": 8}
    assert manifest["sam"] == {"kind": "sam1", "variant": "tiny", "path": "sam", "image_size": 256}
    with Segmenter.from_pretrained(out) as segmenter:
        res = segmenter.segment(np.zeros((64, 96, 3), np.uint8), QUERY, samples=2, seed=0)
    assert len(res.samples) == 2


def test_export_defaults_and_errors(checkpoints, sam_folder, tmp_path, monkeypatch):
    base, adapter, _ = checkpoints["qwen2_5_vl"]
    bundle, _ = write_merged_bundle(base, adapter, tmp_path / "default", sam_folder)
    assert bundle.reasoner.input_size == (840, 840) and bundle.reasoner.frame == "pixels"
    assert bundle.reasoner.max_new_tokens == 1024 and bundle.name == "adapter"
    with pytest.raises(InvalidInputError, match="multiple of 28"):
        write_merged_bundle(base, adapter, tmp_path / "odd", sam_folder, input_size=832)
    with pytest.raises(BundleError, match="sam/ folder"):
        write_merged_bundle(base, adapter, tmp_path / "nosam", tmp_path / "missing.safetensors")
    checkpoint = tmp_path / "sam_vit_b.pth"
    checkpoint.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "star_edge.export.sam_checkpoints", None)  # as if the converter were absent
    with pytest.raises(BundleError, match="sam_checkpoints"):
        write_merged_bundle(base, adapter, tmp_path / "pth", checkpoint)
    result = CliRunner().invoke(app, ["export", "--out", str(tmp_path / "x"), "--base", str(base)])
    assert result.exit_code == 2 and "--base, --adapter and --sam go together" in result.stderr
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for out in (a_file, a_file / "sub"):
        for source in (["--base", str(base), "--adapter", str(adapter), "--sam", str(sam_folder)], []):
            result = CliRunner().invoke(app, ["export", "--out", str(out), *source])
            assert result.exit_code == 2, result.output
            assert f"cannot write the bundle folder {out}: {a_file} is a file" in result.stderr


def test_exporting_again_into_a_bundle_keeps_its_sam_and_none_of_its_old_files(checkpoints, sam_folder, tmp_path):
    base, adapter, _ = checkpoints["qwen3_vl"]
    out = tmp_path / "bundle"
    write_merged_bundle(base, adapter, out, sam_folder, input_size=256)
    for stale in ("chat_template.json", "model.safetensors.index.json"):  # as an older bundle might hold
        (out / "reasoner" / stale).write_text("{}")
    sam_weights = (out / "sam" / "model.safetensors").read_bytes()
    bundle, _ = write_merged_bundle(base, adapter, out, out / "sam", input_size=256)  # --sam OUT/sam
    assert (out / "sam" / "model.safetensors").read_bytes() == sam_weights
    assert not any(name.endswith(("chat_template.json", ".index.json")) for name in bundle.files)
    assert not (out / "reasoner" / "chat_template.json").exists()
    with Segmenter.from_pretrained(out) as segmenter:
        assert len(segmenter.segment(np.zeros((32, 48, 3), np.uint8), QUERY, samples=1).samples) == 1


def test_a_bad_sam_source_is_refused_before_the_merge_writes_anything(checkpoints, sam_folder, tmp_path):
    base, adapter, _ = checkpoints["qwen3_vl"]
    with pytest.raises(BundleError, match=r"--sam .*sam_vit_h\.pth does not exist"):
        write_merged_bundle(base, adapter, tmp_path / "a", tmp_path / "sam_vit_h.pth")
    truncated = shutil.copytree(sam_folder, tmp_path / "truncated")
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(BundleError, match="model.safetensors"):
        write_merged_bundle(base, adapter, tmp_path / "b", truncated)
    assert not (tmp_path / "a" / "reasoner").exists() and not (tmp_path / "b" / "reasoner").exists()
