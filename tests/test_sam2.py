"""SAM 2.1: official checkpoints (sam2.1_hiera_*.pt) into a bundle's sam/ folder, and our torch-only
SAM 2 against the `sam2` package's own SAM2ImagePredictor, prompt by prompt, on the photos in
examples/ (the predictor runs without torchvision: the test supplies the three transforms it uses).

The reference model is a hiera tiny built by the sam2 package's own builder from its own config,
with random weights, saved as the official files are ({"model": state dict}) and loaded back by
that builder. Tests that need the sam2 package skip when it is absent.
"""

from __future__ import annotations

import json
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode

from sam_reference import mask_iou, natural_image, noisy_tiny_sam, photo, random_prompts
from star_edge.errors import BackendUnavailableError, BundleError, InvalidInputError
from star_edge.export.sam_checkpoints import detect_sam2_variant, import_official_sam
from star_edge.sam import MaskDecoder, load_sam
from star_edge.sam.checkpoints import read_sam_config
from star_edge.sam.sam2_config import SAM2_CONFIGS, VARIANTS
from star_edge.sam.sam2_model import STABILITY_THRESHOLD, build_sam2_from_config, select_outputs

SAM2_MISSING = (
    "the sam2 package (SAM 2's official reference) is not installed: pip install hydra-core iopath "
    "&& SAM2_BUILD_CUDA=0 pip install --no-deps --no-build-isolation sam2==1.1.0"
)
OFFICIAL_YAML = {
    "hiera_tiny": "sam2.1_hiera_t.yaml",
    "hiera_small": "sam2.1_hiera_s.yaml",
    "hiera_base_plus": "sam2.1_hiera_b+.yaml",
    "hiera_large": "sam2.1_hiera_l.yaml",
}
TINY_CONFIG_NAME = "configs/sam2.1/sam2.1_hiera_t.yaml"
pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    # SAM2Transforms scripts its Resize + Normalize with torch.jit.script, deprecated in torch 2.13
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
]
PROMPTS = 8


# ---------------------------------------------------------------- the official reference


class _LinspaceOnCpu(TorchFunctionMode):
    """Hiera's constructor reads its drop-path schedule with `.item()`, which meta tensors refuse:
    build that one schedule on the CPU, everything else on the meta device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = dict(kwargs or {})
        if func is torch.linspace:
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def official_meta_model(variant: str) -> torch.nn.Module:
    """The sam2 package's SAM2Base for a variant, from its own SAM 2.1 yaml, on the meta device."""
    sam2 = pytest.importorskip("sam2", reason=SAM2_MISSING)
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    configs = Path(sam2.__file__).parent / "configs" / "sam2.1"
    config = OmegaConf.load(configs / OFFICIAL_YAML[variant])
    with torch.device("meta"), _LinspaceOnCpu():
        return instantiate(config.model, _recursive_=True)


