"""The reasoner on ONNX (export/reasoner_onnx.py, star_edge/reasoner/onnx_backend.py) against the torch
reasoner: checked graphs, numpy preprocessing equal to the Hugging Face processor, logits and cache
within the documented tolerance, the same greedy and sampled tokens, the int8 decoder within a stated
bound, and `Segmenter(backend="onnx")` end to end with torch absent.

Two models keep the exports few (each takes ~10-20 s): a random tiny Qwen3-VL (the default family,
deepstack) whose answers end at different lengths, and a scripted tiny Qwen2.5-VL bundle (windowed
vision attention) whose answers are known, exported with SAM through `export_bundle`.
"""

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
from PIL import Image

from star_edge.bundle import load_bundle
from star_edge.errors import BackendUnavailableError, BundleError, InvalidInputError
from star_edge.export.bundle_export import export_bundle
from star_edge.export.reasoner_onnx import FLOAT32_OPS, TOLERANCE, export_reasoner_onnx
from star_edge.export.tiny import make_tiny_bundle
from star_edge.export.tiny_reasoner import TinyDims, write_tiny_reasoner
from star_edge.export.weight_links import materialize_graph
from star_edge.reasoner import sampling
from star_edge.reasoner.onnx_backend import DESCRIPTION_FILE, GRAPH_FILES, OnnxReasoner
from star_edge.reasoner.torch_backend import TorchReasoner
from star_edge.segmenter import Segmenter

torch.set_num_threads(1)

DIMS = TinyDims(num_layers=1)
MAX_NEW_TOKENS = 10
QUERIES = ("the red circle", "  what could hold water? Ünïcode \"quoted\" 42 ")
ANSWERS = [
    '<think>The red circle is left of the square.</think><answer>[{"bbox_2d": [20, 30, 120, 140], '
    '"point_2d": [60, 80], "label": "red circle"}]</answer>',
    '<think>A cup.</think><answer>[{"bbox_2d": [100, 40, 200, 180], "point_2d": [150, 100], '
    '"label": "cup"}]</answer>',
]
#: Largest |int8 logit - fp32 logit| relative to the largest |fp32 logit| (measured ~1-2 % here).
INT8_BOUND = 0.05


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


IMAGES = (_image(0, (400, 300)), _image(1, (97, 251)))


@pytest.fixture(scope="module")
def random_qwen3(tmp_path_factory) -> tuple[TorchReasoner, OnnxReasoner, Path]:
    """A random tiny Qwen3-VL, exported with int8 and fp16 decoders."""
    root = tmp_path_factory.mktemp("random_qwen3")
    manifest = write_tiny_reasoner(root / "reasoner", seed=3, family="qwen3_vl", dims=DIMS,
                                   max_new_tokens=MAX_NEW_TOKENS)
    export_reasoner_onnx(root / "reasoner", manifest, root / "onnx", variants=("fp32", "int8", "fp16"))
    reasoner = TorchReasoner.from_dir(root / "reasoner", manifest)
    return reasoner, OnnxReasoner.from_dir(root / "onnx", root / "reasoner", manifest, threads=1), root


@pytest.fixture(scope="module")
def scripted_qwen25(tmp_path_factory) -> Path:
    """A scripted tiny Qwen2.5-VL bundle with SAM, exported to ONNX by `export_bundle` in place."""
    root = tmp_path_factory.mktemp("scripted_qwen25")
    make_tiny_bundle(root, seed=1, family="qwen2_5_vl", scripted_answers=ANSWERS, dims=DIMS)
    export_bundle(root, root, onnx=True)
    return root


