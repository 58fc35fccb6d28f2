"""The reasoner's three exported graphs on onnxruntime: the ONNX backend's default `ReasonerGraphs`.

The keys and values stay onnxruntime values bound to the decoder's inputs and outputs (IO binding):
on a GPU they stay in device memory between steps; only the logits come to the host, and the cache
goes through the host only when rows are repeated or dropped (`take_rows`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from star_edge.descriptions import graph_io_names
from star_edge.errors import BundleError
from star_edge.onnx_providers import execution_providers
from star_edge.onnx_weights import onnxruntime_session


class _Graph:
    """One InferenceSession and its described input and output names; weights linked from the
    bundle's checkpoint (`star_edge.onnx_weights`) are read and handed to the session."""

    def __init__(self, folder: Path, graph: dict[str, Any], threads: int | None, providers: list[Any]) -> None:
        path = folder / str(graph.get("file", ""))
        if not path.is_file():
            raise BundleError(f"{path} is missing (listed in the ONNX description in {folder})")
        self.session, self._linked = onnxruntime_session(path, graph, providers, threads)
        self.inputs, self.outputs = graph_io_names(graph, f"the ONNX description in {folder}")
        found = ([i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()])
        if sorted(found[0]) != sorted(self.inputs) or sorted(found[1]) != sorted(self.outputs):
            raise BundleError(f"{path} has inputs/outputs {found}, the description says {(self.inputs, self.outputs)}")

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.outputs, feeds)


class OnnxRuntimeGraphs:
    """The vision, embedding and decoder graphs of an onnx/ folder as onnxruntime sessions; the KV
    cache as onnxruntime values (OrtValue) on the sessions' device."""

    def __init__(
        self, folder: Path, description: dict[str, Any], decoder_variant: str, device: str, threads: int | None
    ) -> None:
        """Open the graphs that `description` (the folder's reasoner_onnx.json) lists.

        Raises:
            BackendUnavailableError: onnxruntime (or its CUDA provider, for device="cuda") missing.
            BundleError: a graph missing, unloadable or not as described.
            InvalidInputError: a bad device name.
        """
        providers = execution_providers(device)
        self._vision = _Graph(folder, description["vision"], threads, providers)
        self._embed = _Graph(folder, description["embed"], threads, providers)
        self._decoder = _Graph(folder, description["decoders"][decoder_variant], threads, providers)
        self._cache_inputs = self._decoder.inputs[-2 * int(description["reasoner"]["num_layers"]):]
        name, _, index = device.partition(":")
        self._device = (name, int(index or 0))

    def vision(self, pixel_values: np.ndarray) -> list[np.ndarray]:
        return self._vision.run({self._vision.inputs[0]: pixel_values})

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        (embeds,) = self._embed.run({self._embed.inputs[0]: np.ascontiguousarray(input_ids, dtype=np.int64)})
        return embeds

    def decoder(
        self, embeds: np.ndarray, positions: np.ndarray, deepstack: np.ndarray | None, cache: list[Any]
    ) -> tuple[np.ndarray, list[Any]]:
        batch, length = embeds.shape[:2]
        past = cache[0].shape()[2]
        binding = self._decoder.session.io_binding()
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, dtype=np.float32))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ones((batch, past + length), dtype=np.int64))
        if deepstack is not None:
            binding.bind_cpu_input("deepstack_embeds", np.ascontiguousarray(deepstack, dtype=np.float32))
        for name, value in zip(self._cache_inputs, cache):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        device_type, device_id = self._device
        for name in self._decoder.outputs[1:]:
            binding.bind_output(name, device_type, device_id)
        self._decoder.session.run_with_iobinding(binding)
        logits, *present = binding.get_outputs()
        return logits.numpy(), present

    def to_cache(self, array: np.ndarray) -> Any:
        from onnxruntime import OrtValue

        device_type, device_id = self._device
        return OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device_type, device_id)

    def take_rows(self, cache: list[Any], rows: np.ndarray) -> list[Any]:
        return [self.to_cache(value.numpy()[rows]) for value in cache]
