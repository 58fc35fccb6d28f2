"""SAM on torch: the sam/ folder round trip, and batched decoding against segment_anything's own
SamPredictor (run without torchvision: the test supplies the two PIL-based functions it needs)."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sam_reference import (
    PHOTOS,
    mask_iou,
    natural_image,
    noisy_tiny_sam,
    photo,
    random_prompts,
    with_positional_noise,
)
from star_edge.errors import BackendUnavailableError, BundleError, InvalidInputError
from star_edge.export.tiny_sam import TINY_SAM_CONFIG, make_tiny_sam, write_sam_dir
from star_edge.geometry import original_to_sam, sam_preprocess_shape
from star_edge.sam import ImageEmbedding, MaskDecoder, load_sam
from star_edge.sam.inputs import labelled_points
from star_edge.sam.masks import bands, bilinear_matrix, upsample_masks, upsampling_matrices
from star_edge.sam.prompt_decoder import PromptDecoder
from star_edge.sam.official import OFFICIAL_CONFIGS, build_sam_from_config, import_segment_anything

IMAGE_SIZES = [(200, 300), (320, 180)]  # (H, W): landscape and portrait


# ---------------------------------------------------------------- references and fixtures


def _pil_functional() -> types.ModuleType:
    """The two torchvision.transforms.functional functions segment_anything's ResizeLongestSide
    uses, on PIL images exactly as torchvision applies them to a uint8 numpy image."""
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.to_pil_image = lambda array: Image.fromarray(array)
    functional.resize = lambda image, size: image.resize(size[::-1], Image.Resampling.BILINEAR)
    return functional


@pytest.fixture(scope="module")
def official_predictor() -> Iterator[type]:
    """segment_anything.predictor.SamPredictor, imported against a fake torchvision; the fake and
    the modules importing it are removed afterwards."""
    import_segment_anything()
    functional = _pil_functional()
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = functional
    torchvision = types.ModuleType("torchvision")
    torchvision.transforms = transforms
    importers = (
        "segment_anything.predictor",
        "segment_anything.utils.transforms",
        "segment_anything.utils",
    )
    present = {name for name in importers if name in sys.modules}
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "torchvision", torchvision)
        patch.setitem(sys.modules, "torchvision.transforms", transforms)
        patch.setitem(sys.modules, "torchvision.transforms.functional", functional)
        from segment_anything.predictor import SamPredictor

        yield SamPredictor
    for name in importers:
        if name not in present:
            sys.modules.pop(name, None)
            parent, _, child = name.rpartition(".")
            if parent in sys.modules and hasattr(sys.modules[parent], child):
                delattr(sys.modules[parent], child)


@pytest.fixture(scope="module")
def tiny_sam() -> torch.nn.Module:
    return noisy_tiny_sam()


@pytest.fixture(scope="module")
def tiny_decoder(tiny_sam: torch.nn.Module) -> MaskDecoder:
    return MaskDecoder.from_module(tiny_sam)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sam, config = make_tiny_sam(seed=0)
    directory = tmp_path_factory.mktemp("bundle") / "sam"
    write_sam_dir(sam, config, directory)
    return directory


def official_best_masks(
    predictor: object,
    boxes: np.ndarray | None,
    points: np.ndarray | None,
    multimask: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """One predictor.predict call per prompt (box + one positive point), best score per prompt:
    masks (K, H, W) bool, scores (K,) float32."""
    count = len(boxes) if boxes is not None else len(points)
    masks, scores = [], []
    for k in range(count):
        prompt = {"multimask_output": multimask}
        if points is not None:
            prompt |= {"point_coords": points[k : k + 1], "point_labels": np.array([1])}
        if boxes is not None:
            prompt["box"] = boxes[k]
        candidates, predicted_iou, _ = predictor.predict(**prompt)
        best = int(np.argmax(predicted_iou))
        masks.append(candidates[best])
        scores.append(predicted_iou[best])
    return np.stack(masks), np.array(scores, dtype=np.float32)


def assert_matches_official(
    decoder: MaskDecoder,
    predictor: object,
    image: np.ndarray,
    boxes: np.ndarray | None,
    points: np.ndarray | None,
    multimask: bool = True,
) -> None:
    embedding = decoder.embed(image)
    masks, scores = decoder.decode(embedding, boxes=boxes, points=points, multimask=multimask)
    predictor.set_image(image)
    expected_masks, expected_scores = official_best_masks(predictor, boxes, points, multimask)
    assert masks.shape == expected_masks.shape and masks.dtype == np.bool_
    assert scores.shape == expected_scores.shape and scores.dtype == np.float32
    assert 0.02 < expected_masks.mean() < 0.98, "degenerate reference masks prove nothing"
    for k in range(len(masks)):
        assert mask_iou(masks[k], expected_masks[k]) >= 0.99, f"prompt {k}"
    np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=1e-4)


# ---------------------------------------------------------------- sam/ folder


def test_tiny_sam_is_deterministic_per_seed_and_leaves_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    first, config = make_tiny_sam(seed=3)
    second, _ = make_tiny_sam(seed=3)
    other, _ = make_tiny_sam(seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert config == TINY_SAM_CONFIG and config is not TINY_SAM_CONFIG
    same, different = second.state_dict(), other.state_dict()
    assert all(torch.equal(tensor, same[key]) for key, tensor in first.state_dict().items())
    weight = "image_encoder.patch_embed.proj.weight"
    assert not torch.equal(first.state_dict()[weight], different[weight])
    assert 1.0e6 < sum(p.numel() for p in first.parameters()) < 1.4e6


def test_load_sam_round_trips_the_state_dict(tmp_path: Path) -> None:
    sam, config = make_tiny_sam(seed=2)
    config["mask_threshold"] = 0.25
    written = write_sam_dir(sam, config, tmp_path / "sam")
    assert [p.name for p in written] == ["config.json", "model.safetensors"]
    loaded = load_sam(tmp_path / "sam")
    assert not loaded.training and loaded.mask_threshold == 0.25
    expected, found = sam.state_dict(), loaded.state_dict()
    assert expected.keys() == found.keys()
    assert all(torch.equal(expected[key], found[key]) for key in expected)
    assert torch.equal(loaded.pixel_mean, sam.pixel_mean)
    assert torch.equal(loaded.pixel_std, sam.pixel_std)


def test_official_configs_build_the_official_architectures() -> None:
    modeling = import_segment_anything()
    import segment_anything.build_sam as build

    builders = {
        "vit_b": build.build_sam_vit_b,
        "vit_l": build.build_sam_vit_l,
        "vit_h": build.build_sam_vit_h,
    }
    for variant, builder in builders.items():
        with torch.device("meta"):
            ours, official = build_sam_from_config(OFFICIAL_CONFIGS[variant]), builder()
        assert isinstance(ours, modeling.Sam)
        ours_shapes = {k: v.shape for k, v in ours.state_dict().items()}
        assert ours_shapes == {k: v.shape for k, v in official.state_dict().items()}


@pytest.mark.parametrize("broken", ["config.json", "model.safetensors", "folder"])
def test_missing_files_name_the_file(tiny_dir: Path, tmp_path: Path, broken: str) -> None:
    directory = tmp_path / "sam"
    if broken != "folder":
        directory.mkdir()
        kept = "model.safetensors" if broken == "config.json" else "config.json"
        (directory / kept).write_bytes((tiny_dir / kept).read_bytes())
    with pytest.raises(BundleError, match=broken if broken != "folder" else str(directory)):
        load_sam(directory)


def _copy_dir(source: Path, target: Path) -> Path:
    target.mkdir()
    for name in ("config.json", "model.safetensors"):
        (target / name).write_bytes((source / name).read_bytes())
    return target


@pytest.mark.parametrize("cut", [0.5, 0.999, 0.0])
def test_truncated_weights_name_the_file(tiny_dir: Path, tmp_path: Path, cut: float) -> None:
    directory = _copy_dir(tiny_dir, tmp_path / "sam")
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(BundleError, match="model.safetensors.*truncated"):
        load_sam(directory)


def test_weights_of_another_config_name_the_file_and_tensor(tiny_dir: Path, tmp_path: Path) -> None:
    directory = _copy_dir(tiny_dir, tmp_path / "sam")
    config = json.loads((directory / "config.json").read_text())
    config["encoder_embed_dim"] = 64
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match=r"model\.safetensors.*image_encoder.*shape"):
        load_sam(directory)


@pytest.mark.parametrize("change", ["drop", "extra", "integer"])
def test_weights_with_wrong_tensors_name_the_file(
    tiny_dir: Path, tmp_path: Path, change: str
) -> None:
    directory = _copy_dir(tiny_dir, tmp_path / "sam")
    state = load_file(directory / "model.safetensors")
    token = "mask_decoder.iou_token.weight"
    if change == "drop":
        del state[token]
    elif change == "extra":
        state["mask_decoder.unused"] = torch.zeros(2)
    else:
        state[token] = state[token].to(torch.int32)
    save_file(state, directory / "model.safetensors")
    reasons = {"drop": "missing tensors", "extra": "unexpected tensors", "integer": "float dtype"}
    message = reasons[change]
    with pytest.raises(BundleError, match=rf"model\.safetensors.*{message}"):
        load_sam(directory)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{not json", "JSON"),
        (json.dumps({**TINY_SAM_CONFIG, "variant": "vit_x"}), "variant"),
        (json.dumps({**TINY_SAM_CONFIG, "extra": 1}), "unknown keys"),
        (json.dumps({**TINY_SAM_CONFIG, "patch_size": 0}), "patch_size"),
        (json.dumps({k: v for k, v in TINY_SAM_CONFIG.items() if k != "kind"}), "missing keys"),
        (json.dumps({**TINY_SAM_CONFIG, "encoder_global_attn_indexes": [4]}), "global_attn"),
        (json.dumps({**TINY_SAM_CONFIG, "pixel_std": [1.0, 0.0, 1.0]}), "pixel_std"),
    ],
)
def test_bad_config_names_the_file(tiny_dir: Path, tmp_path: Path, text: str, reason: str) -> None:
    directory = _copy_dir(tiny_dir, tmp_path / "sam")
    (directory / "config.json").write_text(text)
    with pytest.raises(BundleError, match=rf"config\.json.*{reason}"):
        load_sam(directory)


# ---------------------------------------------------------------- decoding vs SamPredictor


@pytest.mark.parametrize(("height", "width"), IMAGE_SIZES)
def test_decode_matches_official_predictor_per_prompt(
    tiny_sam: torch.nn.Module,
    tiny_decoder: MaskDecoder,
    official_predictor: type,
    height: int,
    width: int,
) -> None:
    image = natural_image(height, width, seed=height)
    boxes, points = random_prompts(height, width, count=12, seed=width)
    assert_matches_official(tiny_decoder, official_predictor(tiny_sam), image, boxes, points)


@pytest.mark.parametrize("name", PHOTOS)
def test_decode_matches_official_predictor_on_photos(
    tiny_sam: torch.nn.Module, tiny_decoder: MaskDecoder, official_predictor: type, name: str
) -> None:
    image = photo(name)
    boxes, points = random_prompts(*image.shape[:2], count=12, seed=len(name))
    assert_matches_official(tiny_decoder, official_predictor(tiny_sam), image, boxes, points)


def test_embed_matches_official_set_image(
    tiny_sam: torch.nn.Module, tiny_decoder: MaskDecoder, official_predictor: type
) -> None:
    image = natural_image(*IMAGE_SIZES[0], seed=7)
    embedding = tiny_decoder.embed(image)
    predictor = official_predictor(tiny_sam)
    predictor.set_image(image)
    assert embedding.original_size == predictor.original_size == IMAGE_SIZES[0]
    assert embedding.input_size == predictor.input_size == (171, 256)
    torch.testing.assert_close(embedding.features, predictor.features, rtol=0, atol=1e-5)


@pytest.mark.parametrize("prompt", ["box_only", "point_only", "single_output"])
def test_box_only_point_only_and_single_output_match_official(
    tiny_sam: torch.nn.Module, tiny_decoder: MaskDecoder, official_predictor: type, prompt: str
) -> None:
    height, width = IMAGE_SIZES[1]
    image = natural_image(height, width, seed=11)
    boxes, points = random_prompts(height, width, count=5, seed=12)
    predictor = official_predictor(tiny_sam)
    if prompt == "box_only":
        assert_matches_official(tiny_decoder, predictor, image, boxes, None)
    elif prompt == "point_only":
        assert_matches_official(tiny_decoder, predictor, image, None, points)
    else:
        assert_matches_official(tiny_decoder, predictor, image, boxes, points, multimask=False)


@pytest.fixture(scope="module")
def random_vit_b() -> torch.nn.Module:
    """Full-size SAM ViT-B with random weights (and random position embeddings)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return with_positional_noise(build_sam_from_config(OFFICIAL_CONFIGS["vit_b"]), seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", PHOTOS)
def test_decode_matches_official_predictor_on_full_size_vit_b(
    random_vit_b: torch.nn.Module, official_predictor: type, name: str
) -> None:
    image = photo(name)
    boxes, points = random_prompts(*image.shape[:2], count=8, seed=5)
    decoder = MaskDecoder.from_module(random_vit_b)
    assert_matches_official(decoder, official_predictor(random_vit_b), image, boxes, points)


def test_decode_runs_the_transformer_once_per_group_of_prompts(
    tiny_decoder: MaskDecoder, tiny_sam: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = natural_image(*IMAGE_SIZES[0], seed=3)
    boxes, points = random_prompts(*IMAGE_SIZES[0], count=9, seed=3)
    embedding = tiny_decoder.embed(image)
    groups: list[int] = []
    original = PromptDecoder.run_transformer

    def counting(
        self: PromptDecoder, context: object, sparse: torch.Tensor, *rest: object
    ) -> object:
        groups.append(sparse.shape[0])
        return original(self, context, sparse, *rest)

    monkeypatch.setattr(PromptDecoder, "run_transformer", counting)
    masks, scores = tiny_decoder.decode(embedding, boxes, points)
    assert tiny_decoder.max_batch >= 9 and groups == [9]
    assert masks.shape == (9, *IMAGE_SIZES[0]) and scores.shape == (9,)
    groups.clear()
    chunked = MaskDecoder.from_module(tiny_sam, max_batch=4)
    chunked_masks, chunked_scores = chunked.decode(chunked.embed(image), boxes, points)
    assert groups == [4, 4, 1]
    assert np.array_equal(chunked_masks, masks)
    np.testing.assert_allclose(chunked_scores, scores, rtol=0, atol=1e-6)


def test_prompt_decoder_outputs_equal_the_official_mask_decoder(tiny_sam: torch.nn.Module) -> None:
    """All outputs (single-mask output first, then the multimask ones) against segment_anything's
    PromptEncoder + MaskDecoder on the same prompts, for each prompt kind."""
    height, width = IMAGE_SIZES[0]
    boxes, points = random_prompts(height, width, count=6, seed=8)
    features = torch.randn(1, 64, 16, 16, generator=torch.Generator().manual_seed(8))
    decoder = PromptDecoder(tiny_sam.prompt_encoder, tiny_sam.mask_decoder)
    sam_boxes = torch.tensor(original_to_sam(boxes, (width, height), 256), dtype=torch.float32)
    sam_points = torch.tensor(original_to_sam(points, (width, height), 256), dtype=torch.float32)
    positive = (sam_points[:, None], torch.ones((6, 1), dtype=torch.int32))
    for given_boxes, given_points in ((boxes, points), (boxes, None), (None, points)):
        coords, labels = labelled_points(given_boxes, given_points, (height, width), 256)
        with torch.inference_mode():
            logits, iou = decoder(features, torch.from_numpy(coords), torch.from_numpy(labels))
            sparse, dense = tiny_sam.prompt_encoder(
                points=positive if given_points is not None else None,
                boxes=sam_boxes if given_boxes is not None else None,
                masks=None,
            )
            pe = tiny_sam.prompt_encoder.get_dense_pe()
            single = tiny_sam.mask_decoder(features, pe, sparse, dense, multimask_output=False)
            multi = tiny_sam.mask_decoder(features, pe, sparse, dense, multimask_output=True)
        assert logits.shape == (6, 4, 64, 64) and iou.shape == (6, 4)
        expected_logits = torch.cat([single[0], multi[0]], dim=1)
        torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(iou, torch.cat([single[1], multi[1]], dim=1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("given", ["boxes", "points", "both"])
def test_zero_prompts_return_empty_arrays(tiny_decoder: MaskDecoder, given: str) -> None:
    embedding = tiny_decoder.embed(natural_image(*IMAGE_SIZES[1], seed=1))
    boxes = np.zeros((0, 4)) if given != "points" else None
    points = np.zeros((0, 2)) if given != "boxes" else None
    masks, scores = tiny_decoder.decode(embedding, boxes=boxes, points=points)
    assert masks.shape == (0, *IMAGE_SIZES[1]) and masks.dtype == np.bool_
    assert scores.shape == (0,) and scores.dtype == np.float32


def test_decode_accepts_integer_coordinates(tiny_decoder: MaskDecoder) -> None:
    embedding = tiny_decoder.embed(natural_image(*IMAGE_SIZES[0], seed=2))
    boxes, points = random_prompts(*IMAGE_SIZES[0], count=3, seed=2)
    boxes, points = boxes.round(), points.round()
    as_int = tiny_decoder.decode(embedding, boxes.astype(np.int64), points.astype(np.int32))
    as_float = tiny_decoder.decode(embedding, boxes, points)
    assert np.array_equal(as_int[0], as_float[0]) and np.array_equal(as_int[1], as_float[1])


def test_from_dir_loads_the_same_model(tiny_dir: Path) -> None:
    decoder = MaskDecoder.from_dir(tiny_dir)
    reference = MaskDecoder.from_module(make_tiny_sam(seed=0)[0])
    image = natural_image(*IMAGE_SIZES[0], seed=4)
    boxes, points = random_prompts(*IMAGE_SIZES[0], count=4, seed=4)
    assert decoder.image_size == 256 and decoder.device == torch.device("cpu")
    ours = decoder.decode(decoder.embed(image), boxes, points)
    theirs = reference.decode(reference.embed(image), boxes, points)
    assert np.array_equal(ours[0], theirs[0]) and np.array_equal(ours[1], theirs[1])


def test_bfloat16_decoder_stays_close_to_float32(tiny_decoder: MaskDecoder) -> None:
    half = MaskDecoder.from_module(noisy_tiny_sam(), dtype="bfloat16")
    image = natural_image(*IMAGE_SIZES[0], seed=6)
    boxes, points = random_prompts(*IMAGE_SIZES[0], count=4, seed=6)
    embedding = half.embed(image)
    assert embedding.features.dtype == torch.bfloat16
    masks, scores = half.decode(embedding, boxes, points)
    expected_masks, expected_scores = tiny_decoder.decode(tiny_decoder.embed(image), boxes, points)
    assert scores.dtype == np.float32
    assert min(mask_iou(a, b) for a, b in zip(masks, expected_masks)) > 0.95
    np.testing.assert_allclose(scores, expected_scores, atol=0.02)


# ---------------------------------------------------------------- embedding cache


def test_embedding_cache_returns_the_same_object_for_the_same_pixels(
    tiny_sam: torch.nn.Module,
) -> None:
    decoder = MaskDecoder.from_module(tiny_sam, cache_size=2)
    image = natural_image(*IMAGE_SIZES[0], seed=21)
    first = decoder.embed(image)
    again = decoder.embed(image.copy())
    assert again is first and (decoder.cache.hits, decoder.cache.misses) == (1, 1)
    changed = image.copy()
    changed[0, 0, 0] ^= 1
    assert decoder.embed(changed) is not first
    transposed = np.ascontiguousarray(image.reshape(IMAGE_SIZES[0][1], IMAGE_SIZES[0][0], 3))
    assert decoder.embed(transposed) is not first  # same bytes, other shape
    assert len(decoder.cache) == 2 and decoder.cache.misses == 3
    recomputed = decoder.embed(image)  # evicted: least recently used of three
    assert recomputed is not first
    torch.testing.assert_close(recomputed.features, first.features, rtol=0, atol=0)


def test_cache_size_zero_disables_the_cache(tiny_sam: torch.nn.Module) -> None:
    decoder = MaskDecoder.from_module(tiny_sam, cache_size=0)
    image = natural_image(*IMAGE_SIZES[1], seed=22)
    assert decoder.embed(image) is not decoder.embed(image)
    assert len(decoder.cache) == 0
    with pytest.raises(InvalidInputError, match="cache_size"):
        MaskDecoder.from_module(tiny_sam, cache_size=-1)
    with pytest.raises(InvalidInputError, match="max_batch"):
        MaskDecoder.from_module(tiny_sam, max_batch=0)


def test_embedding_cache_is_shared_safely_by_threads(tiny_sam: torch.nn.Module) -> None:
    decoder = MaskDecoder.from_module(tiny_sam)
    image = natural_image(*IMAGE_SIZES[0], seed=23)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: decoder.embed(image), range(8)))
    assert all(result is results[0] for result in results) and len(decoder.cache) == 1


# ---------------------------------------------------------------- full-resolution masks


@pytest.mark.parametrize(
    ("low_res", "image_size", "original"),
    [
        (64, 256, (200, 300)),
        (64, 256, (320, 180)),
        (256, 1024, (400, 600)),
        (256, 1024, (37, 1000)),
    ],
)
def test_upsampling_matrices_equal_postprocess_masks(
    tiny_sam: torch.nn.Module, low_res: int, image_size: int, original: tuple[int, int]
) -> None:
    generator = torch.Generator().manual_seed(low_res + original[0])
    noise = torch.randn(3, 1, low_res + 4, low_res + 4, generator=generator)
    logits = 4.0 * torch.nn.functional.avg_pool2d(noise, 5, 1)
    input_size = sam_preprocess_shape(*original, image_size)
    tiny_sam.image_encoder.img_size = image_size
    try:
        expected = tiny_sam.postprocess_masks(logits, input_size, original)[:, 0]
    finally:
        tiny_sam.image_encoder.img_size = 256
    rows, cols = upsampling_matrices((low_res, low_res), image_size, input_size, original)
    ours = rows @ logits[:, 0, : rows.shape[1], : cols.shape[1]].numpy() @ cols.T
    np.testing.assert_allclose(ours, expected.numpy(), rtol=0, atol=1e-4)
    masks = upsample_masks(logits[:, 0].numpy(), rows, cols, 0.0)
    assert masks.shape == (3, *original) and masks.dtype == np.bool_
    assert np.mean(masks == (expected.numpy() > 0)) > 0.9999


@pytest.mark.parametrize("original", [(400, 600), (1080, 1920), (37, 1000), (3, 5)])
def test_bands_hold_every_nonzero_entry(original: tuple[int, int]) -> None:
    input_size = sam_preprocess_shape(*original, 1024)
    for matrix in upsampling_matrices((256, 256), 1024, input_size, original):
        rebuilt = np.zeros_like(matrix)
        blocks = bands(matrix)
        assert [b[0].start for b in blocks] == list(range(0, matrix.shape[0], 64))
        for outputs, inputs in blocks:
            rebuilt[outputs, inputs] = matrix[outputs, inputs]
            assert inputs.stop - inputs.start <= 64 * matrix.shape[1] // matrix.shape[0] + 3
        np.testing.assert_array_equal(rebuilt, matrix)


def test_banded_upsampling_equals_the_dense_product() -> None:
    generator = np.random.default_rng(0)
    rows = bilinear_matrix(40, 300).astype(np.float32)
    rows[64:128] = 0.0  # a block that reads nothing
    cols = bilinear_matrix(50, 170).astype(np.float32)
    logits = generator.normal(size=(5, 44, 53)).astype(np.float32)
    dense = rows @ logits[:, :40, :50] @ cols.T
    masks = upsample_masks(logits, rows, cols, 0.1)
    assert masks.shape == (5, 300, 170)
    decided = np.abs(dense - 0.1) > 1e-5
    np.testing.assert_array_equal(masks[decided], (dense > 0.1)[decided])
    assert not masks[:, 64:128].any()


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        (np.zeros((20, 30, 3), dtype=np.float32), "uint8"),
        (np.zeros((20, 30), dtype=np.uint8), "shape"),
        (np.zeros((20, 30, 4), dtype=np.uint8), "shape"),
        (np.zeros((0, 30, 3), dtype=np.uint8), "shape"),
        ([[0, 0, 0]], "numpy array"),
    ],
)
def test_embed_rejects_bad_images(tiny_decoder: MaskDecoder, image: object, reason: str) -> None:
    with pytest.raises(InvalidInputError, match=reason):
        tiny_decoder.embed(image)


