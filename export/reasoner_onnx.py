"""Export a bundle's reasoner to ONNX: vision tower, token embedding, decoder with KV cache, the
decoder's int8 / fp16 variants, and the description the runtime reads.

Files written into the onnx/ folder (graphs in `reasoner_graphs`; names and format read by
`star_edge.reasoner.onnx_backend`), each graph with its own weights (those not linked to the
checkpoint) in `<file>.data`:

    reasoner_vision.onnx        pixel_values -> image_features [, deepstack_features]
    reasoner_embed.onnx         input_ids -> inputs_embeds
    reasoner_decoder.onnx       fp32 decoder: inputs_embeds, position_ids, attention_mask,
                                [deepstack_embeds], past_key.i / past_value.i -> logits,
                                present_key.i / present_value.i
    reasoner_decoder_int8.onnx  matrix-product weights int8, activations quantised per run
                                (onnxruntime's dynamic quantisation)
    reasoner_decoder_fp16.onnx  float16 weights and compute, float32 inputs and outputs (for GPUs)
    reasoner_onnx.json          the graphs (inputs and outputs with their dynamic axes named), the
                                prompt around the query, the image layout, the token ids, the
                                verification result and the fingerprint of what was exported

The graphs come from torch.onnx.export (the torch.export-based exporter) at opset 18 and are checked
with onnx.checker. By default the weights that are tensors of the checkpoint (as they are or
transposed) are then read from its safetensors at load instead of being copied into the `.data`
files (`export.weight_links`); the description lists them. Verification runs a probe (an image
and a query) through onnxruntime and through the torch reasoner: the numpy preprocessing must give
the processor's tokens, pixels and positions exactly, and the fp32 graphs the torch outputs within
`TOLERANCE` (max |difference| relative to the largest |value| of the output, at least 1).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import PIL.Image
import torch

from star_edge.errors import BundleError, InvalidInputError
from star_edge.export.onnx_files import OPSET, drop_source_locations, graph_description, quiet_exporter
from star_edge.export.reasoner_graphs import DecoderGraph, EmbedGraph, VisionGraph, packed_attention
from star_edge.export.weight_links import link_graphs
from star_edge.reasoner import build_messages, sampling
from star_edge.reasoner.onnx_backend import (
    DECODER_VARIANTS,
    DESCRIPTION_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    GRAPH_FILES,
    OnnxReasoner,
)
from star_edge.reasoner.preprocess import ImageLayout, PromptText
from star_edge.reasoner.torch_backend import TorchReasoner

#: Largest max |onnx - torch| of an fp32 graph output, relative to max(1, max |torch value|).
TOLERANCE = 1e-4
#: Stands for the query while the chat template is rendered at export.
QUERY_PLACEHOLDER = "<<star-edge-query>>"
PROBE_QUERY = "the red circle left of the blue square"
_MAX_AXIS = 1 << 20


def _probe_image(size: tuple[int, int]) -> PIL.Image.Image:
    """A fixed noise image of another size than the input (so resizing is exercised)."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(size[1] + 17, size[0] + 31, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def _save(program: Any, path: Path) -> None:
    program.save(str(path), external_data=True)


def _export_vision(reasoner: TorchReasoner, grid: tuple[int, int, int], pixel_values: torch.Tensor, path: Path) -> None:
    graph = VisionGraph(reasoner.model, grid).eval()
    outputs = ["image_features"] + (["deepstack_features"] if graph.deepstack_layers else [])
    with packed_attention(reasoner.model.model.visual):
        program = torch.onnx.export(graph, (pixel_values,), dynamo=True, opset_version=OPSET,
                                    input_names=["pixel_values"], output_names=outputs, verbose=False)
    _save(program, path)


def _export_embed(reasoner: TorchReasoner, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=_MAX_AXIS)
    sequence = torch.export.Dim("sequence", min=1, max=_MAX_AXIS)
    program = torch.onnx.export(
        EmbedGraph(reasoner.model).eval(), (torch.zeros((2, 3), dtype=torch.int64),), dynamo=True,
        opset_version=OPSET, input_names=["input_ids"], output_names=["inputs_embeds"],
        dynamic_shapes={"input_ids": {0: batch, 1: sequence}}, verbose=False,
    )
    _save(program, path)


def _decoder_names(layers: int, deepstack: bool) -> tuple[list[str], list[str]]:
    """(input names, output names) of the decoder graph."""
    cache = [f"{kind}.{layer}" for layer in range(layers) for kind in ("key", "value")]
    inputs = ["inputs_embeds", "position_ids", "attention_mask"] + (["deepstack_embeds"] if deepstack else [])
    return inputs + [f"past_{name}" for name in cache], ["logits"] + [f"present_{name}" for name in cache]