def our_shapes(variant: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of our `Sam2Image` for an official variant (built on the meta device)."""
    with torch.device("meta"):
        state = build_sam2_from_config(SAM2_CONFIGS[variant]).state_dict()
    return {key: tuple(tensor.shape) for key, tensor in state.items()}


class _ToTensor:
    """torchvision.transforms.ToTensor on an (H, W, 3) uint8 array: (3, H, W) float32 / 255."""

    def __call__(self, picture: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(picture.transpose(2, 0, 1).copy()).float().div(255)


class _Resize(torch.nn.Module):
    """torchvision.transforms.Resize((h, w)) on a float (3, H, W) tensor: bilinear,
    align_corners=False and antialias=True (torchvision's default for tensors since 0.17)."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = [int(size[0]), int(size[1])]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        resized = torch.nn.functional.interpolate(
            image[None], size=self.size, mode="bilinear", align_corners=False, antialias=True
        )
        return resized[0]


class _Normalize(torch.nn.Module):
    """torchvision.transforms.Normalize(mean, std) on a (3, H, W) tensor."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.mean = [float(v) for v in mean]
        self.std = [float(v) for v in std]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=image.dtype, device=image.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=image.dtype, device=image.device).view(-1, 1, 1)
        return (image - mean) / std


@pytest.fixture(scope="module")
def official_predictor() -> Iterator[type]:
    """sam2.sam2_image_predictor.SAM2ImagePredictor, imported against a fake torchvision; the
    fake and the modules that imported it are removed afterwards."""
    pytest.importorskip("sam2.build_sam", reason=SAM2_MISSING)
    transforms = types.ModuleType("torchvision.transforms")
    transforms.ToTensor, transforms.Resize, transforms.Normalize = _ToTensor, _Resize, _Normalize
    torchvision = types.ModuleType("torchvision")
    torchvision.transforms = transforms
    importers = ("sam2.sam2_image_predictor", "sam2.utils.transforms")
    present = {name for name in importers if name in sys.modules}
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "torchvision", torchvision)
        patch.setitem(sys.modules, "torchvision.transforms", transforms)
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        yield SAM2ImagePredictor
    for name in importers:
        if name not in present:
            sys.modules.pop(name, None)
            parent, _, child = name.rpartition(".")
            if parent in sys.modules and hasattr(sys.modules[parent], child):
                delattr(sys.modules[parent], child)


def _make_prompt_sensitive(model: torch.nn.Module, seed: int) -> None:
    """Turn the official random initialisation into a harder test: random Hiera position
    embeddings (zero at init), prompt position encodings of 8x the frequency (a point moved by a
    few pixels changes the masks), and a single-mask output 30x as sharp (so that some prompts
    keep it and others fall back to a multimask output when multimask is off)."""
    generator = torch.Generator().manual_seed(seed)
    trunk = model.image_encoder.trunk
    with torch.no_grad():
        for parameter in (trunk.pos_embed, trunk.pos_embed_window):
            parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
        model.sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.mul_(8.0)
        single = model.sam_mask_decoder.output_hypernetworks_mlps[0].layers[-1]
        single.weight.mul_(30.0)
        single.bias.mul_(30.0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hiera tiny from the sam2 package's builder, seeded random weights, saved as the official
    sam2.1_hiera_tiny.pt is: {"model": state dict}, video-memory modules included."""
    build = pytest.importorskip("sam2.build_sam", reason=SAM2_MISSING)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build.build_sam2(TINY_CONFIG_NAME, ckpt_path=None, device="cpu")
    _make_prompt_sensitive(model, seed=1)
    path = tmp_path_factory.mktemp("pt") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def official_model(checkpoint: Path) -> torch.nn.Module:
    """The checkpoint loaded back by the sam2 package's own builder (strict, as it loads the
    published files), with its default image post-processing."""
    from sam2.build_sam import build_sam2

    return build_sam2(TINY_CONFIG_NAME, ckpt_path=str(checkpoint), device="cpu")


@pytest.fixture(scope="module")
def sam_dir(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bundle") / "sam"
    import_official_sam(checkpoint, directory)
    return directory


@pytest.fixture(scope="module")
def decoder(sam_dir: Path) -> MaskDecoder:
    return MaskDecoder.from_dir(sam_dir)


def _enlarged(image: np.ndarray, factor: int) -> np.ndarray:
    """A photo made `factor` times larger (bicubic), so that the 1024 x 1024 input shrinks one of
    its sides: the antialiased resize is then not the identity of plain bilinear."""
    height, width = image.shape[:2]
    size = (width * factor, height * factor)
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))


@pytest.fixture(scope="module")
def scenes(decoder: MaskDecoder, official_model: torch.nn.Module, official_predictor: type) -> Any:
    """name -> (image, our embedding, an official predictor with that image set), built once."""
    built: dict[str, tuple[np.ndarray, Any, Any]] = {}

    def scene(name: str) -> tuple[np.ndarray, Any, Any]:
        if name not in built:
            image = _enlarged(photo("chelsea.jpg"), 3) if name == "chelsea_x3" else photo(name)
            predictor = official_predictor(official_model)
            predictor.set_image(image)
            built[name] = (image, decoder.embed(image), predictor)
        return built[name]

    return scene


def official_best_masks(
    predictor: Any, boxes: np.ndarray | None, points: np.ndarray | None, multimask: bool
) -> tuple[np.ndarray, np.ndarray]:
    """One predictor.predict call per prompt (box and/or one positive point), best score per
    prompt: masks (K, H, W) bool, scores (K,) float32."""
    count = len(boxes) if boxes is not None else len(points)
    masks, scores = [], []
    for k in range(count):
        prompt: dict[str, Any] = {"multimask_output": multimask}
        if points is not None:
            prompt |= {"point_coords": points[k : k + 1], "point_labels": np.array([1])}
        if boxes is not None:
            prompt["box"] = boxes[k]
        candidates, predicted_iou, _ = predictor.predict(**prompt)
        best = int(np.argmax(predicted_iou))
        masks.append(candidates[best] > 0.5)
        scores.append(predicted_iou[best])
    return np.stack(masks), np.array(scores, dtype=np.float32)


