"""The TensorRT path: optimisation profiles derived from the exported graphs, engine records in the
manifest, the backend's errors, and its adapters (the ONNX backend's logic around named-tensor
engines).

On the CPU (TensorRT absent), the adapters run on onnxruntime stand-ins for the engines
(`OnnxRuntimeEngine`: the engine interface of `star_edge.tensorrt_runtime.Engine` over the same
ONNX graphs the engines are built from), so everything but the TensorRT calls themselves
(`star_edge/tensorrt_engine.py`, `export/tensorrt_engines.build_engine`) runs here. The tests
marked `gpu` build real engines and compare them with onnxruntime; they skip without CUDA and
TensorRT.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from star_edge.bundle import load_bundle
from star_edge.cli import app
from star_edge.errors import BackendUnavailableError, BundleError, InvalidInputError
from star_edge.export.bundle_export import export_bundle
from star_edge.export.bundle_writer import write_manifest
from star_edge.export.tensorrt_engines import current_engine_records, described_graphs, engine_record
from star_edge.export.tensorrt_profiles import (
    ProfileSettings,
    axis_range,
    bundle_plans,
    prompt_lengths,
    reasoner_axes,
    sam_axes,
    shape_range,
)
from star_edge.export.tiny import make_tiny_bundle
from star_edge.export.tiny_reasoner import TinyDims
from star_edge.export.weight_links import materialize_graph
from star_edge.reasoner.onnx_backend import OnnxReasoner
from star_edge.reasoner.onnx_backend import read_description as read_reasoner_description
from star_edge.reasoner.tensorrt_backend import tensorrt_reasoner
from star_edge.sam.inputs import labelled_points
from star_edge.sam.onnx_backend import onnxruntime_sessions
from star_edge.sam.onnx_backend import read_description as read_sam_description
from star_edge.sam.tensorrt_backend import tensorrt_mask_decoder
from star_edge.segmenter import Segmenter
from star_edge.tensorrt_runtime import GRAPHS, Platform, detect_platform, engine_key, select_engines

torch.set_num_threads(1)

QUERY = "the red circle left of the blue square"
ANSWERS = [
    '<think>The red circle.</think><answer>[{"bbox_2d": [80, 120, 480, 560], "point_2d": [240, 320], '
    '"label": "red circle"}]</answer>',
    '<think>A cup.</think><answer>[{"bbox_2d": [400, 160, 800, 720], "point_2d": [600, 400], '
    '"label": "cup"}]</answer>',
]
INSTALL = "pip install 'star-edge[tensorrt]'"
BUILD = "star-edge export --bundle DIR --out DIR --tensorrt"
ORIN = Platform("10.3.0", (8, 7), "Orin", 0)
DESKTOP = Platform("10.3.0", (8, 6), "NVIDIA GeForce RTX 3090", 0)


class OnnxRuntimeEngine:
    """An engine stand-in: the graph's onnxruntime session behind the `Engine` interface, keeping the
    input shapes of every run."""

    def __init__(self, path: Path) -> None:
        # as `build_bundle_engines` gives a graph to TensorRT's parser: whole, its weights beside it
        whole = Path(tempfile.mkdtemp()) / path.name
        materialize_graph(path, described_graphs(path.parent)[path.name], whole)
        self.session = onnxruntime.InferenceSession(str(whole), providers=["CPUExecutionProvider"])
        self.device = torch.device("cpu")
        self.input_names = [value.name for value in self.session.get_inputs()]
        self.output_names = [value.name for value in self.session.get_outputs()]
        self.runs: list[dict[str, tuple[int, ...]]] = []

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.runs.append({name: tuple(tensor.shape) for name, tensor in feeds.items()})
        outputs = self.session.run(self.output_names, {name: tensor.numpy() for name, tensor in feeds.items()})
        return {name: torch.from_numpy(value) for name, value in zip(self.output_names, outputs)}


def _stand_ins(onnx_dir: Path) -> tuple[dict[str, OnnxRuntimeEngine], object]:
    engines: dict[str, OnnxRuntimeEngine] = {}

    def open_engine(graph: str) -> OnnxRuntimeEngine:
        engines[graph] = OnnxRuntimeEngine(onnx_dir / f"{graph}.onnx")
        return engines[graph]

    return engines, open_engine


def _image(seed: int, size: tuple[int, int] = (320, 240)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A scripted tiny Qwen3-VL bundle (deepstack inputs) with SAM, exported to ONNX in place."""
    root = tmp_path_factory.mktemp("trt") / "bundle"
    make_tiny_bundle(root, seed=2, family="qwen3_vl", scripted_answers=ANSWERS, dims=TinyDims(num_layers=1))
    export_bundle(root, root, onnx=True)
    return root


