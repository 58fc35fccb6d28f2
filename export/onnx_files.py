"""What every ONNX export shares: the exporter run quietly, and graphs checked and described.

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