def assert_matches_official(
    decoder: MaskDecoder,
    scene: tuple[np.ndarray, Any, Any],
    boxes: np.ndarray | None,
    points: np.ndarray | None,
    multimask: bool = True,
) -> None:
    """Our batched decode vs the official predictor prompt by prompt (the IoUs are printed)."""
    image, embedding, predictor = scene
    masks, scores = decoder.decode(embedding, boxes=boxes, points=points, multimask=multimask)
    expected_masks, expected_scores = official_best_masks(predictor, boxes, points, multimask)
    assert masks.shape == expected_masks.shape == (len(scores), *image.shape[:2])
    assert masks.dtype == np.bool_ and scores.dtype == np.float32
    assert 0.02 < expected_masks.mean() < 0.98, "degenerate reference masks prove nothing"
    ious = [mask_iou(ours, theirs) for ours, theirs in zip(masks, expected_masks)]
    print(f"mask IoU per prompt: {[round(iou, 6) for iou in ious]}")
    assert min(ious) >= 0.99, ious
    np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=1e-4)


# ---------------------------------------------------------------- configs and variants


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_config_matches_the_official_yaml(variant: str) -> None:
    official = official_meta_model(variant)
    trunk = official.image_encoder.trunk
    config = SAM2_CONFIGS[variant]
    ends = trunk.stage_ends
    assert config["hiera_embed_dim"] == trunk.patch_embed.proj.out_channels
    assert config["hiera_num_heads"] == trunk.blocks[0].attn.num_heads
    assert config["hiera_stages"] == [ends[0] + 1] + [b - a for a, b in zip(ends[:-1], ends[1:])]
    assert config["hiera_global_attn_blocks"] == list(trunk.global_att_blocks)
    assert config["hiera_window_spec"] == list(trunk.window_spec)
    assert config["hiera_pos_embed_size"] == list(trunk.pos_embed.shape[2:])
    assert config["image_size"] == official.image_size
    with torch.device("meta"):
        ours = build_sam2_from_config(config).image_encoder.trunk
    assert [b.window_size for b in ours.blocks] == [b.window_size for b in trunk.blocks]


@pytest.mark.parametrize("variant", VARIANTS)
def test_detects_each_official_variant_and_keeps_its_image_path(variant: str) -> None:
    official = {key: tuple(t.shape) for key, t in official_meta_model(variant).state_dict().items()}
    assert detect_sam2_variant(official) == variant
    ours = our_shapes(variant)
    assert all(official[key] == shape for key, shape in ours.items())
    dropped = {key.split(".")[0] for key in official.keys() - ours.keys()}
    assert "image_encoder" not in dropped and "memory_attention" in dropped


# ---------------------------------------------------------------- import and loading


def test_imports_an_official_checkpoint_into_a_loadable_sam_folder(
    checkpoint: Path, official_model: torch.nn.Module, tmp_path: Path
) -> None:
    section = import_official_sam(checkpoint, tmp_path / "bundle" / "sam")
    assert section == {"kind": "sam2", "variant": "hiera_tiny", "path": "sam", "image_size": 1024}
    config = json.loads((tmp_path / "bundle" / "sam" / "config.json").read_text())
    assert config == SAM2_CONFIGS["hiera_tiny"]
    loaded = load_sam(tmp_path / "bundle" / "sam").state_dict()
    official = official_model.state_dict()
    assert loaded.keys() < official.keys()
    assert all(torch.equal(loaded[key], official[key]) for key in loaded)
    assert MaskDecoder.from_dir(tmp_path / "bundle" / "sam").image_size == 1024


def test_export_accepts_a_sam2_pt_file(checkpoint: Path, tmp_path: Path) -> None:
    from star_edge.export.merge import _sam_section

    section = _sam_section(checkpoint, tmp_path / "sam")
    assert section == {"kind": "sam2", "variant": "hiera_tiny", "path": "sam", "image_size": 1024}
    assert read_sam_config(tmp_path / "sam") == SAM2_CONFIGS["hiera_tiny"]