def test_an_image_thinner_than_one_input_pixel_is_segmented(tiny_decoder: MaskDecoder) -> None:
    """1 x 600 at image_size 256: segment_anything's resize rounds the height to 0 and fails."""
    image = natural_image(1, 600, seed=3)
    embedding = tiny_decoder.embed(image)
    assert embedding.input_size == (1, tiny_decoder.image_size)
    masks, scores = tiny_decoder.decode(embedding, boxes=np.array([[10.0, 0.0, 200.0, 1.0]]))
    assert masks.shape == (1, 1, 600) and np.isfinite(scores).all()


def test_overlapping_upsampling_calls_restore_the_blas_threads() -> None:
    """threadpoolctl's limit restores what it saw on entry: two threads overlapping as A in, B in,
    A out, B out would leave numpy's BLAS on one thread for good."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from star_edge.sam.masks import _ONE_BLAS_THREAD

    def blas_threads() -> list[int]:
        return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        assert before and min(before) >= 2
        first, second = _ONE_BLAS_THREAD.hold(), _ONE_BLAS_THREAD.hold()
        first.__enter__()
        second.__enter__()
        assert set(blas_threads()) == {1}
        first.__exit__(None, None, None)
        assert set(blas_threads()) == {1}  # B is still inside
        second.__exit__(None, None, None)
        assert blas_threads() == before


@pytest.fixture(scope="module")
def small_embedding(tiny_decoder: MaskDecoder) -> ImageEmbedding:
    return tiny_decoder.embed(natural_image(40, 60, seed=0))


@pytest.mark.parametrize(
    ("boxes", "points", "reason"),
    [
        (None, None, "neither"),
        (np.zeros((2, 3)), None, r"boxes must have shape \(K, 4\)"),
        (np.zeros(4), None, r"boxes must have shape \(K, 4\)"),
        (None, np.zeros((2, 2, 1)), r"points must have shape \(K, 2\)"),
        (np.array([[0, 0, np.nan, 5]]), None, "boxes must be finite"),
        (None, np.array([[np.inf, 1.0]]), "points must be finite"),
        (np.zeros((1, 4), dtype=bool), None, "real numbers"),
        (None, np.array([["1", "2"]]), "real numbers"),
        ([[0, 0, 5, 5]], None, "numpy array"),
        (np.zeros((2, 4)), np.zeros((3, 2)), "same K"),
        (np.array([[0.0, 0.0, 1e39, 5.0]]), None, "fit float32"),
        (None, np.array([[5.0, -1e39]]), "fit float32"),
    ],
)
def test_decode_rejects_bad_prompts(
    tiny_decoder: MaskDecoder,
    small_embedding: ImageEmbedding,
    boxes: object,
    points: object,
    reason: str,
) -> None:
    with pytest.raises(InvalidInputError, match=reason):
        tiny_decoder.decode(small_embedding, boxes=boxes, points=points)


def test_decode_rejects_foreign_embeddings(
    tiny_decoder: MaskDecoder, small_embedding: ImageEmbedding
) -> None:
    boxes = np.array([[1.0, 1.0, 20.0, 20.0]])
    with pytest.raises(InvalidInputError, match="ImageEmbedding"):
        tiny_decoder.decode(small_embedding.features, boxes=boxes)
    sizes = (small_embedding.original_size, small_embedding.input_size)
    wrong = ImageEmbedding(torch.zeros(1, 32, 16, 16), *sizes)
    with pytest.raises(InvalidInputError, match="do not come from this decoder"):
        tiny_decoder.decode(wrong, boxes=boxes)
    with pytest.raises(InvalidInputError, match="multimask"):
        tiny_decoder.decode(small_embedding, boxes=boxes, multimask="yes")


def test_bad_dtype_or_device_is_rejected(tiny_sam: torch.nn.Module) -> None:
    with pytest.raises(InvalidInputError, match="dtype"):
        MaskDecoder.from_module(tiny_sam, dtype="float64")
    with pytest.raises(InvalidInputError, match="device"):
        MaskDecoder.from_module(tiny_sam, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="CUDA"):
            MaskDecoder.from_module(tiny_sam, device="cuda")


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cuda_decoder_matches_cpu(tiny_decoder: MaskDecoder, dtype: str) -> None:
    cuda = MaskDecoder.from_module(noisy_tiny_sam(), device="cuda", dtype=dtype)
    image = natural_image(*IMAGE_SIZES[1], seed=9)
    boxes, points = random_prompts(*IMAGE_SIZES[1], count=8, seed=9)
    masks, scores = cuda.decode(cuda.embed(image), boxes, points)
    expected_masks, expected_scores = tiny_decoder.decode(tiny_decoder.embed(image), boxes, points)
    floor, tolerance = (0.99, 1e-3) if dtype == "float32" else (0.95, 0.02)
    assert min(mask_iou(a, b) for a, b in zip(masks, expected_masks)) >= floor
    np.testing.assert_allclose(scores, expected_scores, atol=tolerance)


# ---------------------------------------------------------------- import hygiene


def test_import_star_edge_does_not_import_torch() -> None:
    code = (
        "import sys, star_edge, star_edge.sam, star_edge.sam.official; "
        "assert 'torch' not in sys.modules, 'torch'; "
        "assert not any(m.startswith(('star_edge.export', 'star_edge.train')) for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
