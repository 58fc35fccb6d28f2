"""Export a bundle's SAM 1 to ONNX: the image encoder and the prompt decoder, plus fp16 and
dynamic-int8 variants of the decoder, and the description the runtime reads.

Files written into the onnx/ folder (names in `star_edge.sam.onnx_backend`'s format):

    sam_encoder.onnx (+ sam_encoder.onnx.data)  pixels (1, 3, S, S) float32 -> image_embeddings
    sam_decoder.onnx        fp32 prompt decoder (`PromptDecoder.forward`), dynamic prompts/points
    sam_decoder_fp16.onnx   float16 weights and compute, float32 inputs and outputs
    sam_decoder_int8.onnx   matrix-product weights quantised to int8, activations quantised
                            per run (onnxruntime's dynamic quantisation), positional
                            encoding kept float32
    sam_onnx.json           the graphs' files, input/output names, dtypes and shapes with the
                            dynamic axes named, and the SAM settings for pre/post-processing

The graphs come from torch.onnx.export (the torch.export-based exporter) at opset 18; each is
checked with onnx.checker, and by default run once on onnxruntime against torch. By default the
weights that are tensors of sam/model.safetensors are read from there at load instead of being
copied into the `.data` files (`export.weight_links`); the description lists them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from star_edge.errors import BackendUnavailableError, BundleError, InvalidInputError
from star_edge.export.onnx_files import OPSET, drop_source_locations, graph_description, quiet_exporter
from star_edge.sam.checkpoints import load_sam, read_sam_config
from star_edge.sam.inputs import labelled_points
from star_edge.export.weight_links import link_graphs
from star_edge.sam.onnx_backend import (
    DECODER_VARIANTS,
    DESCRIPTION_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    onnxruntime_sessions,
)
from star_edge.sam.prompt_decoder import PromptDecoder

ENCODER_FILE = "sam_encoder.onnx"
DECODER_FILES = {
    "fp32": "sam_decoder.onnx",
    "fp16": "sam_decoder_fp16.onnx",
    "int8": "sam_decoder_int8.onnx",
}
_TOLERANCE = 1e-3


def _export_encoder(sam: torch.nn.Module, image_size: int, path: Path) -> None:
    pixels = torch.zeros((1, 3, image_size, image_size))
    torch.onnx.export(
        sam.image_encoder,
        (pixels,),
        str(path),
        dynamo=True,
        opset_version=OPSET,
        input_names=["pixels"],
        output_names=["image_embeddings"],
        external_data=True,
        verbose=False,
    )


def _export_decoder(decoder: PromptDecoder, features: torch.Tensor, path: Path) -> None:
    prompts = torch.export.Dim("prompts", min=1, max=65536)
    points = torch.export.Dim("points", min=1, max=256)
    coords = torch.zeros((2, 3, 2))
    labels = torch.tensor([[1, 2, 3], [1, 2, 3]], dtype=torch.int64)
    torch.onnx.export(
        decoder,
        (features, coords, labels),
        str(path),
        dynamo=True,
        opset_version=OPSET,
        input_names=["image_embeddings", "point_coords", "point_labels"],
        output_names=["low_res_masks", "iou_predictions"],
        dynamic_shapes={
            "features": None,
            "coords": {0: prompts, 1: points},
            "labels": {0: prompts, 1: points},
        },
        external_data=False,
        verbose=False,
    )


def _write_fp16(source: Path, target: Path) -> None:
    """float16 weights and compute; inputs and outputs stay float32 (Cast nodes at the edges,
    which the converter appends: the graph is sorted topologically again)."""
    import onnx_ir
    from onnxruntime.transformers.float16 import convert_float_to_float16

    halved = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    converted = onnx_ir.from_proto(halved)
    converted.graph.sort()
    onnx.save(onnx_ir.to_proto(converted), str(target))


def _write_int8(source: Path, target: Path) -> None:
    """onnxruntime's dynamic quantisation: int8 weights, activations quantised per run.

    The positional-encoding products (coordinates times the (2, C/2) random Gaussian
    frequencies) stay float32: their error is multiplied by 2 pi and passed through sin/cos.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(source))
    frequencies = {
        tensor.name for tensor in model.graph.initializer
        if len(tensor.dims) == 2 and tensor.dims[0] == 2
    }
    keep_float = [
        node.name for node in model.graph.node
        if node.op_type in ("MatMul", "Gemm") and frequencies.intersection(node.input)
    ]
    quantisation_logger = logging.getLogger()
    level = quantisation_logger.level
    quantisation_logger.setLevel(logging.ERROR)  # it warns that pre-processing was skipped
    try:
        quantize_dynamic(
            str(source), str(target), weight_type=QuantType.QInt8, nodes_to_exclude=keep_float
        )
    finally:
        quantisation_logger.setLevel(level)