def test_onnx_export_of_a_sam2_folder_says_it_is_not_available(sam_dir: Path, tmp_path: Path) -> None:
    from star_edge.export.sam_onnx import export_sam_onnx

    with pytest.raises(BackendUnavailableError, match="SAM 1 models only.*sam2 model .hiera_tiny."):
        export_sam_onnx(sam_dir, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


@pytest.mark.parametrize("cut", [0.0, 0.5, 0.99])
def test_a_truncated_file_names_the_file(tmp_path: Path, cut: float) -> None:
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": {"image_encoder.trunk.pos_embed": torch.zeros(1, 96, 7, 7)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(BundleError, match=r"hiera_tiny\.pt is not a readable PyTorch checkpoint"):
        import_official_sam(path, tmp_path / "sam")
    assert not (tmp_path / "sam" / "model.safetensors").exists()


def test_a_file_of_neither_family_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"model": {"weight": torch.zeros(2)}}, path)
    with pytest.raises(BundleError, match=r"other\.pt is not a SAM 1 or SAM 2 state dict"):
        import_official_sam(path, tmp_path / "sam")


def _tiny_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of an official hiera tiny file: our image path plus video-memory tensors."""
    memory = {"memory_encoder.out_proj.weight": (64, 256, 1, 1), "no_obj_embed_spatial": (1, 64)}
    return our_shapes("hiera_tiny") | memory


@pytest.mark.parametrize("change", ["drop", "extra", "shape", "width", "stages"])
def test_layouts_of_no_official_variant_are_refused(change: str) -> None:
    shapes = _tiny_layout()
    reasons = {
        "drop": "missing",
        "extra": "unexpected",
        "shape": "sam_mask_decoder.iou_token.weight has shape",
        "width": "Hiera width 80",
        "stages": r"stages \[1, 2, 6, 2\]",
    }
    if change == "drop":
        del shapes["sam_mask_decoder.obj_score_token.weight"]
    elif change == "extra":
        shapes["sam_mask_decoder.extra"] = (1,)
    elif change == "shape":
        shapes["sam_mask_decoder.iou_token.weight"] = (1, 128)
    elif change == "width":
        shapes["image_encoder.trunk.patch_embed.proj.weight"] = (80, 3, 7, 7)
    else:
        # drop block 9 (the last of stage 3) and renumber blocks 10 and 11 to 9 and 10
        kept = {k: v for k, v in shapes.items() if ".trunk.blocks.9." not in k}
        renumbered = {"blocks.10.": "blocks.9.", "blocks.11.": "blocks.10."}
        pattern = re.compile(r"blocks\.1[01]\.")
        shapes = {pattern.sub(lambda m: renumbered[m.group(0)], k): v for k, v in kept.items()}
    with pytest.raises(BundleError, match=rf"mine\.pt.*{reasons[change]}"):
        detect_sam2_variant(shapes, "mine.pt")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"variant": "hiera_huge"}, "variant"),
        ({"image_size": 1000}, "multiple of 32"),
        ({"hiera_stages": [1, 2, 7]}, "hiera_stages"),
        ({"hiera_global_attn_blocks": [12]}, "hiera_global_attn_blocks"),
        ({"hiera_num_heads": 5}, "hiera_num_heads"),
        ({"pixel_std": [0.2, 0.0, 0.2]}, "pixel_std"),
        ({"extra": 1}, "unknown keys"),
    ],
)
def test_bad_sam2_config_names_the_file(tmp_path: Path, change: dict, reason: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**SAM2_CONFIGS["hiera_tiny"], **change}))
    with pytest.raises(BundleError, match=rf"config\.json.*SAM 2 config.*{reason}"):
        read_sam_config(tmp_path)


# ---------------------------------------------------------------- decoding vs SAM2ImagePredictor


@pytest.mark.parametrize("name", ["coffee.jpg", "chelsea_x3"])
def test_decode_matches_official_predictor_per_prompt(
    decoder: MaskDecoder, scenes: Any, name: str
) -> None:
    scene = scenes(name)
    boxes, points = random_prompts(*scene[0].shape[:2], count=PROMPTS, seed=5)
    assert_matches_official(decoder, scene, boxes, points)


def test_embed_matches_official_set_image(decoder: MaskDecoder, scenes: Any) -> None:
    image, embedding, predictor = scenes("chelsea_x3")
    assert embedding.original_size == image.shape[:2] and embedding.input_size == (1024, 1024)
    features = predictor._features
    torch.testing.assert_close(embedding.features, features["image_embed"], rtol=0, atol=1e-5)
    for ours, theirs in zip(embedding.high_res, features["high_res_feats"], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("prompt", ["box_only", "point_only", "single_output"])
def test_box_only_point_only_and_single_output_match_official(
    decoder: MaskDecoder, scenes: Any, prompt: str
) -> None:
    scene = scenes("coffee.jpg")
    boxes, points = random_prompts(*scene[0].shape[:2], count=5, seed=12)
    if prompt == "box_only":
        assert_matches_official(decoder, scene, boxes, None)
    elif prompt == "point_only":
        assert_matches_official(decoder, scene, None, points)
    else:
        assert_matches_official(decoder, scene, boxes, points, multimask=False)


def test_decode_groups_of_prompts_give_the_same_masks(
    sam_dir: Path, decoder: MaskDecoder, scenes: Any
) -> None:
    image, embedding, _ = scenes("coffee.jpg")
    boxes, points = random_prompts(*image.shape[:2], count=5, seed=3)
    chunked = MaskDecoder.from_dir(sam_dir, max_batch=2)
    assert decoder.max_batch == 4 and chunked.max_batch == 2
    masks, scores = decoder.decode(embedding, boxes, points)
    chunked_masks, chunked_scores = chunked.decode(embedding, boxes, points)
    assert min(mask_iou(a, b) for a, b in zip(masks, chunked_masks)) >= 0.999
    np.testing.assert_allclose(chunked_scores, scores, rtol=0, atol=1e-6)


def test_bfloat16_decoder_stays_close_to_float32(
    sam_dir: Path, decoder: MaskDecoder, scenes: Any
) -> None:
    image, embedding, _ = scenes("coffee.jpg")
    boxes, points = random_prompts(*image.shape[:2], count=4, seed=6)
    half = MaskDecoder.from_dir(sam_dir, dtype="bfloat16")
    half_embedding = half.embed(image)
    assert {t.dtype for t in (half_embedding.features, *half_embedding.high_res)} == {torch.bfloat16}
    masks, scores = half.decode(half_embedding, boxes, points)
    expected_masks, expected_scores = decoder.decode(embedding, boxes, points)
    assert scores.dtype == np.float32
    assert min(mask_iou(a, b) for a, b in zip(masks, expected_masks)) > 0.98
    np.testing.assert_allclose(scores, expected_scores, atol=0.01)


def test_select_outputs_falls_back_to_the_best_multimask_output_when_unstable() -> None:
    logits = torch.full((3, 4, 8, 8), -5.0)
    logits[:, :, :4] = 5.0  # every output: a sharp half mask (stability 1)
    logits[1, 0, 4, :] = 0.0  # prompt 1: 8 of 40 pixels inside +-delta -> stability 0.8
    iou = torch.tensor([[0.9, 0.1, 0.7, 0.2], [0.9, 0.1, 0.2, 0.6], [0.1, 0.3, 0.3, 0.9]])
    assert 0.8 < STABILITY_THRESHOLD
    assert select_outputs(logits, iou, multimask=True).tolist() == [2, 3, 3]
    assert select_outputs(logits, iou, multimask=False).tolist() == [0, 3, 0]


def test_a_sam1_embedding_is_refused(decoder: MaskDecoder) -> None:
    sam1 = MaskDecoder.from_module(noisy_tiny_sam())
    embedding = sam1.embed(natural_image(40, 60, seed=0))
    with pytest.raises(InvalidInputError, match="do not come from this decoder"):
        decoder.decode(embedding, boxes=np.array([[1.0, 1.0, 20.0, 20.0]]))


# ---------------------------------------------------------------- a bundle with SAM 2.1


def test_segmenter_runs_a_bundle_with_a_sam2_folder(
    checkpoint: Path, scenes: Any, tmp_path: Path
) -> None:
    from star_edge.export.bundle_writer import write_manifest
    from star_edge.export.merge import _sam_section
    from star_edge.export.tiny import make_tiny_bundle
    from star_edge.segmenter import Segmenter

    answer = (
        '<think>A cup holds coffee.</think><answer>[{"bbox_2d": [40, 60, 150, 180], '
        '"point_2d": [95, 120], "label": "cup"}]</answer>'
    )
    root = tmp_path / "bundle"
    make_tiny_bundle(root, seed=0, family="qwen2_5_vl", scripted_answers=[answer])
    manifest = json.loads((root / "star_edge.json").read_text())
    sam = _sam_section(checkpoint, root / "sam")
    write_manifest(root, name="tiny-sam2", reasoner=manifest["reasoner"], sam=sam)
    image, _, predictor = scenes("coffee.jpg")
    with Segmenter.from_pretrained(root) as segmenter:
        result = segmenter.segment(image, "what holds coffee?", samples=1)
    assert [o.label for o in result.objects] == ["cup"]
    found = result.objects[0]
    box, point = np.array([found.box], dtype=np.float64), np.array([found.point], dtype=np.float64)
    expected, _ = official_best_masks(predictor, box, point, multimask=True)
    assert mask_iou(found.mask, expected[0]) >= 0.99