def _export_decoder(reasoner: TorchReasoner, path: Path) -> None:
    graph = DecoderGraph(reasoner.model).eval()
    config = graph.text.config
    layers, heads = config.num_hidden_layers, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    batch, sequence, past = 2, 3, 4
    example = [
        torch.zeros((batch, sequence, config.hidden_size)),
        torch.zeros((3, batch, sequence), dtype=torch.int64),
        torch.ones((batch, past + sequence), dtype=torch.int64),
    ]
    if graph.deepstack_layers:
        example.append(torch.zeros((graph.deepstack_layers, batch, sequence, config.hidden_size)))
    example += [torch.zeros((batch, heads, past, head_dim)) for _ in range(2 * layers)]
    batch_dim = torch.export.Dim("batch", min=1, max=_MAX_AXIS)
    sequence_dim = torch.export.Dim("sequence", min=1, max=_MAX_AXIS)
    past_dim = torch.export.Dim("past", min=0, max=_MAX_AXIS)
    shapes = [{0: batch_dim, 1: sequence_dim}, {1: batch_dim, 2: sequence_dim}, {0: batch_dim, 1: torch.export.Dim.DYNAMIC}]
    if graph.deepstack_layers:
        shapes.append({1: batch_dim, 2: sequence_dim})
    shapes += [{0: batch_dim, 2: past_dim}] * (2 * layers)
    inputs, outputs = _decoder_names(layers, bool(graph.deepstack_layers))
    program = torch.onnx.export(graph, tuple(example), dynamo=True, opset_version=OPSET, input_names=inputs,
                                output_names=outputs, dynamic_shapes=(*shapes[:3], tuple(shapes[3:])),
                                verbose=False)
    mask = next(value for value in program.model.graph.inputs if value.name == "attention_mask")
    present = next(value for value in program.model.graph.outputs if value.name == "present_key.0")
    mask.shape = type(mask.shape)([mask.shape[0], present.shape[2]])  # name the axis "past + sequence"
    _save(program, path)