def test_export_writes_checked_graphs_and_declares_them(random_qwen3, scripted_qwen25, tmp_path):
    for folder, deepstack in ((random_qwen3[2] / "onnx", 1), (scripted_qwen25 / "onnx", 0)):
        description = json.loads((folder / DESCRIPTION_FILE).read_text())
        assert description["opset"] >= 17 and description["reasoner"]["deepstack_layers"] == deepstack
        assert max(value for key, value in description["verified"].items() if key != "tolerance") < TOLERANCE
        decoder = description["decoders"]["fp32"]
        names = [tensor["name"] for tensor in decoder["inputs"]]
        assert names[:3] == ["inputs_embeds", "position_ids", "attention_mask"]
        assert names[3:] == (["deepstack_embeds"] if deepstack else []) + [
            f"past_{kind}.{layer}" for layer in range(DIMS.num_layers) for kind in ("key", "value")]
        shapes = {tensor["name"]: tensor["shape"] for tensor in decoder["inputs"] + decoder["outputs"]}
        assert shapes["position_ids"] == [3, "batch", "sequence"]
        assert shapes["past_key.0"] == ["batch", 2, "past", 32] and shapes["logits"] == ["batch", description["reasoner"]["vocab_size"]]
        assert set(shapes["present_value.0"][2].split(" + ")) == {"past", "sequence"}
        vision = description["vision"]
        assert [t["shape"] for t in vision["inputs"]] == [[256, 3 * 2 * description["reasoner"]["image"]["patch_size"] ** 2]]
        assert [t["shape"] for t in vision["outputs"]] == [[64, 128]] + [[deepstack, 64, 128]] * deepstack
        for graph in [vision, description["embed"], decoder]:  # float32 weights read from the checkpoint
            assert list(graph["linked"]) == ["../reasoner/model.safetensors"]
        source_root = str(Path(sampling.__file__).resolve().parents[2]).encode()
        for graph in [vision, description["embed"], *description["decoders"].values()]:
            assert source_root not in (folder / graph["file"]).read_bytes()  # no stack traces of this machine
            whole = materialize_graph(folder / graph["file"], graph, tmp_path / graph["file"])
            onnx.checker.check_model(str(whole), full_check=True)
    bundle = json.loads((scripted_qwen25 / "star_edge.json").read_text())
    assert bundle["backends"] == ["torch", "onnx"]
    assert {f"onnx/{GRAPH_FILES['decoder']}", "onnx/sam_decoder.onnx"} <= set(bundle["files"])
    weights = sum(entry["bytes"] for path, entry in bundle["files"].items() if path.startswith("reasoner/"))
    copied = sum(entry["bytes"] for path, entry in bundle["files"].items() if path.startswith("onnx/reasoner_"))
    assert copied < 0.5 * weights  # a copy of the weights alone would be >= 1.0x


@pytest.mark.parametrize("query", QUERIES)
@pytest.mark.parametrize("image", IMAGES)
def test_numpy_preprocessing_equals_the_processor(random_qwen3, query, image):
    reasoner, onnx_reasoner, _ = random_qwen3
    ours = onnx_reasoner.prompt_inputs(image, query)
    theirs = reasoner.hf_inputs(image, query)
    assert np.array_equal(ours.input_ids, theirs["input_ids"][0].numpy())
    assert np.array_equal(ours.pixel_values, theirs["pixel_values"].numpy())
    assert np.array_equal(ours.positions, sampling.prompt_position_ids(reasoner.model, theirs)[1:, 0].numpy())
    assert ours.image_mask.sum() == 64


def test_both_backends_refuse_a_prompt_past_the_context_alike(random_qwen3):
    reasoner, onnx_reasoner, _ = random_qwen3
    context = reasoner.model.config.text_config.max_position_embeddings
    messages = []
    for call in (reasoner.hf_inputs, onnx_reasoner.prompt_inputs):
        with pytest.raises(InvalidInputError, match=f"passes the model's context of {context} tokens") as error:
            call(IMAGES[0], "\N{SLIGHTLY SMILING FACE}" * 2000)
        messages.append(str(error.value))
    assert messages[0] == messages[1]  # the same prompt length, counted by the HF processor and by ours
    prompt = len(onnx_reasoner.prompt_inputs(IMAGES[0], QUERIES[0]).input_ids)
    budgets = reasoner.max_new_tokens, onnx_reasoner.max_new_tokens
    try:
        for budget, fits in ((context - prompt, True), (context - prompt + 1, False)):
            reasoner.max_new_tokens = onnx_reasoner.max_new_tokens = budget
            for call in (reasoner.hf_inputs, onnx_reasoner.prompt_inputs):
                if fits:
                    call(IMAGES[0], QUERIES[0])
                else:
                    with pytest.raises(InvalidInputError, match=f"prompt of {prompt} tokens"):
                        call(IMAGES[0], QUERIES[0])
    finally:
        reasoner.max_new_tokens, onnx_reasoner.max_new_tokens = budgets