@pytest.fixture(scope="module")
def plans(exported):
    manifest = load_bundle(exported).manifest
    return bundle_plans(exported / "onnx", exported / "reasoner", manifest["reasoner"]["max_new_tokens"],
                        ProfileSettings())


def _axis_sets(root: Path, settings: ProfileSettings = ProfileSettings()) -> dict[str, list[dict]]:
    """The axis sets behind each graph's profiles (what `bundle_plans` derives them from)."""
    max_new_tokens = load_bundle(root).manifest["reasoner"]["max_new_tokens"]
    prompt = prompt_lengths(read_reasoner_description(root / "onnx"), root / "reasoner" / "tokenizer.json", settings)
    reasoner = reasoner_axes(prompt, max_new_tokens, settings)
    return {"reasoner_embed": reasoner, "reasoner_decoder": reasoner, "sam_decoder": sam_axes(settings)}


def _described(root: Path) -> dict[str, dict]:
    reasoner, sam = read_reasoner_description(root / "onnx"), read_sam_description(root / "onnx")
    return {"reasoner_vision": reasoner["vision"], "reasoner_embed": reasoner["embed"],
            "reasoner_decoder": reasoner["decoders"]["fp32"], "sam_encoder": sam["encoder"],
            "sam_decoder": sam["decoders"]["fp32"]}


def _inside(shapes: dict[str, tuple[int, ...]], profile: dict) -> bool:
    return all(all(low <= size <= high for low, size, high in zip(ranges[0], shapes[name], ranges[2]))
               and len(shapes[name]) == len(ranges[0]) for name, ranges in profile.items())


def test_engine_key_names_the_gpu_architecture_and_tensorrt_version():
    assert engine_key((8, 7), "10.3.0") == "sm_87-trt10.3.0" == ORIN.engine_key
    assert engine_key((12, 0), "10.16.2.10") == "sm_120-trt10.16.2.10"


def test_profiles_cover_exactly_the_declared_dynamic_inputs(exported, plans):
    assert set(plans) == set(GRAPHS)
    for name, graph in _described(exported).items():
        plan = plans[name]
        assert plan.onnx_file == graph["file"]
        dynamic = {t["name"]: t["shape"] for t in graph["inputs"] if any(isinstance(s, str) for s in t["shape"])}
        assert len(plan.profiles) == (0 if not dynamic else 2 if name.startswith("reasoner") else 1)
        for profile in plan.profiles:
            assert set(profile) == set(dynamic)
            for input_name, (low, opt, high) in profile.items():
                declared = dynamic[input_name]
                assert len(low) == len(opt) == len(high) == len(declared)
                for size, a, b, c in zip(declared, low, opt, high):
                    assert 0 <= a <= b <= c
                    if isinstance(size, int):
                        assert a == b == c == size
    prefill, decode = plans["reasoner_decoder"].profiles
    for which in range(3):
        for profile in (prefill, decode):
            batch, sequence = profile["inputs_embeds"][which][:2]
            past = profile["past_key.0"][which][2]
            assert profile["attention_mask"][which] == (batch, sequence + past)
            assert profile["deepstack_embeds"][which][1:3] == (batch, sequence)
        assert prefill["past_key.0"][which][0] == 1 and prefill["past_key.0"][which][2] == 0
        assert decode["inputs_embeds"][which][1] == 1
    assert [decode["inputs_embeds"][which][0] for which in range(3)] == [1, 8, 64]
    assert [plans["sam_decoder"].profiles[0]["point_coords"][which][0] for which in range(3)] == [1, 24, 64]


