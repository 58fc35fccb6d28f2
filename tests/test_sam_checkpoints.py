"""Official SAM 1 .pth checkpoints -> a bundle's sam/ folder: variant detection from the tensor
shapes, a full-size ViT-B round trip with random weights in the official key layout, and errors
that name the file."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from star_edge.errors import BundleError
from star_edge.export.sam_checkpoints import detect_sam1_variant, import_official_sam
from star_edge.sam import MaskDecoder, load_sam
from star_edge.sam.official import OFFICIAL_CONFIGS, build_sam_from_config, import_segment_anything


def official_shapes(variant: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an official checkpoint, from segment_anything's own builder on the meta
    device (no memory, no random init)."""
    import_segment_anything()
    import segment_anything.build_sam as build

    builder = {
        "vit_b": build.build_sam_vit_b,
        "vit_l": build.build_sam_vit_l,
        "vit_h": build.build_sam_vit_h,
    }
    with torch.device("meta"):
        return {key: tuple(value.shape) for key, value in builder[variant]().state_dict().items()}


@pytest.fixture(scope="module")
def vit_b_checkpoint(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, torch.Tensor]]:
    """A full-size ViT-B with seeded random weights, saved as the official files are: a plain
    `Sam.state_dict()` through torch.save."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = build_sam_from_config(OFFICIAL_CONFIGS["vit_b"]).state_dict()
    path = tmp_path_factory.mktemp("pth") / "sam_vit_b_01ec64.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_detects_each_official_variant_from_its_shapes(variant: str) -> None:
    assert detect_sam1_variant(official_shapes(variant)) == variant


def test_imports_a_vit_b_checkpoint_into_a_loadable_sam_folder(
    vit_b_checkpoint: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    path, state = vit_b_checkpoint
    section = import_official_sam(path, tmp_path / "bundle" / "sam")
    assert section == {"kind": "sam1", "variant": "vit_b", "path": "sam", "image_size": 1024}
    config = json.loads((tmp_path / "bundle" / "sam" / "config.json").read_text())
    assert config == OFFICIAL_CONFIGS["vit_b"]
    loaded = load_sam(tmp_path / "bundle" / "sam")
    found = loaded.state_dict()
    assert found.keys() == state.keys()
    assert all(torch.equal(found[key], state[key]) for key in state)
    assert MaskDecoder.from_dir(tmp_path / "bundle" / "sam").image_size == 1024


def test_accepts_a_state_dict_wrapped_in_a_model_key(
    vit_b_checkpoint: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    _, state = vit_b_checkpoint
    path = tmp_path / "wrapped.pth"
    torch.save({"model": state}, path)
    assert import_official_sam(path, tmp_path / "sam")["variant"] == "vit_b"


@pytest.mark.parametrize("cut", [0.0, 0.5, 0.99])
def test_a_truncated_file_names_the_file(tmp_path: Path, cut: float) -> None:
    path = tmp_path / "sam_vit_b.pth"
    torch.save({"mask_decoder.iou_token.weight": torch.zeros(1, 256)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(BundleError, match=r"sam_vit_b\.pth is not a readable PyTorch checkpoint"):
        import_official_sam(path, tmp_path / "sam")
    assert not (tmp_path / "sam" / "model.safetensors").exists()


class Payload:
    """Anything that is not a tensor: weights_only loading must refuse to build it."""


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ([torch.zeros(2)], "does not hold a state dict"),
        ({}, "does not hold a state dict"),
        ({"mask_decoder.iou_token.weight": 3}, "not tensors"),
        ({"weight": torch.zeros(2)}, "not a SAM 1 or SAM 2 state dict"),
    ],
)
def test_not_a_state_dict_names_the_file(tmp_path: Path, content: object, reason: str) -> None:
    path = tmp_path / "other.pth"
    torch.save(content, path)
    with pytest.raises(BundleError, match=rf"other\.pth.*{reason}"):
        import_official_sam(path, tmp_path / "sam")


def test_pickled_objects_are_never_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"weight": Payload()}, path, pickle_module=pickle)
    with pytest.raises(BundleError, match=r"evil\.pth is not a readable PyTorch checkpoint"):
        import_official_sam(path, tmp_path / "sam")


def test_a_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"absent\.pth is missing"):
        import_official_sam(tmp_path / "absent.pth", tmp_path / "sam")


@pytest.mark.parametrize("change", ["drop", "extra", "shape", "width", "depth"])
def test_layouts_of_no_official_variant_are_refused(change: str) -> None:
    shapes = official_shapes("vit_l")
    reasons = {
        "drop": "missing",
        "extra": "unexpected",
        "shape": "mask_decoder.iou_token.weight has shape",
        "width": "ViT width 640",
        "depth": "depth 23",
    }
    if change == "drop":
        del shapes["mask_decoder.mask_tokens.weight"]
    elif change == "extra":
        shapes["mask_decoder.extra"] = (1,)
    elif change == "shape":
        shapes["mask_decoder.iou_token.weight"] = (1, 128)
    elif change == "width":
        shapes["image_encoder.patch_embed.proj.weight"] = (640, 3, 16, 16)
    else:
        shapes = {k: v for k, v in shapes.items() if not k.startswith("image_encoder.blocks.23.")}
    with pytest.raises(BundleError, match=rf"mine\.pth.*{reasons[change]}"):
        detect_sam1_variant(shapes, "mine.pth")


def test_integer_tensors_are_refused(
    vit_b_checkpoint: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    _, state = vit_b_checkpoint
    changed = dict(state)
    changed["mask_decoder.iou_token.weight"] = changed["mask_decoder.iou_token.weight"].long()
    path = tmp_path / "ints.pth"
    torch.save(changed, path)
    with pytest.raises(BundleError, match=r"ints\.pth: tensors with a non-float dtype"):
        import_official_sam(path, tmp_path / "sam")