def test_prefill_and_batched_steps_match_torch_within_tolerance(random_qwen3):
    reasoner, onnx_reasoner, _ = random_qwen3
    state = sampling.prefill(reasoner.model, reasoner.hf_inputs(IMAGES[0], QUERIES[0]))
    prepared = onnx_reasoner.prefill(IMAGES[0], QUERIES[0])
    scale = float(state.logits.abs().max())
    np.testing.assert_allclose(prepared.state.logits, state.logits.numpy(), rtol=0, atol=TOLERANCE * scale)
    tokens = np.array([5, 900, 77], dtype=np.int64)
    cache, expected_cache = onnx_reasoner.expand_cache(prepared.state, 3), sampling.copy_rows(state.cache, 3,
                                                                                              reasoner.model.config)
    position, expected_position = prepared.state.last_position, state.last_position
    for _ in range(2):
        position, expected_position = position + 1, expected_position + 1
        logits, cache = onnx_reasoner.decode_step(cache, tokens, position)
        with torch.inference_mode():
            expected = sampling.decode_step(reasoner.model, expected_cache, torch.from_numpy(tokens), expected_position)
        np.testing.assert_allclose(logits, expected.numpy(), rtol=0, atol=TOLERANCE * scale)
        tokens = logits.argmax(-1)
    values = expected_cache.layers[-1].values.numpy()
    assert cache[-1].shape() == list(values.shape)
    np.testing.assert_allclose(cache[-1].numpy(), values, rtol=0, atol=1e-4)


def test_greedy_tokens_equal_torch(random_qwen3):
    reasoner, onnx_reasoner, _ = random_qwen3
    for image in IMAGES:
        for query in QUERIES:
            ours = onnx_reasoner.generate(image, query)
            assert ours.token_ids == reasoner.generate(image, query).token_ids
            assert len(ours.token_ids[0]) == MAX_NEW_TOKENS


def test_sampled_tokens_equal_torch_as_rows_leave_the_batch(random_qwen3):
    reasoner, onnx_reasoner, _ = random_qwen3
    # Every fifth token ends an answer here, so rows finish at different steps and leave the batch.
    ends = list(range(0, 1600, 5))
    saved = (reasoner.model.generation_config.eos_token_id, onnx_reasoner.eos_token_ids)
    reasoner.model.generation_config.eos_token_id, onnx_reasoner.eos_token_ids = ends, ends
    try:
        lengths = []
        for query, seed in zip(QUERIES, (0, 11)):
            ours = onnx_reasoner.generate(IMAGES[0], query, n=6, seed=seed)
            theirs = reasoner.generate(IMAGES[0], query, n=6, seed=seed)
            assert (ours.token_ids, ours.texts, ours.rows) == (theirs.token_ids, theirs.texts, theirs.rows)
            lengths += [len(ids) for ids in ours.token_ids]
    finally:
        reasoner.model.generation_config.eos_token_id, onnx_reasoner.eos_token_ids = saved
    assert min(lengths) < MAX_NEW_TOKENS == max(lengths), "rows should leave the batch at different steps"


def test_rows_depend_only_on_seed_and_row(random_qwen3):
    _, onnx_reasoner, _ = random_qwen3
    prepared = onnx_reasoner.prefill(IMAGES[1], QUERIES[1])
    eight = onnx_reasoner.sample(prepared, range(8), seed=5)
    assert onnx_reasoner.sample(prepared, range(4, 8), seed=5).token_ids == eight.token_ids[4:]
    assert onnx_reasoner.sample(prepared, [6, 2], seed=5).token_ids == [eight.token_ids[6], eight.token_ids[2]]
    seen = []
    stopped = onnx_reasoner.sample(prepared, range(8), seed=5, on_finished=lambda done: seen.append(done) or True)
    assert stopped.rows == [row for row, _ in seen[0]] == list(range(8)), "all rows end at max_new_tokens"


def _weight_bytes(folder: Path, graph: dict) -> int:
    """A described graph's own files plus the bytes of the tensors it reads from the checkpoint."""
    path = folder / graph["file"]
    data = path.with_name(path.name + ".data")
    linked = sum(int(np.prod(link["shape"])) * np.dtype(link["dtype"]).itemsize
                 for tensors in graph.get("linked", {}).values() for link in tensors.values())
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0) + linked