def test_profile_shapes_are_valid_inputs_of_the_onnx_graphs(exported, plans):
    """onnxruntime runs every graph at the min, opt and max shapes of each profile, and its outputs
    have the shapes the declared outputs take under the same axis ranges."""
    described, axis_sets = _described(exported), _axis_sets(exported)
    for name, sets in axis_sets.items():
        graph = described[name]
        session = onnxruntime_sessions("cpu", None)(exported / "onnx" / graph["file"], graph)
        for axes, profile in zip(sets, plans[name].profiles):
            for which in range(3):
                feeds = {}
                for tensor in graph["inputs"]:
                    shape = profile[tensor["name"]][which] if tensor["name"] in profile else tuple(tensor["shape"])
                    fill = np.ones if tensor["name"] in ("attention_mask", "point_labels") else np.zeros
                    feeds[tensor["name"]] = fill(shape, dtype=tensor["dtype"])
                outputs = session.run([t["name"] for t in graph["outputs"]], feeds)
                expected = [shape_range(t["shape"], axes)[which] for t in graph["outputs"]]
                assert [value.shape for value in outputs] == expected, (name, which)


def test_prompt_range_holds_real_prompts(exported, plans):
    manifest = load_bundle(exported).manifest
    reasoner = OnnxReasoner.from_dir(exported / "onnx", exported / "reasoner", manifest["reasoner"], threads=1)
    shortest, _, longest = plans["reasoner_embed"].profiles[0]["input_ids"]
    settings = ProfileSettings()
    image = _pil(_image(0))
    lengths = [reasoner.prompt_inputs(image, query).input_ids.shape[0] for query in ("a", QUERY)]
    assert shortest[1] <= min(lengths) and max(lengths) <= longest[1]
    assert longest[1] - shortest[1] == settings.max_query_tokens - 1
    decode = plans["reasoner_decoder"].profiles[1]
    assert decode["past_key.0"][2][2] >= longest[1] + reasoner.max_new_tokens - 1


def test_sam_prompts_fit_the_sam_profile(plans):
    (profile,) = plans["sam_decoder"].profiles
    low, _, high = profile["point_coords"]
    boxes, points = np.array([[10.0, 20.0, 50.0, 60.0]]), np.array([[30.0, 40.0]])
    for given in ((boxes, points), (boxes, None), (None, points)):
        coords, labels = labelled_points(*given, (100, 120), 256)
        assert low[1] <= coords.shape[1] <= high[1] and labels.shape == coords.shape[:2]


def test_axis_names_without_a_range_and_bad_settings_are_refused():
    assert axis_range("sequence + past", {"sequence": (1, 2, 3), "past": (0, 10, 20)}) == (1, 12, 23)
    with pytest.raises(BundleError, match="no range for \\['frames'\\]"):
        shape_range(["batch", "frames"], {"batch": (1, 1, 1)})
    with pytest.raises(InvalidInputError, match="opt_samples"):
        ProfileSettings(max_samples=4, opt_samples=8)
    with pytest.raises(InvalidInputError, match="positive"):
        ProfileSettings(max_prompts=0)


