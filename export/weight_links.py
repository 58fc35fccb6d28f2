"""Exported graphs that read their weights from the bundle's checkpoint instead of a second copy.

After export, `link_graphs` looks for every large initializer of a graph among the tensors of the
checkpoint the graph was exported from (exactly equal, as it is or transposed, after casting the
checkpoint tensor to the initializer's dtype); each one found is left in the graph as a declaration
without data (name, dtype, shape; data location "external", file `LINKED_LOCATION`) and described
under "linked" (format in `star_edge.onnx_weights`, which reads them back at load). The rest stay in
the graph's own `<file>.data`. A float16 checkpoint feeds a float32 graph exactly, so a bundle's
onnx/ folder shrinks to the graphs' structure and the few constants the exporter computed.

`materialize_graph` writes a linked graph back out whole, for tools that read ONNX files
themselves (TensorRT's parser).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from star_edge.bundle import checkpoint_weight_files
from star_edge.onnx_weights import LINKED_KEY, linked_initializers

#: Initializers with fewer elements stay in the graph (biases of norms cost nothing to copy).
MIN_LINKED_ELEMENTS = 1024
#: The file a linked initializer's declaration names; never read (its data come with the session).
LINKED_LOCATION = "linked-from-checkpoint"
#: safetensors dtypes numpy reads (bfloat16 and float8 checkpoints are never linked).
_NUMPY_DTYPES = {"F64", "F32", "F16", "I64", "I32", "I16", "I8", "U8", "BOOL"}


class _Checkpoint:
    """The tensors of safetensors files, indexed by shape, read on first use."""

    def __init__(self, files: Sequence[Path]) -> None:
        from safetensors import safe_open

        self._by_shape: dict[tuple[int, ...], list[tuple[Path, str]]] = defaultdict(list)
        self._opened = {path: safe_open(str(path), framework="numpy") for path in files}
        for path, handle in self._opened.items():
            for key in handle.keys():
                tensor = handle.get_slice(key)
                if tensor.get_dtype() in _NUMPY_DTYPES:
                    self._by_shape[tuple(tensor.get_shape())].append((path, key))
        self._read: dict[tuple[Path, str], np.ndarray] = {}

    def find(self, array: np.ndarray) -> tuple[Path, str, bool] | None:
        """(file, tensor, transposed) of a checkpoint tensor equal to `array` once cast to its dtype."""
        shapes = [(array.shape, False)] + ([(array.shape[::-1], True)] if array.ndim == 2 else [])
        for shape, transposed in shapes:
            for path, key in self._by_shape.get(tuple(shape), []):
                if (path, key) not in self._read:
                    self._read[path, key] = self._opened[path].get_tensor(key)
                candidate = self._read[path, key].astype(array.dtype, copy=False)
                if np.array_equal(candidate.T if transposed else candidate, array):
                    return path, key, transposed
        return None


def link_graphs(folder: Path, graphs: Sequence[dict[str, Any]], checkpoint_dir: Path) -> None:
    """Rewrite each described graph of `folder` (entries of its description, each with its "file")
    so that its initializers found among the tensors of the checkpoint folder `checkpoint_dir` are
    read from there, and add its "linked" section to the entry (none where nothing was found: the
    graph is left as it was). Only a checkpoint inside `folder`'s parent (the bundle) is searched:
    a bundle never reads weights from outside itself.
    """
    bundle = folder.resolve().parent
    files = [path for path in checkpoint_weight_files(checkpoint_dir) if bundle in path.resolve().parents and path.is_file()]
    if not files:
        return
    tensors = _Checkpoint(files)
    for graph in graphs:
        linked = _link_graph(folder / graph["file"], tensors, bundle)
        if linked:
            graph[LINKED_KEY] = linked


def _link_graph(graph_path: Path, tensors: _Checkpoint, bundle: Path) -> dict[str, Any]:
    """Rewrite the graph at `graph_path` (with its `<file>.data`) with every initializer found in
    `tensors` declared without data; returns its "linked" section (file paths relative to the
    graph's folder; {} when nothing was found, and the graph is left as it was)."""
    model = onnx.load(str(graph_path))
    linked: dict[str, dict[str, Any]] = defaultdict(dict)
    for initializer in model.graph.initializer:
        if int(np.prod(initializer.dims)) < MIN_LINKED_ELEMENTS:
            continue
        array = numpy_helper.to_array(initializer)
        if array.dtype.kind != "f":
            continue
        found = tensors.find(array)
        if found is None:
            continue
        path, key, transposed = found
        relative = Path("..") / path.resolve().relative_to(bundle)
        linked[relative.as_posix()][initializer.name] = {
            "tensor": key, "transpose": transposed, "dtype": array.dtype.name, "shape": list(array.shape)}
        _declare_external(initializer)
    if linked:
        _save(model, graph_path)
    return {file: dict(names) for file, names in linked.items()}


def _save(model: onnx.ModelProto, path: Path) -> None:
    """Save `model` at `path`, tensors of 1 KiB and more in `<path>.data` (replaced), both
    readable as the exporter leaves its files."""
    data_file = path.with_name(path.name + ".data")
    data_file.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_file.name, size_threshold=1024)
    for written in (path, data_file):
        if written.exists():
            written.chmod(0o644)


def _declare_external(initializer: onnx.TensorProto) -> None:
    """Drop the data of `initializer`, keeping its name, dtype and shape; mark it external."""
    for field in ("raw_data", "float_data", "double_data", "int32_data", "int64_data"):
        initializer.ClearField(field)
    del initializer.external_data[:]
    initializer.data_location = onnx.TensorProto.EXTERNAL
    entry = initializer.external_data.add()
    entry.key, entry.value = "location", LINKED_LOCATION


def materialize_graph(graph_path: Path, graph: dict[str, Any], target: Path) -> Path:
    """Write the described graph at `graph_path` whole to `target` (its weights in `<target>.data`),
    the linked initializers filled in from the checkpoint; returns `target`.

    Raises:
        BundleError: see `star_edge.onnx_weights.linked_initializers`.
    """
    arrays = linked_initializers(graph_path.parent, graph)
    model = onnx.load(str(graph_path), load_external_data=False)
    for initializer in model.graph.initializer:
        if initializer.name in arrays:
            initializer.CopyFrom(numpy_helper.from_array(arrays[initializer.name], initializer.name))
    onnx.load_external_data_for_model(model, str(graph_path.parent))
    _save(model, target)
    return target