def test_int8_decoder_stays_within_the_stated_bound(random_qwen3):
    reasoner, onnx_reasoner, root = random_qwen3
    quantized = OnnxReasoner.from_dir(root / "onnx", root / "reasoner", threads=1, decoder_variant="int8")
    assert OnnxReasoner.available_variants(root / "onnx") == ["fp32", "int8", "fp16"]
    decoders = json.loads((root / "onnx" / DESCRIPTION_FILE).read_text())["decoders"]
    assert _weight_bytes(root / "onnx", decoders["int8"]) < 0.5 * _weight_bytes(root / "onnx", decoders["fp32"])
    for image in IMAGES:
        expected = onnx_reasoner.prefill(image, QUERIES[0]).state.logits
        found = quantized.prefill(image, QUERIES[0]).state.logits
        assert np.abs(found - expected).max() <= INT8_BOUND * np.abs(expected).max()


def test_fp16_decoder_keeps_the_norm_variance_and_softmax_in_float32(random_qwen3):
    """As Hugging Face computes them: x ** 2 of a Qwen hidden state overflows float16. (onnxruntime's
    CPU provider runs float16 Pow in float32 anyway, so the graph's types are what is checked here.)"""
    reasoner, _, root = random_qwen3
    decoder = onnx.load(str(root / "onnx" / GRAPH_FILES["decoder_fp16"]), load_external_data=False)
    graph = onnx.shape_inference.infer_shapes(decoder).graph
    types = {value.name: value.type.tensor_type.elem_type for value in [*graph.value_info, *graph.input, *graph.output]}
    types.update({tensor.name: tensor.data_type for tensor in graph.initializer})
    means = {output for node in graph.node if node.op_type == "ReduceMean" for output in node.output}
    kept = [node for node in graph.node
            if node.op_type in FLOAT32_OPS or (node.op_type == "Add" and means.intersection(node.input))]
    norms = 2 * DIMS.num_layers + 1 + 2 * DIMS.num_layers  # per layer 2, the final one, Qwen3's q / k norms
    assert sum(node.op_type == "ReduceMean" for node in kept) == norms
    assert sum(node.op_type == "Softmax" for node in kept) == DIMS.num_layers
    for node in kept:
        assert all(types[name] in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64) for name in node.input if name), node
    assert any(node.op_type == "MatMul" and types[node.input[1]] == onnx.TensorProto.FLOAT16 for node in graph.node)
    half = OnnxReasoner.from_dir(root / "onnx", root / "reasoner", threads=1, decoder_variant="fp16")
    state = sampling.prefill(reasoner.model, reasoner.hf_inputs(IMAGES[0], QUERIES[0]))
    found = half.prefill(IMAGES[0], QUERIES[0]).state.logits
    assert np.abs(found - state.logits.numpy()).max() <= 1e-2 * float(state.logits.abs().max())


def test_segmenter_on_onnx_equals_torch_with_torch_absent(scripted_qwen25):
    image = np.asarray(_image(2, (320, 240)))
    torch_segmenter = Segmenter.from_pretrained(scripted_qwen25, backend="torch")
    results = {}
    for samples, seed in ((1, None), (4, 3)):
        expected = torch_segmenter.segment(image, QUERIES[0], samples=samples, seed=seed)
        assert [sample.text for sample in expected.samples][0] in ANSWERS and expected.mask.any()
        results[samples] = expected
    code = f"""
import json, sys
sys.modules["torch"] = None  # any import of torch now raises ImportError
import numpy as np
from star_edge.segmenter import Segmenter
segmenter = Segmenter.from_pretrained({str(scripted_qwen25)!r}, backend="onnx")
image = np.load(sys.argv[1])
out = {{}}
for samples, seed in ((1, None), (4, 3)):
    result = segmenter.segment(image, {QUERIES[0]!r}, samples=samples, seed=seed)
    np.save(sys.argv[1] + f".{{samples}}.npy", result.mask)
    out[samples] = [sample.text for sample in result.samples]
assert not any(m.startswith(("transformers", "star_edge.export", "star_edge.train")) for m in sys.modules)
print(json.dumps(out))
"""
    path = scripted_qwen25 / "image.npy"
    np.save(path, image)
    run = subprocess.run([sys.executable, "-c", code, str(path)], check=True, capture_output=True, text=True,
                         timeout=120)
    texts = json.loads(run.stdout.strip().splitlines()[-1])
    for samples, expected in results.items():
        assert texts[str(samples)] == [sample.text for sample in expected.samples]
        mask = np.load(f"{path}.{samples}.npy")
        iou = (mask & expected.mask).sum() / (mask | expected.mask).sum()
        assert iou >= 0.98


