"""Graph weights read from the bundle's checkpoints: the "linked" initializers of an exported graph.

An export may leave out of a graph every weight that is a tensor of the bundle's own checkpoint
(reasoner/ or sam/ safetensors), as it is or transposed, instead of writing a second copy next to
the graph. The graph then declares those initializers (name, dtype, shape) with no data, and its
description lists where each one comes from::

    "linked": {"<safetensors file, relative to the onnx/ folder>":
                   {"<initializer>": {"tensor": str, "transpose": bool, "dtype": str, "shape": [int]}}}

At load, `linked_initializers` reads those tensors with safetensors' numpy reader (no torch), casts
them to the graph's dtype (a float16 checkpoint feeds a float32 graph exactly), transposes where
noted, and `onnxruntime_session` hands them to onnxruntime as the session's external
initializers. A checkpoint that no longer has a linked tensor, or has it in another shape, is a
BundleError naming both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from star_edge.errors import BundleError

LINKED_KEY = "linked"


def linked_initializers(folder: Path, graph: dict[str, Any]) -> dict[str, np.ndarray]:
    """The linked initializers of one described graph: name -> C-contiguous array of the graph's
    dtype and shape ({} for a graph that carries all its weights).

    folder: the onnx/ folder the description lies in; the files named must lie in its parent
        (the bundle).

    Raises:
        BundleError: a malformed "linked" section, a file outside the bundle or unreadable, a
            tensor missing or of another shape; the message names the file and tensor.
    """
    links = graph.get(LINKED_KEY, {})
    if not isinstance(links, dict):
        raise BundleError(f"{folder}: the {LINKED_KEY!r} entry of {graph.get('file')!r} is not an object")
    arrays: dict[str, np.ndarray] = {}
    for relative, tensors in links.items():
        path = _inside_bundle(folder, str(relative), str(graph.get("file")))
        arrays.update(_read_linked(path, tensors))
    return arrays


def _inside_bundle(folder: Path, relative: str, graph_file: str) -> Path:
    path = (folder / relative).resolve()
    bundle = folder.resolve().parent
    if bundle not in path.parents:
        raise BundleError(f"{folder / graph_file} links weights from {relative}, which lies outside the bundle {bundle}")
    if not path.is_file():
        raise BundleError(f"{path} is missing (the weights of {folder / graph_file} are read from it)")
    return path


def _read_linked(path: Path, tensors: Any) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    if not isinstance(tensors, dict):
        raise BundleError(f"the linked tensors of {path} are not described as an object")
    arrays = {}
    try:
        with safe_open(str(path), framework="numpy") as checkpoint:
            available = set(checkpoint.keys())
            for name, link in tensors.items():
                try:
                    key, transpose, dtype, shape = link["tensor"], bool(link["transpose"]), link["dtype"], link["shape"]
                except (TypeError, KeyError) as exc:
                    raise BundleError(f"the link of initializer {name!r} to {path} is malformed: {link!r}") from exc
                if key not in available:
                    raise BundleError(f"{path} has no tensor {key!r} (the graph's initializer {name!r}): "
                                      "the checkpoint changed since the export; export the bundle again")
                array = checkpoint.get_tensor(key).astype(np.dtype(dtype), copy=False)
                array = np.ascontiguousarray(array.T if transpose else array)
                if list(array.shape) != list(shape):
                    raise BundleError(f"{path}: tensor {key!r} gives shape {list(array.shape)}, the graph's "
                                      f"initializer {name!r} has {list(shape)}: export the bundle again")
                arrays[str(name)] = array
    except (SafetensorError, OSError, TypeError) as exc:
        raise BundleError(f"{path} is not a readable safetensors file: {exc}") from exc
    return arrays


def onnxruntime_session(path: Path, graph: dict[str, Any], providers: list[Any],
                        threads: int | None) -> tuple[Any, dict[str, np.ndarray]]:
    """An onnxruntime InferenceSession of the described graph at `path` (`threads` intra-op
    threads, None: onnxruntime's default), its linked initializers read from the bundle's
    checkpoint and handed to the session; returns the session and those arrays, which must
    outlive it.

    Raises:
        BundleError: the graph is not loadable; see `linked_initializers` for the linked weights.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: no notes on skipped constant folding
    if threads is not None:
        options.intra_op_num_threads = threads
    arrays = linked_initializers(path.parent, graph)
    if arrays:
        values = [onnxruntime.OrtValue.ortvalue_from_numpy(array) for array in arrays.values()]
        options.add_external_initializers(list(arrays), values)
    try:
        session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        raise BundleError(f"{path} is not a loadable ONNX graph: {exc}") from exc
    return session, arrays
