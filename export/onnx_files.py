"""What every ONNX export shares: the exporter run quietly, graphs cleaned of where they were
exported, checked and described.

A graph's description is what the runtime's description files list for it: the file, and its inputs
and outputs in order, each with name, dtype and shape, dynamic axes by their name (DESIGN section 3,
"declared, not discovered").
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import onnx

#: The opset of every exported graph.
OPSET = 18


def tensor_description(value: onnx.ValueInfoProto) -> dict[str, Any]:
    """{"name", "dtype", "shape"} of a graph input or output; dynamic axes by their name."""
    tensor = value.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    shape = [dim.dim_param if dim.dim_param else int(dim.dim_value) for dim in tensor.shape.dim]
    return {"name": value.name, "dtype": dtype, "shape": shape}


def graph_description(path: Path) -> dict[str, Any]:
    """Check the ONNX file with onnx.checker and describe its inputs and outputs."""
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    return {
        "file": path.name,
        "inputs": [tensor_description(v) for v in model.graph.input],
        "outputs": [tensor_description(v) for v in model.graph.output],
    }


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """`graph` and every subgraph of its nodes' attributes (If / Loop bodies)."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from _graphs(attribute.g)
            for subgraph in attribute.graphs:
                yield from _graphs(subgraph)


def drop_source_locations(path: Path) -> None:
    """Remove the exporter's per-node metadata and doc strings from the graph at `path` (its
    weights in `<file>.data` untouched): they hold stack traces naming this machine's source files,
    so without them an export is the same wherever it ran (and ~10x smaller as a file)."""
    model = onnx.load(str(path), load_external_data=False)
    nodes = [node for graph in _graphs(model.graph) for node in graph.node]
    nodes += [node for function in model.functions for node in function.node]
    for node in nodes:
        del node.metadata_props[:]
        node.doc_string = ""
    for graph in _graphs(model.graph):
        del graph.metadata_props[:]
        for value in (*graph.input, *graph.output, *graph.value_info):
            del value.metadata_props[:]
    onnx.save(model, str(path))


@contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence the exporter's notes that are not about our graphs (torchvision operators it
    skips registering, its progress lines, deprecations inside torch)."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
            yield
    finally:
        registration.setLevel(level)