def test_rerunning_the_export_changes_nothing(scripted_qwen25):
    manifest = (scripted_qwen25 / "star_edge.json").read_bytes()
    stamps = {path: path.stat().st_mtime_ns for path in (scripted_qwen25 / "onnx").iterdir()}
    lines = []
    export_bundle(scripted_qwen25, scripted_qwen25, onnx=True, progress=lines.append)
    assert (scripted_qwen25 / "star_edge.json").read_bytes() == manifest
    assert {path: path.stat().st_mtime_ns for path in (scripted_qwen25 / "onnx").iterdir()} == stamps
    assert "the ONNX graphs are up to date" in lines


def test_bad_inputs_and_broken_folders(random_qwen3, tmp_path):
    _, onnx_reasoner, root = random_qwen3
    with pytest.raises(InvalidInputError):
        onnx_reasoner.generate(IMAGES[0], "find <|image_pad|>")
    with pytest.raises(InvalidInputError):
        onnx_reasoner.prompt_inputs(np.zeros((8, 8, 3), np.uint8), QUERIES[0])
    with pytest.raises(InvalidInputError, match="rows"):
        onnx_reasoner.sample(onnx_reasoner.prefill(IMAGES[0], QUERIES[0]), [1, 1])
    with pytest.raises(InvalidInputError, match="decoder_variant"):
        OnnxReasoner.from_dir(root / "onnx", root / "reasoner", decoder_variant="bf16")
    with pytest.raises(InvalidInputError, match="device"):
        OnnxReasoner.from_dir(root / "onnx", root / "reasoner", device="tpu")
    with pytest.raises(BundleError, match="reasoner_onnx.json is missing"):
        OnnxReasoner.from_dir(tmp_path, root / "reasoner")
    manifest = {"family": "qwen3_vl", "frame": "pixels", "prompt_template": "star_v1", "input_size": [256, 256],
                "max_new_tokens": 4}
    with pytest.raises(BundleError, match="export the bundle again"):
        OnnxReasoner.from_dir(root / "onnx", root / "reasoner", manifest)
    copy = tmp_path / "copy"  # linked weights are read from ../reasoner: the two folders move together
    for folder in ("onnx", "reasoner"):
        shutil.copytree(root / folder, copy / folder)
    description = json.loads((copy / "onnx" / "reasoner_onnx.json").read_text())
    del description["vision"]["outputs"]
    (copy / "onnx" / "reasoner_onnx.json").write_text(json.dumps(description))
    with pytest.raises(BundleError, match="ONNX description in .*copy/onnx: a graph entry lacks 'outputs'"):
        OnnxReasoner.from_dir(copy / "onnx", copy / "reasoner")


def test_cuda_without_the_cuda_provider_names_the_install(random_qwen3):
    _, _, root = random_qwen3
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(BackendUnavailableError, match="onnxruntime-gpu"):
        OnnxReasoner.from_dir(root / "onnx", root / "reasoner", device="cuda")


def test_exporting_into_an_older_bundle_drops_the_files_the_source_does_not_list(scripted_qwen25, tmp_path):
    out = tmp_path / "copy"
    export_bundle(scripted_qwen25, out)
    stale = [out / "reasoner" / "chat_template.json", out / "sam" / "notes" / "old.txt"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    lines = []
    bundle = export_bundle(scripted_qwen25, out, progress=lines.append)
    assert not any(path.exists() for path in stale)
    assert "removed reasoner/chat_template.json, which" in " ".join(lines)
    assert set(bundle.files) == set(load_bundle(scripted_qwen25).files)