def _write_int8(source: Path, target: Path) -> None:
    """onnxruntime's dynamic quantisation of every matrix product: int8 weights, activations
    quantised per run."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it warns that pre-processing was skipped
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         use_external_data_format=True, extra_options={"MatMulConstBOnly": True})
    finally:
        root.setLevel(level)


FLOAT32_OPS = ("Pow", "ReduceMean", "Sqrt", "Reciprocal", "Softmax")
"""Operators the float16 decoder keeps in float32, as Hugging Face's Qwen models compute them: the
RMSNorm variance (x ** 2 overflows float16 once |x| > 256, and Qwen's hidden states reach
thousands) and the attention softmax."""


def _variance_epsilon_adds(model: onnx.ModelProto) -> list[str]:
    """Names of the Add nodes that add RMSNorm's epsilon to a ReduceMean's output (kept in float32
    with FLOAT32_OPS, so the variance never passes through float16)."""
    means = {output for node in model.graph.node if node.op_type == "ReduceMean" for output in node.output}
    return [node.name for node in model.graph.node if node.op_type == "Add" and means.intersection(node.input)]


def _write_fp16(source: Path, target: Path) -> None:
    """float16 weights and compute, but for FLOAT32_OPS and the variance's epsilon Add; inputs and
    outputs stay float32 (Cast nodes at the edges; the graph is sorted topologically again after
    the converter appends them)."""
    import onnx_ir
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(source))
    halved = convert_float_to_float16(model, keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FLOAT32_OPS],
                                      node_block_list=_variance_epsilon_adds(model))
    del halved.graph.value_info[:]  # the converter leaves float16 types on some outputs of the nodes it kept
    converted = onnx_ir.from_proto(halved)
    converted.graph.sort()
    onnx.save(onnx_ir.to_proto(converted), str(target), save_as_external_data=True,
              location=f"{target.name}.data")


def _prompt_text(reasoner: TorchReasoner) -> PromptText:
    """The chat prompt around QUERY_PLACEHOLDER, split at it."""
    messages = build_messages(QUERY_PLACEHOLDER, frame=reasoner.frame, template=reasoner.prompt_template)
    text = reasoner.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if text.count(QUERY_PLACEHOLDER) != 1:
        raise BundleError("the reasoner's chat template does not write the query exactly once")
    prefix, _, suffix = text.partition(QUERY_PLACEHOLDER)
    return PromptText(prefix, suffix, reasoner.processor.image_token)


def _layout(reasoner: TorchReasoner) -> ImageLayout:
    processor = reasoner.processor.image_processor
    if not (processor.do_rescale and processor.do_normalize):
        raise BundleError("the reasoner's image processor must rescale and normalise (Qwen-VL's defaults)")
    return ImageLayout(
        input_size=tuple(reasoner.input_size),
        patch_size=int(processor.patch_size),
        temporal_patch_size=int(processor.temporal_patch_size),
        merge_size=int(processor.merge_size),
        mean=tuple(float(v) for v in processor.image_mean),
        std=tuple(float(v) for v in processor.image_std),
        rescale_factor=float(processor.rescale_factor),
    )


def _reasoner_section(reasoner: TorchReasoner, layout: ImageLayout, prompt: PromptText) -> dict[str, Any]:
    config = reasoner.model.config
    text = config.get_text_config()
    deepstack = len(getattr(config.vision_config, "deepstack_visual_indexes", None) or [])
    return {
        "family": reasoner.family,
        "frame": reasoner.frame,
        "prompt_template": reasoner.prompt_template,
        "prompt": {"prefix": prompt.prefix, "suffix": prompt.suffix, "image_token": prompt.image_token},
        "image": {
            "input_size": list(layout.input_size),
            "patch_size": layout.patch_size,
            "temporal_patch_size": layout.temporal_patch_size,
            "merge_size": layout.merge_size,
            "mean": list(layout.mean),
            "std": list(layout.std),
            "rescale_factor": layout.rescale_factor,
            "grid_thw": list(layout.grid),
            "image_tokens": layout.image_tokens,
        },
        "image_token_id": int(config.image_token_id),
        "eos_token_ids": [int(v) for v in reasoner.model.generation_config.eos_token_id],
        "hidden_size": int(text.hidden_size),
        "vocab_size": int(text.vocab_size),
        "num_layers": int(text.num_hidden_layers),
        "num_kv_heads": int(text.num_key_value_heads),
        "head_dim": int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads),
        "deepstack_layers": deepstack,
    }


def _relative_difference(found: np.ndarray, expected: torch.Tensor) -> float:
    reference = expected.detach().float().numpy()
    scale = max(1.0, float(np.abs(reference).max()))
    return float(np.abs(found - reference).max()) / scale


@torch.inference_mode()
def _verify(folder: Path, reasoner_dir: Path, reasoner: TorchReasoner) -> dict[str, float]:
    """Compare preprocessing and the fp32 graphs with the torch reasoner on the probe (module doc).

    Returns:
        Relative max differences: "vision", "prefill_logits", "decode_logits", "present".

    Raises:
        BundleError: a preprocessing mismatch, or a difference above TOLERANCE.
    """
    image = _probe_image(reasoner.input_size)
    onnx_reasoner = OnnxReasoner.from_dir(folder, reasoner_dir, threads=1)
    prompt = onnx_reasoner.prompt_inputs(image, PROBE_QUERY)
    inputs = reasoner.hf_inputs(image, PROBE_QUERY)
    expected_positions = sampling.prompt_position_ids(reasoner.model, inputs)[1:, 0].numpy()
    same = (np.array_equal(prompt.input_ids, inputs["input_ids"][0].numpy()),
            np.array_equal(prompt.pixel_values, inputs["pixel_values"].numpy()),
            np.array_equal(prompt.positions, expected_positions))
    if not all(same):
        parts = [name for name, ok in zip(("tokens", "pixels", "positions"), same) if not ok]
        raise BundleError(f"{folder}: the runtime's preprocessing differs from the processor's in {', '.join(parts)}")
    model = reasoner.model
    image_output = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    state = sampling.prefill(model, inputs)
    prepared = onnx_reasoner.prefill(image, PROBE_QUERY)
    features = onnx_reasoner.vision_features(prompt.pixel_values)
    differences = {"vision": _relative_difference(features[0], torch.cat(image_output.pooler_output)),
                   "prefill_logits": _relative_difference(prepared.state.logits, state.logits)}
    tokens = np.array([int(state.logits.argmax()), 7], dtype=np.int64)
    cache = onnx_reasoner.expand_cache(prepared.state, 2)
    found, _ = onnx_reasoner.decode_step(cache, tokens, prepared.state.last_position + 1)
    cache = sampling.copy_rows(state.cache, 2, model.config)
    expected = sampling.decode_step(model, cache, torch.from_numpy(tokens), state.last_position + 1)
    differences["decode_logits"] = _relative_difference(found, expected)
    differences["present"] = max(_relative_difference(value.numpy(), expected)
                                 for value, expected in zip(prepared.state.cache, _cache_tensors(state.cache)))
    worst = max(differences.values())
    if worst > TOLERANCE:
        raise BundleError(f"{folder}: the exported reasoner differs from torch by {worst:.2e} (relative; "
                          f"tolerance {TOLERANCE:g}): {differences}")
    return {name: float(f"{value:.3g}") for name, value in differences.items()}


def _cache_tensors(cache: Any) -> list[torch.Tensor]:
    """Per layer its keys then values, from a Hugging Face cache."""
    return [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]


def reasoner_fingerprint(reasoner_dir: Path, reasoner_manifest: dict[str, Any], variants: tuple[str, ...]) -> str:
    """sha256 over the checkpoint's files, the manifest section, the variants and the exporter's
    versions: equal fingerprints mean an export would write the same graphs."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(reasoner_dir).rglob("*") if p.is_file()):
        digest.update(path.relative_to(reasoner_dir).as_posix().encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    import transformers

    settings = {"reasoner": reasoner_manifest, "variants": sorted(variants), "opset": OPSET,
                "format_version": FORMAT_VERSION, "torch": torch.__version__, "transformers": transformers.__version__,
                "onnx": onnx.__version__}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def export_reasoner_onnx(
    reasoner_dir: str | Path,
    reasoner_manifest: dict[str, Any],
    onnx_dir: str | Path,
    variants: tuple[str, ...] = ("fp32",),
    verify: bool = True,
    progress: Callable[[str], None] | None = None,
    link_weights: bool = True,
) -> dict[str, Any]:
    """Export the reasoner of a bundle into `onnx_dir` (created if needed; its files overwritten).

    Args:
        reasoner_dir: the bundle's reasoner/ checkpoint.
        reasoner_manifest: the manifest's reasoner section.
        onnx_dir: where the graphs and reasoner_onnx.json go.
        variants: decoder variants, "fp32" always among them; "int8", "fp16" optional.
        verify: compare with torch on a probe (see the module doc).
        progress: called with a short line before each step.
        link_weights: read the weights that are tensors of the checkpoint from there instead of
            a copy beside the graphs (`weight_links`; only where `reasoner_dir` lies in
            `onnx_dir`'s parent folder, the bundle).

    Returns:
        The description written to onnx_dir/reasoner_onnx.json.

    Raises:
        BundleError: the checkpoint cannot be loaded; a graph fails onnx.checker or verification.
        InvalidInputError: unknown variants.
    """
    unknown = sorted(set(variants) - set(DECODER_VARIANTS))
    if unknown or "fp32" not in variants:
        raise InvalidInputError(f"variants must include 'fp32' and come from {DECODER_VARIANTS}, got {variants}")
    say = progress or (lambda line: None)
    reasoner_dir, folder = Path(reasoner_dir), Path(onnx_dir)
    reasoner = TorchReasoner.from_dir(reasoner_dir, reasoner_manifest, device="cpu", dtype="float32")
    folder.mkdir(parents=True, exist_ok=True)
    layout, prompt = _layout(reasoner), _prompt_text(reasoner)
    pixel_values = reasoner.hf_inputs(_probe_image(reasoner.input_size), PROBE_QUERY)["pixel_values"]
    with torch.no_grad(), quiet_exporter():
        say("exporting the reasoner's vision tower")
        _export_vision(reasoner, layout.grid, pixel_values, folder / GRAPH_FILES["vision"])
        say("exporting the reasoner's token embedding")
        _export_embed(reasoner, folder / GRAPH_FILES["embed"])
        say("exporting the reasoner's decoder (KV cache in and out)")
        _export_decoder(reasoner, folder / GRAPH_FILES["decoder"])
    drop_source_locations(folder / GRAPH_FILES["vision"])
    drop_source_locations(folder / GRAPH_FILES["embed"])
    drop_source_locations(folder / GRAPH_FILES["decoder"])
    writers = {"int8": _write_int8, "fp16": _write_fp16}
    for variant in DECODER_VARIANTS[1:]:
        if variant in variants:
            say(f"writing the {variant} decoder")
            writers[variant](folder / GRAPH_FILES["decoder"], folder / GRAPH_FILES[f"decoder_{variant}"])
    description: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "opset": OPSET,
        "reasoner": _reasoner_section(reasoner, layout, prompt),
        "vision": graph_description(folder / GRAPH_FILES["vision"]),
        "embed": graph_description(folder / GRAPH_FILES["embed"]),
        "decoders": {variant: graph_description(folder / GRAPH_FILES[_decoder_key(variant)])
                     for variant in DECODER_VARIANTS if variant in variants},
        "fingerprint": reasoner_fingerprint(reasoner_dir, reasoner_manifest, variants),
    }
    if link_weights:
        say("linking the graphs' weights to the checkpoint")
        link_graphs(folder, [description["vision"], description["embed"], *description["decoders"].values()],
                    reasoner_dir)
    (folder / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    if verify:
        say("comparing the graphs with torch")
        description["verified"] = {"tolerance": TOLERANCE, **_verify(folder, reasoner_dir, reasoner)}
        (folder / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    return description


def _decoder_key(variant: str) -> str:
    return "decoder" if variant == "fp32" else f"decoder_{variant}"
