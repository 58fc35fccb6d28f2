"""The reasoner on TensorRT: `OnnxReasoner` with the engines built from its graphs as the runner.

Everything but running the graphs is the ONNX backend's: the numpy preprocessing, the shared
prefill and N-row batched decoding, the numpy sampler (`reasoner.decoding`). `TensorRTGraphs`
runs the vision, embedding and decoder engines with the names and order reasoner_onnx.json
declares; the KV cache stays in CUDA memory as torch tensors (rows repeated or dropped on the
device), and only the logits come to the host each step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from star_edge.descriptions import graph_io_names
from star_edge.errors import BundleError
from star_edge.reasoner.onnx_backend import DESCRIPTION_FILE, OnnxReasoner, read_description
from star_edge.tensorrt_runtime import Engine, EngineOpener

#: reasoner_onnx.json section -> graph (engine) name.
_GRAPH_NAMES = {"vision": "reasoner_vision", "embed": "reasoner_embed", "decoder": "reasoner_decoder"}


class TensorRTGraphs:
    """The reasoner's vision, embedding and decoder engines as a `ReasonerGraphs`; cache values are
    torch tensors (B, kv_heads, P, head_dim) on the engines' device."""

    def __init__(self, description: dict[str, Any], vision: Engine, embed: Engine, decoder: Engine) -> None:
        """Wrap the engines of the graphs `description` (reasoner_onnx.json) declares; the decoder
        engine is built from its fp32 decoder graph."""
        import torch

        self._torch = torch
        self._engines = {"vision": vision, "embed": embed, "decoder": decoder}
        graphs = {"vision": description["vision"], "embed": description["embed"],
                  "decoder": description["decoders"]["fp32"]}
        self._names = {section: graph_io_names(graph, DESCRIPTION_FILE) for section, graph in graphs.items()}
        for section, engine in self._engines.items():
            inputs, outputs = self._names[section]
            if (sorted(engine.input_names), sorted(engine.output_names)) != (sorted(inputs), sorted(outputs)):
                raise BundleError(f"the {_GRAPH_NAMES[section]} engine has inputs {engine.input_names} and outputs "
                                  f"{engine.output_names}; reasoner_onnx.json declares {inputs} and {outputs}: "
                                  "build the engines again")
        layers = int(description["reasoner"]["num_layers"])
        self._cache_inputs = self._names["decoder"][0][-2 * layers:]
        self.device = decoder.device

    def _run(self, section: str, feeds: dict[str, np.ndarray | Any]) -> list[Any]:
        """Run one engine; feeds as host arrays or torch tensors; the described outputs in order."""
        tensors = {name: self._tensor(value) for name, value in feeds.items()}
        outputs = self._engines[section].run(tensors)
        return [outputs[name] for name in self._names[section][1]]

    def _tensor(self, value: np.ndarray | Any) -> Any:
        """A host array copied to the device (a torch tensor is passed as it is)."""
        if not isinstance(value, np.ndarray):
            return value
        if not (value.flags.c_contiguous and value.flags.writeable):  # e.g. a broadcast view
            value = np.array(value, order="C")
        return self._torch.from_numpy(value).to(self.device)

    def vision(self, pixel_values: np.ndarray) -> list[np.ndarray]:
        (name,) = self._names["vision"][0]
        return [output.cpu().numpy() for output in self._run("vision", {name: pixel_values})]

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        (name,) = self._names["embed"][0]
        (embeds,) = self._run("embed", {name: np.asarray(input_ids, dtype=np.int64)})
        return embeds.float().cpu().numpy()

    def decoder(
        self, embeds: np.ndarray, positions: np.ndarray, deepstack: np.ndarray | None, cache: list[Any]
    ) -> tuple[np.ndarray, list[Any]]:
        batch, length = embeds.shape[:2]
        past = int(cache[0].shape[2])
        feeds: dict[str, Any] = {"inputs_embeds": embeds.astype(np.float32, copy=False),
                                 "position_ids": np.asarray(positions, dtype=np.int64),
                                 "attention_mask": np.ones((batch, past + length), dtype=np.int64)}
        if deepstack is not None:
            feeds["deepstack_embeds"] = deepstack.astype(np.float32, copy=False)
        feeds.update(zip(self._cache_inputs, cache))
        logits, *present = self._run("decoder", feeds)
        return logits.float().cpu().numpy(), present

    def to_cache(self, array: np.ndarray) -> Any:
        return self._tensor(np.asarray(array, dtype=np.float32))

    def take_rows(self, cache: list[Any], rows: np.ndarray) -> list[Any]:
        index = self._torch.as_tensor(np.asarray(rows, dtype=np.int64), device=self.device)
        return [value.index_select(0, index) for value in cache]


def tensorrt_reasoner(
    onnx_dir: str | Path, reasoner_dir: str | Path, reasoner_manifest: dict, open_engine: EngineOpener
) -> OnnxReasoner:
    """The reasoner of a bundle on the engines `open_engine` opens (graph name -> engine).

    Raises:
        BundleError: the ONNX description (prompt, image layout, token ids) or the tokenizer is
            missing or disagrees with the manifest; an engine cannot be opened.
    """
    description = read_description(onnx_dir)
    if "fp32" not in description["decoders"]:
        raise BundleError(f"{onnx_dir}: the engines are built from the fp32 decoder, which the description lacks")
    engines = {section: open_engine(name) for section, name in _GRAPH_NAMES.items()}
    graphs = TensorRTGraphs(description, **engines)
    return OnnxReasoner.from_dir(onnx_dir, reasoner_dir, reasoner_manifest, graphs=graphs)