def test_adapters_on_stand_in_engines_equal_the_onnx_backend_and_stay_in_the_profiles(exported, plans):
    """The TensorRT reasoner and SAM (their adapters around named-tensor engines) give the ONNX
    backend's texts and masks when the engines are the same graphs on onnxruntime, and every shape
    they feed lies inside the profiles the engines are built with."""
    engines, open_engine = _stand_ins(exported / "onnx")
    manifest = load_bundle(exported).manifest
    reasoner = tensorrt_reasoner(exported / "onnx", exported / "reasoner", manifest["reasoner"], open_engine)
    mask_decoder = tensorrt_mask_decoder(exported / "onnx", open_engine, max_batch=64)
    adapted = Segmenter(load_bundle(exported), reasoner, mask_decoder)
    reference = Segmenter.from_pretrained(exported, backend="onnx")
    image = _image(1)
    for samples, seed in ((1, None), (8, 5)):
        found = adapted.segment(image, QUERY, samples=samples, seed=seed)
        expected = reference.segment(image, QUERY, samples=samples, seed=seed)
        assert [s.text for s in found.samples] == [s.text for s in expected.samples]
        assert expected.mask.any() and np.array_equal(found.mask, expected.mask)
    prepared = reasoner.prefill(_pil(image), QUERY)
    expected_prepared = reference.reasoner.prefill(_pil(image), QUERY)
    np.testing.assert_array_equal(prepared.state.logits, expected_prepared.state.logits)
    rows = reasoner.expand_cache(prepared.state, 3)
    logits, _ = reasoner.decode_step(rows, np.array([5, 9, 5]), prepared.state.last_position + 1)
    expected_logits, _ = reference.reasoner.decode_step(reference.reasoner.expand_cache(expected_prepared.state, 3),
                                                        np.array([5, 9, 5]), expected_prepared.state.last_position + 1)
    np.testing.assert_array_equal(logits, expected_logits)
    assert set(engines) == set(GRAPHS)
    described = _described(exported)
    for name, engine in engines.items():
        assert engine.runs, f"{name} never ran"
        static = {t["name"]: tuple(t["shape"]) for t in described[name]["inputs"]
                  if all(isinstance(size, int) for size in t["shape"])}
        for shapes in engine.runs:
            assert {n: shapes[n] for n in static} == static, (name, shapes)
            profiles = plans[name].profiles
            assert not profiles or any(_inside(shapes, profile) for profile in profiles), (name, shapes)
    batches = {shapes["inputs_embeds"][0] for shapes in engines["reasoner_decoder"].runs}
    assert 8 in batches and 1 in batches


def test_engines_that_are_not_the_described_graphs_are_refused(exported):
    _, open_engine = _stand_ins(exported / "onnx")

    def swapped(graph: str):
        return open_engine("reasoner_embed" if graph == "reasoner_vision" else graph)

    manifest = load_bundle(exported).manifest
    with pytest.raises(BundleError, match="build the engines again"):
        tensorrt_reasoner(exported / "onnx", exported / "reasoner", manifest["reasoner"], swapped)


def _fake_tensorrt(monkeypatch, version: str = "10.3.0") -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__=version))


