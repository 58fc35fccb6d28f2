"""Build a bundle's TensorRT engines from its ONNX graphs (TensorRT 10 Python API) and record them.

`build_bundle_engines` parses each fp32 ONNX graph of onnx/ (`parse_from_file`, so the weights in
`<file>.data` beside it resolve; a graph whose weights are linked to the checkpoint is first
written whole to a scratch folder, `weight_links.materialize_graph`), adds the optimisation
profiles of `tensorrt_profiles`, builds a serialised engine per graph into
`tensorrt/<key>/<graph>.engine` and returns the record the manifest keeps under
`tensorrt.engines[<key>]` (format in `star_edge.tensorrt_runtime`; the manifest writer lists the
files with their sha256). The key names the GPU architecture and the
TensorRT version: engines work only where they were built, so build them on the target machine.

Precision: "fp32" (TF32 off, so results follow the ONNX graphs closely) or "fp16" (TensorRT may
run layers in float16; inputs and outputs stay float32). The int8 ONNX decoders are onnxruntime's
dynamic quantisation (MatMulInteger), which TensorRT's ONNX parser does not take; int8 engines
would need calibration or explicit Q/DQ graphs and are not built here.

Untested on hardware so far (see README, "TensorRT and Jetson"); the pure-Python parts
(`tensorrt_profiles`, `engine_record`, `current_engine_records`) are tested on the CPU.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from star_edge.errors import BundleError, InvalidInputError
from star_edge.export.tensorrt_profiles import GraphPlan, Profile, ProfileSettings, bundle_plans
from star_edge.export.weight_links import materialize_graph
from star_edge.onnx_weights import LINKED_KEY
from star_edge.tensorrt_runtime import Platform, tensorrt_logger

PRECISIONS = ("fp16", "fp32")
#: The bundle folder of all engines (a backend's folder is named after it).
ENGINE_FOLDER = "tensorrt"


def build_engine(onnx_path: Path, profiles: list[Profile], precision: str, workspace_bytes: int, target: Path) -> None:
    """Build one serialised engine from an ONNX graph and write it to `target`.

    Args:
        onnx_path: the graph (its external weights beside it).
        profiles: one dict per optimisation profile, input name -> (min, opt, max) shapes; every
            input with a dynamic axis must be in each.
        precision: "fp32" or "fp16".
        workspace_bytes: TensorRT's scratch memory limit.
        target: the .engine file (written whole, or not at all).

    Raises:
        BundleError: the parser rejects the graph, a dynamic input has no profile, or the build fails.
    """
    import tensorrt

    logger = tensorrt_logger()
    builder = tensorrt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = tensorrt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(index)) for index in range(parser.num_errors))
        raise BundleError(f"TensorRT's ONNX parser rejects {onnx_path}: {errors}")
    dynamic = [network.get_input(i).name for i in range(network.num_inputs)
               if any(size < 0 for size in network.get_input(i).shape)]
    if dynamic and not profiles:
        raise BundleError(f"{onnx_path}: dynamic inputs {dynamic} and no optimisation profile")
    for index, shapes in enumerate(profiles):
        missing = sorted(set(dynamic) - set(shapes))
        if missing:
            raise BundleError(f"{onnx_path}: profile {index} has no shapes for the dynamic inputs {missing}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(tensorrt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if precision == "fp16":
        config.set_flag(tensorrt.BuilderFlag.FP16)
    else:
        config.clear_flag(tensorrt.BuilderFlag.TF32)
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BundleError(f"TensorRT could not build an engine from {onnx_path} "
                          f"({logger.last_error or 'see the log'})")
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(serialized)
    os.replace(partial, target)


def engine_record(
    platform: Platform,
    precision: str,
    onnx_fingerprint: str,
    settings: ProfileSettings,
    plans: dict[str, GraphPlan],
) -> dict[str, Any]:
    """The manifest record of one set of engines (format in `star_edge.tensorrt_runtime`); file
    paths relative to the bundle folder."""
    folder = f"{ENGINE_FOLDER}/{platform.engine_key}"
    graphs = {
        name: {"engine": f"{folder}/{name}.engine", "onnx": f"onnx/{plan.onnx_file}",
               "profiles": [{input_name: [list(shape) for shape in shapes] for input_name, shapes in profile.items()}
                            for profile in plan.profiles]}
        for name, plan in plans.items()
    }
    return {"compute_capability": list(platform.compute_capability), "tensorrt_version": platform.tensorrt_version,
            "device_name": platform.device_name, "precision": precision, "onnx_fingerprint": onnx_fingerprint,
            "settings": asdict(settings), "graphs": graphs}


def current_engine_records(records: dict[str, Any], onnx_fingerprint: str | None) -> dict[str, Any]:
    """The engine records built from the ONNX graphs a bundle holds now (same fingerprint): engines
    of graphs since exported again are stale, whatever GPU they are for."""
    return {key: record for key, record in records.items()
            if onnx_fingerprint is not None and record.get("onnx_fingerprint") == onnx_fingerprint}


def remove_unrecorded_engines(root: Path, records: dict[str, Any]) -> None:
    """Delete the engine folders under root/tensorrt that `records` does not keep (and the folder
    itself when none is kept)."""
    folder = root / ENGINE_FOLDER
    if not folder.is_dir():
        return
    for child in folder.iterdir():
        if child.name in records:
            continue
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
    if not records:
        folder.rmdir()


def described_graphs(onnx_dir: Path) -> dict[str, dict[str, Any]]:
    """Graph file name -> its entry in reasoner_onnx.json or sam_onnx.json."""
    from star_edge.reasoner.onnx_backend import read_description as reasoner_description
    from star_edge.sam.onnx_backend import read_description as sam_description

    reasoner, sam = reasoner_description(onnx_dir), sam_description(onnx_dir)
    graphs = [reasoner["vision"], reasoner["embed"], *reasoner["decoders"].values(), sam["encoder"],
              *sam["decoders"].values()]
    return {str(graph.get("file")): graph for graph in graphs}


def build_bundle_engines(
    root: Path,
    reasoner_dir: Path,
    max_new_tokens: int,
    onnx_fingerprint: str,
    platform: Platform,
    precision: str = "fp16",
    settings: ProfileSettings | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build the engines of the bundle at `root` (its onnx/ graphs exported) for `platform` into
    root/tensorrt/<key>/ (replacing that folder) and return their manifest record.

    Raises:
        InvalidInputError: an unknown precision.
        BundleError: a graph TensorRT cannot parse or build (see `build_engine`).
    """
    if precision not in PRECISIONS:
        raise InvalidInputError(f"engine precision must be one of {PRECISIONS}, got {precision!r}")
    import torch

    say = progress or (lambda line: None)
    settings = settings or ProfileSettings()
    plans = bundle_plans(root / "onnx", reasoner_dir, max_new_tokens, settings)
    folder = root / ENGINE_FOLDER / platform.engine_key
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    described = described_graphs(root / "onnx")
    with torch.cuda.device(platform.device_index), tempfile.TemporaryDirectory() as scratch:
        for name, plan in plans.items():
            say(f"building the TensorRT engine {name} ({precision}, {platform.engine_key})")
            graph_path = root / "onnx" / plan.onnx_file
            graph = described.get(plan.onnx_file, {})
            if LINKED_KEY in graph:  # the parser reads weights from files beside the graph only
                graph_path = materialize_graph(graph_path, graph, Path(scratch) / plan.onnx_file)
            build_engine(graph_path, plan.profiles, precision, settings.workspace_bytes, folder / f"{name}.engine")
    return engine_record(platform, precision, onnx_fingerprint, settings, plans)