def _verify(
    folder: Path, description: dict[str, Any], sam: torch.nn.Module, decoder: PromptDecoder
) -> None:
    """Run the fp32 graphs once on onnxruntime (as the runtime opens them) against torch: max
    |difference| <= 1e-3."""
    generator = torch.Generator().manual_seed(0)
    size = description["sam"]["image_size"]
    pixels = torch.randn((1, 3, size, size), generator=generator)
    open_session = onnxruntime_sessions("cpu", None)
    encoder = open_session(folder / ENCODER_FILE, description["encoder"])
    decoder_session = open_session(folder / DECODER_FILES["fp32"], description["decoders"]["fp32"])
    boxes = np.array([[10.0, 20.0, 200.0, 150.0], [0.0, 0.0, size - 1.0, size - 1.0]])
    points = np.array([[50.0, 60.0], [size / 2, size / 3]])
    coords, labels = labelled_points(boxes, points, (size, size), size)
    with torch.inference_mode():
        features = sam.image_encoder(pixels)
        expected = decoder(features, torch.from_numpy(coords), torch.from_numpy(labels))
    (found_features,) = encoder.run(None, {"pixels": pixels.numpy()})
    found = decoder_session.run(
        None, {"image_embeddings": features.numpy(), "point_coords": coords, "point_labels": labels}
    )
    pairs = [(found_features, features)] + list(zip(found, expected))
    worst = max(float(np.abs(a - b.numpy()).max()) for a, b in pairs)
    if worst > _TOLERANCE:
        raise BundleError(f"{folder}: the exported graphs differ from torch by {worst:.2e}")


def export_sam_onnx(
    sam_dir: str | Path,
    onnx_dir: str | Path,
    variants: tuple[str, ...] = DECODER_VARIANTS,
    verify: bool = True,
    link_weights: bool = True,
) -> dict[str, Any]:
    """Export the SAM of a sam/ folder into `onnx_dir` (created if needed; files overwritten).

    variants: decoder variants to write, "fp32" always among them.
    verify: run the fp32 graphs once on onnxruntime and compare with torch.
    link_weights: read the weights that are tensors of sam/model.safetensors from there instead
        of a copy beside the graphs (`weight_links`; only where `sam_dir` lies in `onnx_dir`'s
        parent folder, the bundle).

    Returns:
        The description written to onnx_dir/sam_onnx.json.

    Raises:
        BundleError: the sam/ folder is missing or broken; a graph fails onnx.checker or the
            comparison with torch.
        InvalidInputError: unknown variant names.
        BackendUnavailableError: a SAM 2 model (its ONNX export is not written yet).
    """
    unknown = sorted(set(variants) - set(DECODER_VARIANTS))
    if unknown or "fp32" not in variants:
        raise InvalidInputError(
            f"variants must include 'fp32' and come from {DECODER_VARIANTS}, got {variants}"
        )
    config = read_sam_config(sam_dir)
    if config["kind"] != "sam1":
        raise BackendUnavailableError(
            f"ONNX export covers SAM 1 models only; {sam_dir} holds a {config['kind']} model "
            f"({config['variant']}): run it with the torch backend"
        )
    sam = load_sam(sam_dir)
    decoder = PromptDecoder(sam.prompt_encoder, sam.mask_decoder).eval()
    folder = Path(onnx_dir)
    folder.mkdir(parents=True, exist_ok=True)
    grid = list(sam.prompt_encoder.image_embedding_size)
    dim = int(sam.prompt_encoder.embed_dim)
    with torch.no_grad(), quiet_exporter():
        _export_encoder(sam, config["image_size"], folder / ENCODER_FILE)
        _export_decoder(decoder, torch.zeros((1, dim, *grid)), folder / DECODER_FILES["fp32"])
    drop_source_locations(folder / ENCODER_FILE)
    drop_source_locations(folder / DECODER_FILES["fp32"])
    if "fp16" in variants:
        _write_fp16(folder / DECODER_FILES["fp32"], folder / DECODER_FILES["fp16"])
    if "int8" in variants:
        _write_int8(folder / DECODER_FILES["fp32"], folder / DECODER_FILES["int8"])
    description = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "opset": OPSET,
        "sam": {
            "kind": config["kind"],
            "variant": config["variant"],
            "image_size": config["image_size"],
            "embedding_size": grid,
            "embed_dim": dim,
            "low_res_size": list(decoder.low_res_size),
            "num_outputs": decoder.num_outputs,
            "mask_threshold": config["mask_threshold"],
            "pixel_mean": config["pixel_mean"],
            "pixel_std": config["pixel_std"],
        },
        "encoder": graph_description(folder / ENCODER_FILE),
        "decoders": {
            variant: graph_description(folder / DECODER_FILES[variant])
            for variant in DECODER_VARIANTS
            if variant in variants
        },
    }
    if link_weights:
        link_graphs(folder, [description["encoder"], *description["decoders"].values()], Path(sam_dir))
    if verify:
        _verify(folder, description, sam, decoder)
    text = json.dumps(description, indent=2) + "\n"
    (folder / DESCRIPTION_FILE).write_text(text, encoding="utf-8")
    return description