def test_missing_tensorrt_names_the_install_through_the_api_and_the_cli(exported, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # importing it now raises ImportError
    with pytest.raises(BackendUnavailableError, match="tensorrt is not installed.*" + re.escape(INSTALL)):
        Segmenter.from_pretrained(exported, backend="tensorrt", device="cuda")
    with pytest.raises(BackendUnavailableError, match="tensorrt is not installed"):
        export_bundle(exported, tmp_path / "out", tensorrt=True)
    assert not (tmp_path / "out").exists(), "nothing is written before TensorRT is found"
    _pil(_image(3)).save(tmp_path / "image.png")
    for args in (["export", "--bundle", exported, "--out", tmp_path / "out", "--tensorrt"],
                 ["segment", tmp_path / "image.png", QUERY, "--bundle", exported, "--backend", "tensorrt",
                  "--device", "cuda"]):
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 2, result.output
        assert INSTALL in result.output and len(result.output.strip().splitlines()) == 1


def test_no_cuda_or_another_tensorrt_major_or_a_cpu_device_is_refused(monkeypatch):
    _fake_tensorrt(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="needs a CUDA device"):
        detect_platform("cuda")
    _fake_tensorrt(monkeypatch, "11.0.0")
    with pytest.raises(BackendUnavailableError, match="written for TensorRT 10.x"):
        detect_platform("cuda:0")
    with pytest.raises(InvalidInputError, match="CUDA device"):
        detect_platform("cpu")


@pytest.fixture(scope="module")
def with_engines(exported, plans, tmp_path_factory) -> Path:
    """The bundle plus a (fake) set of engines for DESKTOP, recorded as export records them."""
    root = tmp_path_factory.mktemp("engines") / "bundle"
    shutil.copytree(exported, root)
    manifest = load_bundle(root).manifest
    fingerprint = manifest["onnx"]["fingerprint"]
    record = engine_record(DESKTOP, "fp16", fingerprint, ProfileSettings(), plans)
    for graph in record["graphs"].values():
        (root / graph["engine"]).parent.mkdir(parents=True, exist_ok=True)
        (root / graph["engine"]).write_bytes(b"not a real engine: " + graph["engine"].encode())
    write_manifest(root, name=manifest["name"], reasoner=manifest["reasoner"], sam=manifest["sam"],
                   backends=["torch", "onnx", "tensorrt"], trained=manifest["trained"],
                   extra={"onnx": manifest["onnx"], "tensorrt": {"engines": {DESKTOP.engine_key: record}}})
    return root


def test_engines_are_recorded_per_gpu_and_version_with_sha256(with_engines):
    bundle = load_bundle(with_engines)
    assert "tensorrt" in bundle.backends
    engines = select_engines(bundle, DESKTOP)
    assert engines.key == "sm_86-trt10.3.0" and engines.precision == "fp16"
    assert (engines.max_samples, engines.max_prompts) == (64, 64)
    for graph, path in engines.files.items():
        assert path == f"tensorrt/sm_86-trt10.3.0/{graph}.engine" and len(bundle.files[path].sha256) == 64
    record = bundle.manifest["tensorrt"]["engines"][DESKTOP.engine_key]
    assert record["compute_capability"] == [8, 6] and record["tensorrt_version"] == "10.3.0"
    assert record["graphs"]["reasoner_decoder"]["onnx"] == "onnx/reasoner_decoder.onnx"


def test_a_bundle_without_engines_for_this_gpu_names_what_it_has_and_how_to_build(
        exported, with_engines, monkeypatch):
    import star_edge.tensorrt_runtime as runtime

    monkeypatch.setattr(runtime, "detect_platform", lambda device: ORIN)
    with pytest.raises(BackendUnavailableError) as raised:
        Segmenter.from_pretrained(with_engines, backend="tensorrt", device="cuda")
    message = str(raised.value)
    assert "sm_87-trt10.3.0" in message and "it has: sm_86-trt10.3.0" in message and BUILD in message
    with pytest.raises(BackendUnavailableError, match=f"it has: none.*{BUILD}"):
        Segmenter.from_pretrained(exported, backend="tensorrt", device="cuda")


def test_segmenter_loads_the_engines_of_this_gpu(with_engines, monkeypatch):
    """Segmenter.from_pretrained(backend="tensorrt") picks this platform's record and opens its
    engines by graph name (here onnxruntime stand-ins, opened from the record's engine paths)."""
    import star_edge.tensorrt_runtime as runtime

    opened = []

    def stand_in_opener(bundle, engines, platform):
        def open_engine(graph):
            opened.append(engines.files[graph])
            return OnnxRuntimeEngine(bundle.root / "onnx" / f"{graph}.onnx")
        return open_engine

    monkeypatch.setattr(runtime, "detect_platform", lambda device: DESKTOP)
    monkeypatch.setattr(runtime, "engine_opener", stand_in_opener)
    segmenter = Segmenter.from_pretrained(with_engines, backend="tensorrt", device="cuda")
    result = segmenter.segment(_image(4), QUERY, samples=1)
    assert result.samples[0].text == ANSWERS[0] and result.mask.any()
    assert sorted(opened) == sorted(f"tensorrt/sm_86-trt10.3.0/{graph}.engine" for graph in GRAPHS)


def test_export_keeps_current_engines_and_drops_stale_ones(with_engines, tmp_path):
    out = tmp_path / "copy"
    export_bundle(with_engines, out)
    copied = load_bundle(out)
    assert "tensorrt" in copied.backends and DESKTOP.engine_key in copied.manifest["tensorrt"]["engines"]
    assert select_engines(copied, DESKTOP).files == select_engines(load_bundle(with_engines), DESKTOP).files
    records = copied.manifest["tensorrt"]["engines"]
    assert current_engine_records(records, copied.manifest["onnx"]["fingerprint"]) == records
    assert current_engine_records(records, "another export") == {}
    manifest = json.loads((out / "star_edge.json").read_text())
    manifest["onnx"]["fingerprint"] = "graphs exported again"
    (out / "star_edge.json").write_text(json.dumps(manifest))
    # The edited record no longer matches the graphs: the next export drops the engines.
    export_bundle(out, out)
    rewritten = load_bundle(out)
    assert "tensorrt" not in rewritten.backends and "tensorrt" not in rewritten.manifest
    assert not (out / "tensorrt").exists()
    assert not any(path.startswith("tensorrt/") for path in rewritten.files)


@pytest.mark.gpu
def test_engines_match_onnxruntime(exported, tmp_path):
    """Real engines (fp32, TF32 off) built on this GPU give onnxruntime's greedy text and masks."""
    pytest.importorskip("tensorrt")
    out = tmp_path / "bundle"
    settings = ProfileSettings(max_samples=8, opt_samples=4, max_query_tokens=64, max_prompts=16, opt_prompts=8)
    lines = []
    export_bundle(exported, out, tensorrt=True, engine_precision="fp32", engine_settings=settings,
                  progress=lines.append)
    bundle = load_bundle(out)
    platform = detect_platform("cuda")
    assert select_engines(bundle, platform).key == platform.engine_key
    tensorrt_segmenter = Segmenter.from_pretrained(out, backend="tensorrt", device="cuda")
    onnx_segmenter = Segmenter.from_pretrained(out, backend="onnx")
    for seed in range(3):
        image = _image(seed, (400, 300))
        found = tensorrt_segmenter.segment(image, QUERY, samples=1)
        expected = onnx_segmenter.segment(image, QUERY, samples=1)
        assert [s.text for s in found.samples] == [s.text for s in expected.samples]
        union = (found.mask | expected.mask).sum()
        assert union and (found.mask & expected.mask).sum() / union >= 0.98
    export_bundle(out, out, tensorrt=True, engine_precision="fp32", engine_settings=settings, progress=lines.append)
    assert f"the TensorRT engines for {platform.engine_key} are up to date" in lines


def test_memory_budget_counts_the_exported_weights_and_a_float32_cache():
    from star_edge.export.memory_budget import KV_BYTES, reasoner_budget

    budget = reasoner_budget("Qwen2.5-VL-3B-Instruct", samples=8, max_new_tokens=1024)
    tied_head = 151936 * 2048  # Qwen2.5-VL-3B ties its output head to the embedding: held twice
    assert budget.parameters == pytest.approx(3.7546e9, rel=1e-4)
    assert budget.weights_fp16 == 2 * (budget.parameters + tied_head)
    assert budget.kv_bytes_per_token == 2 * 36 * 2 * 128 * KV_BYTES  # keys and values, layers, kv heads, head dim
    assert budget.prompt_tokens == (840 // 28) ** 2 + 128
    assert budget.kv_rows == 8 * (budget.prompt_tokens + 1024) * budget.kv_bytes_per_token
    assert budget.weights_fp16 / 2 < budget.weights_int8 < budget.weights_fp16
