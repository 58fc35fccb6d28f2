"""SAM on its exported graphs: the same `embed` / `decode` interface as the torch backend, without torch.

The graphs run on onnxruntime sessions by default; the TensorRT backend (`sam.tensorrt_backend`)
passes sessions of the engines built from the same graphs. Reads a bundle's onnx/ folder as
`star_edge.export.sam_onnx` writes it: the graphs and `sam_onnx.json`, which describes them (files,
input and output names, dtypes, shapes with their dynamic axes named) and the SAM settings the pre-
and post-processing need. Everything around the graphs is numpy: resizing, normalising and padding
the image (`inputs`), prompts as labelled points (`inputs`), choosing the best output and upsampling
it to the original pixels (`masks`).

Description (format_version 2; version 1 had no "linked")::

    {"format": "star-edge-sam-onnx", "format_version": 2, "opset": int,
     "sam": {"kind", "variant", "image_size", "embedding_size": [h, w], "embed_dim",
             "low_res_size": [4h, 4w], "num_outputs", "mask_threshold", "pixel_mean", "pixel_std"},
     "encoder": GRAPH, "decoders": {"fp32": GRAPH, "fp16": GRAPH, "int8": GRAPH (those present)}}
    GRAPH = {"file": str, "inputs": [TENSOR], "outputs": [TENSOR]}   (in the order below)
            [+ "linked": weights read from sam/model.safetensors, see `star_edge.onnx_weights`]
    TENSOR = {"name": str, "dtype": str, "shape": [int | axis name]}

Encoder: pixels (1, 3, S, S) float32 -> image_embeddings (1, C, h, w) float32. Decoder:
image_embeddings, point_coords ("prompts", "points", 2) float32, point_labels ("prompts",
"points") int64 -> low_res_masks ("prompts", M, 4h, 4w) float32, iou_predictions ("prompts", M)
float32; output 0 is the single-mask output, 1.. the multimask outputs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from star_edge.descriptions import graph_io_names, read_description as read_json_description
from star_edge.errors import BundleError, InvalidInputError
from star_edge.onnx_providers import execution_providers
from star_edge.onnx_weights import onnxruntime_session
from star_edge.sam.cache import EmbeddingCache
from star_edge.sam.inputs import check_image, check_prompts, encoder_input, labelled_points
from star_edge.sam.masks import best_outputs, upsample_masks, upsampling_matrices

DESCRIPTION_FILE = "sam_onnx.json"
FORMAT_NAME = "star-edge-sam-onnx"
FORMAT_VERSION = 2
DECODER_VARIANTS = ("fp32", "fp16", "int8")
DEFAULT_CACHE_SIZE = 8


@dataclass(frozen=True)
class OnnxImageEmbedding:
    """One image encoded by the ONNX encoder.

    features: (1, C, h, w) float32 numpy array; original_size: (H, W) of the image given to
    `embed`; input_size: (h', w') of the resized image before padding.
    """

    features: np.ndarray
    original_size: tuple[int, int]
    input_size: tuple[int, int]


def read_description(onnx_dir: str | Path) -> dict[str, Any]:
    """Read and check `onnx_dir/sam_onnx.json`.

    Raises:
        BundleError: missing or unreadable file, another format or version, missing fields;
            the message names the file.
    """
    return read_json_description(Path(onnx_dir) / DESCRIPTION_FILE, FORMAT_NAME, FORMAT_VERSION,
                                 ("sam", "encoder", "decoders"), "the SAM ONNX description")


def check_export_of(onnx_dir: str | Path, declared: dict[str, Any]) -> None:
    """The export in `onnx_dir` must be of the SAM a manifest declares: `declared` holds its kind,
    variant and image_size.

    Raises:
        BundleError: naming the description file and both sides.
    """
    exported = read_description(onnx_dir)["sam"]
    found = {key: exported.get(key) if isinstance(exported, dict) else None for key in declared}
    if found != declared:
        raise BundleError(f"{Path(onnx_dir) / DESCRIPTION_FILE} was exported for {found}, the manifest declares "
                          f"{declared}: export the bundle again")


#: Opens the graph file at a path, given its description (reasoner_onnx.json / sam_onnx.json
#: entry), as a session: `run(output_names, feeds) -> list[np.ndarray]`, `get_inputs()` and
#: `get_outputs()` (objects with `.name`), as onnxruntime's InferenceSession.
SessionOpener = Callable[[Path, dict[str, Any]], Any]


def onnxruntime_sessions(device: str, threads: int | None) -> SessionOpener:
    """A SessionOpener of onnxruntime InferenceSessions on `device` ("cpu" or "cuda[:N]") with
    `threads` intra-op threads (None: onnxruntime's default).

    Raises:
        BackendUnavailableError: onnxruntime (or its CUDA provider, for device="cuda") missing.
        InvalidInputError: a bad device name.
    """
    providers = execution_providers(device)
    linked_weights: list[dict[str, np.ndarray]] = []  # alive as long as the opener (and its sessions)

    def open_session(path: Path, graph: dict[str, Any]) -> Any:
        session, linked = onnxruntime_session(path, graph, providers, threads)
        linked_weights.append(linked)
        return session

    return open_session


def _graph_file(folder: Path, graph: dict[str, Any]) -> Path:
    """The path of a described graph, which must exist."""
    path = folder / str(graph.get("file", ""))
    if not path.is_file():
        raise BundleError(f"{path} is missing (listed in {folder / DESCRIPTION_FILE})")
    return path


def _positive_ints(count: int | None = None) -> Callable[[Any], bool]:
    """A check for a positive int (count None) or a list of `count` of them."""
    def one(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    return one if count is None else lambda v: isinstance(v, list) and len(v) == count and all(map(one, v))


def _finite_numbers(count: int | None = None, nonzero: bool = False) -> Callable[[Any], bool]:
    """A check for a finite number (count None) or a list of `count` of them, optionally nonzero."""
    def one(value: Any) -> bool:
        return (isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))
                and not (nonzero and value == 0))

    return one if count is None else lambda v: isinstance(v, list) and len(v) == count and all(map(one, v))


_SAM_FIELDS: dict[str, Callable[[Any], bool]] = {
    "image_size": _positive_ints(),
    "embed_dim": _positive_ints(),
    "embedding_size": _positive_ints(2),
    "low_res_size": _positive_ints(2),
    "pixel_mean": _finite_numbers(3),
    "pixel_std": _finite_numbers(3, nonzero=True),
    "mask_threshold": _finite_numbers(),
}
"""The "sam" section's fields that decoding reads, each with its check."""


def _checked_sam_section(section: dict[str, Any], path: Path) -> dict[str, Any]:
    """The description's "sam" section, every field that decoding reads present and well-formed.

    Raises:
        BundleError: naming the file and the first bad field.
    """
    for key, valid in _SAM_FIELDS.items():
        if not valid(section.get(key)):
            raise BundleError(f"{path}: sam.{key} is missing or malformed ({section.get(key)!r}): "
                              "export the bundle again")
    return section


class OnnxMaskDecoder:
    """SAM image encoder + prompt decoder on its exported graphs (`embed` once, `decode` many prompts).

    Embeddings are cached by image content (bounded LRU, `cache_size` entries of C * h * w * 4
    bytes each: 4 MiB for the official models). onnxruntime sessions may be run from several
    threads at once (the TensorRT sessions serialise their runs), so one instance may serve
    several threads.
    """

    def __init__(
        self,
        onnx_dir: str | Path,
        device: str = "cpu",
        decoder_variant: str = "fp32",
        cache_size: int = DEFAULT_CACHE_SIZE,
        max_batch: int = 8,
        threads: int | None = None,
        open_session: SessionOpener | None = None,
    ) -> None:
        """Open the decoder graph of an exported onnx/ folder; the encoder graph opens on the
        first `embed` (a decoder that only decodes given embeddings never holds it).

        decoder_variant: "fp32", "fp16" (float16 weights and compute, float32 inputs and
            outputs) or "int8" (dynamically quantised matrix products); see
            `available_variants`.
        max_batch: prompts per decoder run (bounds the session's working memory).
        threads: onnxruntime intra-op threads; None: its default (one per physical core).
        open_session: opens a graph file as a session; None: `onnxruntime_sessions(device,
            threads)`. The TensorRT backend passes one that opens the graph's engine.

        Raises:
            BundleError: description or graph files missing or unreadable, naming the file.
            BackendUnavailableError: onnxruntime (or its CUDA provider, for device="cuda") is
                not installed.
            InvalidInputError: bad device, variant, cache_size, max_batch or threads.
        """
        given_threads = 1 if threads is None else threads
        for name, value in (("max_batch", max_batch), ("threads", given_threads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name} must be an int >= 1, got {value!r}")
        self._cache: EmbeddingCache[OnnxImageEmbedding] = EmbeddingCache(cache_size)
        self._max_batch = max_batch
        self._folder = Path(onnx_dir)
        description = read_description(self._folder)
        decoders = description["decoders"]
        if decoder_variant not in decoders:
            exported = f"{sorted(decoders)} (exported in {self._folder})"
            message = f"decoder_variant must be one of {exported}, got {decoder_variant!r}"
            raise InvalidInputError(message)
        self._sam = _checked_sam_section(description["sam"], self._folder / DESCRIPTION_FILE)
        self._open_session = open_session or onnxruntime_sessions(device, threads)
        self._encoder_graph = description["encoder"]
        _graph_file(self._folder, self._encoder_graph)
        self._encoder: tuple | None = None
        self._encoder_lock = threading.Lock()
        self._decoder, self._decoder_io = self._open(decoders[decoder_variant])
        self.decoder_variant = decoder_variant

    def _open(self, graph: dict[str, Any]) -> tuple:
        """A session for one described graph and its (input names, output names)."""
        path = _graph_file(self._folder, graph)
        session = self._open_session(path, graph)
        names = graph_io_names(graph, self._folder / DESCRIPTION_FILE)
        found = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
        if sorted(names[0]) != sorted(found[0]) or sorted(names[1]) != sorted(found[1]):
            raise BundleError(f"{path} has inputs/outputs {found}, the description says {names}")
        return session, names

    @classmethod
    def from_dir(
        cls,
        onnx_dir: str | Path,
        device: str = "cpu",
        decoder_variant: str = "fp32",
        cache_size: int = DEFAULT_CACHE_SIZE,
        max_batch: int = 8,
        threads: int | None = None,
        open_session: SessionOpener | None = None,
    ) -> OnnxMaskDecoder:
        """Open a bundle's onnx/ folder (see the class and module docstrings)."""
        return cls(onnx_dir, device, decoder_variant, cache_size, max_batch, threads, open_session)

    @staticmethod
    def available_variants(onnx_dir: str | Path) -> list[str]:
        """The decoder variants exported in `onnx_dir`, in DECODER_VARIANTS order."""
        decoders = read_description(onnx_dir)["decoders"]
        return [variant for variant in DECODER_VARIANTS if variant in decoders]

    @property
    def image_size(self) -> int:
        """Side of the square encoder input in pixels."""
        return int(self._sam["image_size"])

    @property
    def cache(self) -> EmbeddingCache[OnnxImageEmbedding]:
        """The embedding cache (hits, misses, len, clear)."""
        return self._cache

    def embed(self, image: np.ndarray) -> OnnxImageEmbedding:
        """Encode one image (or return the cached embedding of the same pixels).

        image: (H, W, 3) uint8 RGB; resized, normalised and padded as the torch backend does.

        Raises:
            InvalidInputError: not an (H, W, 3) uint8 array.
        """
        image = check_image(image)
        return self._cache.get_or_compute(image, lambda: self._embed(image))

    def _embed(self, image: np.ndarray) -> OnnxImageEmbedding:
        pixels, input_size = encoder_input(
            image, self.image_size, self._sam["pixel_mean"], self._sam["pixel_std"]
        )
        with self._encoder_lock:
            if self._encoder is None:
                self._encoder = self._open(self._encoder_graph)
        session, ((pixels_name,), (features_name,)) = self._encoder
        (features,) = session.run([features_name], {pixels_name: pixels})
        original_size = (int(image.shape[0]), int(image.shape[1]))
        features = np.ascontiguousarray(features, dtype=np.float32)
        return OnnxImageEmbedding(features, original_size, input_size)

    def decode(
        self,
        embedding: OnnxImageEmbedding,
        boxes: np.ndarray | None = None,
        points: np.ndarray | None = None,
        multimask: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Masks for K prompts on an embedded image (see the torch backend's `decode`).

        boxes: (K, 4) real (x1, y1, x2, y2) or None; points: (K, 2) real (x, y) or None, one
        positive point per prompt, original pixels.

        Returns:
            masks: (K, H, W) bool; scores: (K,) float32 predicted IoU of each returned mask.

        Raises:
            InvalidInputError: bad embedding, shapes, dtypes or non-finite coordinates.
        """
        self._check_embedding(embedding)
        boxes, points, count = check_prompts(boxes, points, multimask)
        height, width = embedding.original_size
        if count == 0:
            return np.zeros((0, height, width), dtype=bool), np.zeros((0,), dtype=np.float32)
        coords, labels = labelled_points(boxes, points, embedding.original_size, self.image_size)
        low_res = tuple(self._sam["low_res_size"])
        rows, cols = upsampling_matrices(
            low_res, self.image_size, embedding.input_size, (height, width)
        )
        logits = np.empty((count, rows.shape[1], cols.shape[1]), dtype=np.float32)
        scores = np.empty((count,), dtype=np.float32)
        names, (masks_name, iou_name) = self._decoder_io
        for start in range(0, count, self._max_batch):
            group = slice(start, start + self._max_batch)
            feeds = dict(zip(names, (embedding.features, coords[group], labels[group])))
            outputs, predicted = self._decoder.run([masks_name, iou_name], feeds)
            best = best_outputs(predicted, multimask)
            chosen = np.arange(len(best))
            logits[group] = outputs[chosen, best, : rows.shape[1], : cols.shape[1]]
            scores[group] = predicted[chosen, best]
        return upsample_masks(logits, rows, cols, float(self._sam["mask_threshold"])), scores

    def _check_embedding(self, embedding: object) -> None:
        if not isinstance(embedding, OnnxImageEmbedding):
            kind = type(embedding).__name__
            raise InvalidInputError(f"embedding must be an OnnxImageEmbedding, got {kind}")
        expected = (1, int(self._sam["embed_dim"]), *self._sam["embedding_size"])
        found = (tuple(embedding.features.shape), embedding.features.dtype)
        if found != (expected, np.float32):
            raise InvalidInputError(
                f"embedding features {found[0]} {found[1]} do not come from this decoder "
                f"(expected {expected} float32)"
            )
