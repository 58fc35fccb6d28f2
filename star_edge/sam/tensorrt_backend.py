"""SAM on TensorRT: `OnnxMaskDecoder` with sessions of the engines built from its graphs.

The pre- and post-processing (resizing, prompts as labelled points, choosing and upsampling the
masks) are the ONNX backend's; `TensorRTSession` gives an engine the part of onnxruntime's
InferenceSession that backend uses: `run(output_names, feeds)` with host arrays, and the input and
output names (the engine keeps the graph's, which the backend checks against the description).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np

from star_edge.sam.onnx_backend import OnnxMaskDecoder
from star_edge.tensorrt_runtime import Engine, EngineOpener


class _TensorName(NamedTuple):
    name: str


class TensorRTSession:
    """An engine behind the InferenceSession calls of `OnnxMaskDecoder`; runs are serialised (an
    execution context runs one inference at a time)."""

    def __init__(self, engine: Engine) -> None:
        import torch

        self._torch = torch
        self._engine = engine
        self._lock = threading.Lock()

    def get_inputs(self) -> list[_TensorName]:
        return [_TensorName(name) for name in self._engine.input_names]

    def get_outputs(self) -> list[_TensorName]:
        return [_TensorName(name) for name in self._engine.output_names]

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """feeds: input name -> host array; returns the named outputs (all, for None) as host arrays."""
        tensors = {name: self._torch.from_numpy(np.array(value, order="C")) for name, value in feeds.items()}
        with self._lock:
            outputs = self._engine.run(tensors)
        return [outputs[name].cpu().numpy() for name in (output_names or self._engine.output_names)]


def tensorrt_mask_decoder(onnx_dir: str | Path, open_engine: EngineOpener, max_batch: int) -> OnnxMaskDecoder:
    """SAM of a bundle on the engines `open_engine` opens (graph name -> engine), decoding up to
    `max_batch` prompts per engine run (the decoder engine's largest profile).

    Raises:
        BundleError: the ONNX description or graph files are missing; an engine cannot be opened.
    """

    def open_session(path: Path, graph: dict) -> TensorRTSession:  # the engine holds its weights
        return TensorRTSession(open_engine(path.stem))

    return OnnxMaskDecoder.from_dir(onnx_dir, decoder_variant="fp32", max_batch=max_batch, open_session=open_session)
