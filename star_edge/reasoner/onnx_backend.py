"""The reasoner on its exported graphs: the interface of `TorchReasoner`, without torch or transformers.

Reads a bundle's onnx/ folder as `star_edge.export.reasoner_onnx` writes it (the graphs and
`reasoner_onnx.json`) and the tokenizer.json of its reasoner/ checkpoint. Preprocessing is numpy
(`reasoner.preprocess`); token selection, seeding and the finished-row bookkeeping are the torch
backend's own (`reasoner.decoding`), so both draw the same tokens from the same logits.

One `prefill` runs the vision graph once, the embedding graph on the prompt, puts the image
features in at the image tokens, and runs the decoder once (batch 1, past length 0). `sample` then
repeats the prompt's keys and values to the rows and decodes all rows in one batch per step,
dropping finished rows.

What runs the three graphs is a `ReasonerGraphs`: onnxruntime sessions by default
(`reasoner.onnx_graphs`), or the TensorRT engines built from the same graphs
(`reasoner.tensorrt_backend`); the cache values are the runner's own (onnxruntime values, CUDA
tensors), so they stay on its device between steps.

Description (format_version 2; version 1 had no "linked")::

    {"format": "star-edge-reasoner-onnx", "format_version": 2, "opset": int,
     "reasoner": {"family", "frame", "prompt_template", "prompt": {"prefix", "suffix", "image_token"},
                  "image": {"input_size", "patch_size", "temporal_patch_size", "merge_size", "mean",
                            "std", "rescale_factor", "grid_thw", "image_tokens"},
                  "image_token_id", "eos_token_ids", "hidden_size", "vocab_size", "num_layers",
                  "num_kv_heads", "head_dim", "deepstack_layers"},
     "vision": GRAPH, "embed": GRAPH, "decoders": {"fp32": GRAPH, "int8": GRAPH, "fp16": GRAPH},
     "fingerprint": str, "verified": {"tolerance", "vision", "prefill_logits", ...}}
    GRAPH = {"file": str, "inputs": [TENSOR], "outputs": [TENSOR]};  TENSOR = {"name", "dtype", "shape"}
            [+ "linked": weights read from the reasoner's safetensors, see `star_edge.onnx_weights`]
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import PIL.Image

from star_edge.descriptions import read_description as read_json_description, read_json
from star_edge.errors import BundleError, InvalidInputError
from star_edge.reasoner import ReasonerOutput, build_messages, decoding
from star_edge.reasoner.onnx_graphs import OnnxRuntimeGraphs
from star_edge.reasoner.preprocess import ImageLayout, PromptText, PromptTokenizer, mrope_positions, pixel_patches
from star_edge.reasoner.prompts import check_prompt_length, context_length

DESCRIPTION_FILE = "reasoner_onnx.json"
FORMAT_NAME = "star-edge-reasoner-onnx"
FORMAT_VERSION = 2
DECODER_VARIANTS = ("fp32", "int8", "fp16")
GRAPH_FILES = {
    "vision": "reasoner_vision.onnx",
    "embed": "reasoner_embed.onnx",
    "decoder": "reasoner_decoder.onnx",
    "decoder_int8": "reasoner_decoder_int8.onnx",
    "decoder_fp16": "reasoner_decoder_fp16.onnx",
}


def read_description(onnx_dir: str | Path) -> dict[str, Any]:
    """Read and check `onnx_dir/reasoner_onnx.json`.

    Raises:
        BundleError: missing or unreadable file, another format or version, missing sections; the
            message names the file.
    """
    return read_json_description(Path(onnx_dir) / DESCRIPTION_FILE, FORMAT_NAME, FORMAT_VERSION,
                                 ("reasoner", "vision", "embed", "decoders"), "the reasoner ONNX description")


@dataclass
class PromptInputs:
    """One image and query as the graphs take them.

    Attributes:
        input_ids: (L,) int64, the prompt with one image token per merged patch.
        image_mask: (L,) bool, True at the image tokens.
        pixel_values: (P, D) float32, the image's patches (`preprocess.pixel_patches`).
        positions: (3, L) int64, the M-RoPE rows (temporal, height, width).
    """

    input_ids: np.ndarray
    image_mask: np.ndarray
    pixel_values: np.ndarray
    positions: np.ndarray


@dataclass
class OnnxPrefill:
    """The shared state of one prompt (never modified: decoding copies the cache).

    Attributes:
        cache: per layer its keys then values, values of the graphs runner (1, kv_heads, L, head_dim) float32.
        logits: (1, V) float32, the next-token logits after the prompt.
        last_position: (3,) int64, the M-RoPE position of the prompt's last token.
        prompt_length: tokens in the prompt, image tokens included.
        image_tokens: image tokens in the prompt.
        vision_ms: time of the vision graph (ms).
        prefill_ms: time of the embedding and the decoder reading the prompt (ms).
    """

    cache: list[Any]
    logits: np.ndarray
    last_position: np.ndarray
    prompt_length: int
    image_tokens: int
    vision_ms: float
    prefill_ms: float


@dataclass
class PreparedPrompt:
    """One image and query, encoded and prefilled once (`OnnxReasoner.prefill`).

    Attributes:
        state: the shared KV cache and first-token logits.
        timings: "preprocess", "vision", "prefill" in ms.
    """

    state: OnnxPrefill
    timings: dict[str, float]


class ReasonerGraphs(Protocol):
    """What runs the three graphs of reasoner_onnx.json for `OnnxReasoner`. Cache values are the
    runner's own (a value per layer's keys, then values: (B, kv_heads, P, head_dim) float32)."""

    def vision(self, pixel_values: np.ndarray) -> list[np.ndarray]:
        """pixel_values (P, D) float32 -> image features (N, hidden) float32 [, deepstack (K, N, hidden)]."""

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        """input_ids (B, S) int64 -> inputs_embeds (B, S, hidden) float32 (a writable host array)."""

    def decoder(
        self, embeds: np.ndarray, positions: np.ndarray, deepstack: np.ndarray | None, cache: list[Any]
    ) -> tuple[np.ndarray, list[Any]]:
        """embeds (B, S, hidden) float32, positions (3, B, S) int64, deepstack (K, B, S, hidden) float32
        or None, the past cache (P may be 0) -> the last position's logits (B, V) float32 on the host and
        the present cache (P + S positions); every position attends to all earlier ones."""

    def to_cache(self, array: np.ndarray) -> Any:
        """A host array (B, kv_heads, P, head_dim) float32 as a cache value."""

    def take_rows(self, cache: list[Any], rows: np.ndarray) -> list[Any]:
        """The cache values with their rows (axis 0) taken at `rows` (R,) int64, repeats allowed."""


class OnnxReasoner:
    """A Qwen2.5-VL / Qwen3-VL reasoner on its exported graphs (see the module doc).

    Attributes:
        family, input_size, frame, prompt_template, max_new_tokens: as `TorchReasoner`'s.
        decoder_variant: "fp32", "int8" or "fp16".
        eos_token_ids: ids that end an answer.
    """

    def __init__(
        self,
        onnx_dir: str | Path,
        reasoner_dir: str | Path,
        max_new_tokens: int | None = None,
        device: str = "cpu",
        decoder_variant: str = "fp32",
        threads: int | None = None,
        graphs: ReasonerGraphs | None = None,
    ) -> None:
        """Open the graphs of an exported onnx/ folder.

        Args:
            onnx_dir: the bundle's onnx/ folder.
            reasoner_dir: the bundle's reasoner/ checkpoint (its tokenizer.json is read).
            max_new_tokens: the most tokens per answer; None -> 1024.
            device: "cpu" or "cuda[:N]" (onnxruntime's TensorRT / CUDA providers where installed).
            decoder_variant: one of the exported decoders (see `available_variants`).
            threads: onnxruntime intra-op threads; None: its default (one per physical core).
            graphs: what runs the graphs; None opens onnxruntime sessions of `decoder_variant` on
                `device` with `threads`. The TensorRT backend passes its engines here (built from
                the `decoder_variant` graph; device and threads are then the engines' own).

        Raises:
            BundleError: description, graph or tokenizer missing or unreadable, naming the file.
            BackendUnavailableError: onnxruntime (or its CUDA provider, for device="cuda") missing.
            InvalidInputError: bad device, variant, max_new_tokens or threads.
        """
        for name, value in (("max_new_tokens", 1024 if max_new_tokens is None else max_new_tokens),
                            ("threads", 1 if threads is None else threads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name} must be an int >= 1, got {value!r}")
        folder = Path(onnx_dir)
        description = read_description(folder)
        decoders = description["decoders"]
        if decoder_variant not in decoders:
            raise InvalidInputError(f"decoder_variant must be one of {sorted(decoders)} (exported in {folder}), "
                                    f"got {decoder_variant!r}")
        spec = description["reasoner"]
        image = spec["image"]
        self.family: str = spec["family"]
        self.frame: str = spec["frame"]
        self.prompt_template: str = spec["prompt_template"]
        self.input_size = (int(image["input_size"][0]), int(image["input_size"][1]))
        self.max_new_tokens = 1024 if max_new_tokens is None else max_new_tokens
        self.decoder_variant = decoder_variant
        self.eos_token_ids = [int(v) for v in spec["eos_token_ids"]]
        self._layout = ImageLayout(self.input_size, int(image["patch_size"]), int(image["temporal_patch_size"]),
                                   int(image["merge_size"]), tuple(image["mean"]), tuple(image["std"]),
                                   float(image["rescale_factor"]))
        prompt = spec["prompt"]
        self._prompt = PromptText(prompt["prefix"], prompt["suffix"], prompt["image_token"])
        self._tokenizer = PromptTokenizer(Path(reasoner_dir) / "tokenizer.json")
        config_file = Path(reasoner_dir) / "config.json"
        self._context = (context_length(read_json(config_file, "the reasoner config"))
                         if config_file.is_file() else None)
        self._image_token_id = int(spec["image_token_id"])
        self._hidden = int(spec["hidden_size"])
        self._layers = int(spec["num_layers"])
        self._cache_shape = (int(spec["num_kv_heads"]), int(spec["head_dim"]))
        self._deepstack = int(spec["deepstack_layers"])
        self._graphs = graphs if graphs is not None else OnnxRuntimeGraphs(
            folder, description, decoder_variant, device, threads)
        self._lock = threading.Lock()

    @classmethod
    def from_dir(
        cls,
        onnx_dir: str | Path,
        reasoner_dir: str | Path,
        reasoner_manifest: dict | None = None,
        device: str = "cpu",
        decoder_variant: str = "fp32",
        threads: int | None = None,
        graphs: ReasonerGraphs | None = None,
    ) -> OnnxReasoner:
        """Open an exported onnx/ folder; `reasoner_manifest` (the bundle manifest's reasoner
        section), when given, must describe the exported model and sets max_new_tokens. The other
        arguments are the constructor's.

        Raises:
            BundleError: also when the manifest and the export disagree (family, frame, template,
                input size).
        """
        max_new_tokens = None if reasoner_manifest is None else reasoner_manifest.get("max_new_tokens")
        reasoner = cls(onnx_dir, reasoner_dir, max_new_tokens, device, decoder_variant, threads, graphs)
        if reasoner_manifest is not None:
            exported = {"family": reasoner.family, "frame": reasoner.frame, "prompt_template": reasoner.prompt_template,
                        "input_size": list(reasoner.input_size)}
            declared = {key: reasoner_manifest.get(key) for key in exported}
            if declared != exported:
                raise BundleError(f"{Path(onnx_dir) / DESCRIPTION_FILE} was exported for {exported}, "
                                  f"the manifest declares {declared}: export the bundle again")
        return reasoner

    @staticmethod
    def available_variants(onnx_dir: str | Path) -> list[str]:
        """The decoder variants exported in `onnx_dir`, in DECODER_VARIANTS order."""
        decoders = read_description(onnx_dir)["decoders"]
        return [variant for variant in DECODER_VARIANTS if variant in decoders]

    def prompt_inputs(self, image: PIL.Image.Image, query: str) -> PromptInputs:
        """The graphs' inputs for one image and query (what `TorchReasoner.hf_inputs` gives torch).

        Raises:
            InvalidInputError: not a PIL image; an empty query or one containing special tokens; a
                prompt that with `max_new_tokens` passes the model's context (reasoner/config.json).
        """
        if not isinstance(image, PIL.Image.Image):
            raise InvalidInputError(f"the reasoner takes a PIL image, got {type(image).__name__}")
        build_messages(query, frame=self.frame, template=self.prompt_template)  # validates the query
        if any(token in query for token in self._tokenizer.special_tokens):
            raise InvalidInputError("the query contains a special token of the model's chat format")
        input_ids = self._tokenizer.encode(self._prompt.render(query.strip(), self._layout.image_tokens))
        check_prompt_length(len(input_ids), self.max_new_tokens, self._context)
        image_mask = input_ids == self._image_token_id
        positions = mrope_positions(image_mask, self._layout.grid, self._layout.merge_size)
        return PromptInputs(input_ids, image_mask, pixel_patches(image, self._layout), positions)

    def vision_features(self, pixel_values: np.ndarray) -> list[np.ndarray]:
        """The vision graph's outputs: image features (N, hidden) float32 [, deepstack (K, N, hidden)]."""
        return self._graphs.vision(pixel_values)

    def prefill(self, image: PIL.Image.Image, query: str) -> PreparedPrompt:
        """Encode `image` and read the prompt for `query` once; sample rows from it with `sample`.

        Raises:
            InvalidInputError: see `prompt_inputs`.
        """
        with self._lock:
            start = time.perf_counter()
            prompt = self.prompt_inputs(image, query)
            preprocessed = time.perf_counter()
            features = self.vision_features(prompt.pixel_values)
            encoded = time.perf_counter()
            embeds = self._graphs.embed(prompt.input_ids[None, :])
            embeds[0, prompt.image_mask] = features[0]
            deepstack = None
            if self._deepstack:
                deepstack = np.zeros((self._deepstack, *embeds.shape), dtype=np.float32)
                deepstack[:, 0, prompt.image_mask] = features[1]
            heads, head_dim = self._cache_shape
            empty = self._graphs.to_cache(np.zeros((1, heads, 0, head_dim), dtype=np.float32))
            logits, cache = self._graphs.decoder(embeds, prompt.positions[:, None, :], deepstack,
                                                 [empty] * (2 * self._layers))
            end = time.perf_counter()
        state = OnnxPrefill(cache=cache, logits=logits, last_position=prompt.positions[:, -1].copy(),
                            prompt_length=int(prompt.input_ids.shape[0]), image_tokens=int(prompt.image_mask.sum()),
                            vision_ms=(encoded - preprocessed) * 1e3, prefill_ms=(end - encoded) * 1e3)
        timings = {"preprocess": (preprocessed - start) * 1e3, "vision": state.vision_ms, "prefill": state.prefill_ms}
        return PreparedPrompt(state=state, timings=timings)

    def expand_cache(self, state: OnnxPrefill, rows: int) -> list[Any]:
        """The prompt's cache repeated to `rows` rows: (rows, kv_heads, L, head_dim) per tensor."""
        return self._graphs.take_rows(state.cache, np.zeros(rows, dtype=np.int64))

    def decode_step(self, cache: list[Any], tokens: np.ndarray, position: np.ndarray) -> tuple[np.ndarray, list[Any]]:
        """One batched decoding step: feed each row its last token after `cache`.

        Args:
            cache: per layer keys then values, (B, kv_heads, P, head_dim) values of the runner.
            tokens: (B,) int64, each row's last token.
            position: (3,) int64, the M-RoPE position of these tokens (shared by all rows).

        Returns:
            (B, V) float32 next-token logits and the cache extended by one token.
        """
        embeds = self._graphs.embed(np.asarray(tokens, dtype=np.int64)[:, None])
        positions = np.broadcast_to(position[:, None, None], (3, tokens.shape[0], 1))
        deepstack = np.zeros((self._deepstack, tokens.shape[0], 1, self._hidden), np.float32) if self._deepstack else None
        return self._graphs.decoder(embeds, positions, deepstack, cache)

    def sample(
        self,
        prepared: PreparedPrompt,
        rows: Sequence[int],
        seed: int | None = None,
        on_finished: Callable[[list[tuple[int, str]]], bool] | None = None,
    ) -> ReasonerOutput:
        """Sampled answers (temperature 1.0, top-p 0.9) for `rows` of the seeded sample stream, in one
        batch; as `TorchReasoner.sample` (row i depends only on image, query, seed and i; not with
        the int8 decoder, which quantises each step's activations with one scale for the batch).

        Raises:
            InvalidInputError: bad rows or seed.
        """
        rows = decoding.checked_rows(rows)
        decoding.check_seed(seed)
        return self._decode(prepared, rows, seed, greedy=False, on_finished=on_finished)

    def generate(self, image: PIL.Image.Image, query: str, n: int = 1, seed: int | None = None) -> ReasonerOutput:
        """n answers for `query` about `image` from one vision encode and one prefill; as
        `TorchReasoner.generate` (n == 1 greedy, n > 1 sampled rows 0..n-1 of the seeded stream).

        Returns:
            ReasonerOutput with n texts, their token ids, timings in ms ("preprocess", "vision",
            "prefill", "decode", "generate") and token counts ("prompt", "image", "generated").

        Raises:
            InvalidInputError: n not a positive integer; see `prompt_inputs` for image and query.
        """
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise InvalidInputError(f"n must be a positive integer, got {n!r}")
        prepared = self.prefill(image, query)
        output = self._decode(prepared, [0], None, greedy=True) if n == 1 else self.sample(prepared, range(n), seed)
        timings = {**prepared.timings, **output.timings}
        timings["generate"] = timings["vision"] + timings["prefill"] + timings["decode"]
        output.timings = timings
        return output

    def _decode(
        self,
        prepared: PreparedPrompt,
        rows: list[int],
        seed: int | None,
        greedy: bool,
        on_finished: Callable[[list[tuple[int, str]]], bool] | None = None,
    ) -> ReasonerOutput:
        state = prepared.state
        cache: list[Any] | None = None
        position = state.last_position

        def step(tokens: np.ndarray, kept: np.ndarray | None) -> np.ndarray:
            nonlocal cache, position
            if cache is None:
                cache = self.expand_cache(state, len(tokens))
            elif kept is not None:
                cache = self._graphs.take_rows(cache, kept)
            position = position + 1
            logits, cache = self.decode_step(cache, tokens, position)
            return logits

        text = self._tokenizer.decode
        with self._lock:
            decoded = decoding.decode_rows(state.logits, step, rows, seed, self.eos_token_ids, self.max_new_tokens,
                                           greedy=greedy, on_finished=decoding.text_hook(on_finished, rows, text))
        return decoding.reasoner_output(decoded, rows, text, state.prompt_length, state.image_tokens)

