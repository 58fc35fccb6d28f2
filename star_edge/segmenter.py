"""`Segmenter`: the user-facing pipeline (DESIGN section 1).

image, query -> reasoner draws N answers (one vision encode, one prefill) -> each parsed (a bad
sample is recorded, never raised) -> SAM embeds the image once and decodes every prompt of every
sample in one call -> mask-level majority voting (N > 1) -> Result.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from star_edge.adaptive import vote_is_settled
from star_edge.answer import Answer, ParseError, parse
from star_edge.bundle import Bundle, load_bundle
from star_edge.errors import BackendUnavailableError, InvalidInputError, StarEdgeError
from star_edge.images import ImageInput, load_image, validate_query
from star_edge.result import ObjectMask, Result, Sample
from star_edge.vote import VoteConfig, majority_vote, union_mask

MAX_SAMPLES = 64
MAX_SEED = 2**63 - 1


class ReasonerBackend(Protocol):
    """What the Segmenter needs of a reasoner backend."""

    def generate(self, image: Image.Image, query: str, n: int = 1, seed: int | None = None) -> Any:
        """Return an object with `texts: list[str]`, `token_ids: list[list[int]]`, `rows: list[int]`
        (the sample row of each text) and `timings: dict[str, float]` (ms)."""

    def prefill(self, image: Image.Image, query: str) -> Any:
        """Encode the image and read the prompt once; return a handle with `timings` (ms)."""

    def sample(
        self,
        prepared: Any,
        rows: Sequence[int],
        seed: int | None = None,
        on_finished: Callable[[list[tuple[int, str]]], bool] | None = None,
    ) -> Any:
        """Rows of the seeded sample stream of a prefilled prompt, decoded in one batch; after each
        step that finished answers, `on_finished` sees their (row, text) and may stop the rest."""


class MaskDecoderBackend(Protocol):
    """What the Segmenter needs of a SAM backend."""

    def embed(self, image: np.ndarray) -> Any: ...

    def decode(
        self, embedding: Any, boxes: np.ndarray | None, points: np.ndarray | None, multimask: bool = True
    ) -> tuple[np.ndarray, np.ndarray]: ...

    @property
    def cache(self) -> Any:
        """The embedding cache (`star_edge.sam.cache.EmbeddingCache`: hits, misses, clear)."""


class Segmenter:
    """Reasoning segmentation with one loaded bundle.

    Thread-safe: calls from several threads are serialised on one lock per Segmenter (the torch
    backends are not re-entrant); results depend only on the inputs and the seed. Torch work runs
    on the intra-op thread count that the loading thread had, whichever thread calls.
    """

    def __init__(
        self,
        bundle: Bundle,
        reasoner: ReasonerBackend,
        mask_decoder: MaskDecoderBackend,
        vote_config: VoteConfig | None = None,
        backend: str | None = None,
    ) -> None:
        """`backend`: the name of the backend that runs the models ("torch", "onnx", "tensorrt"),
        as `from_pretrained` chose it; None for backends given here directly."""
        self.bundle = bundle
        self.reasoner = reasoner
        self.mask_decoder = mask_decoder
        self.vote_config = vote_config or VoteConfig()
        self.backend = backend
        self._lock = threading.Lock()
        self._torch_threads: int | None = None

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        backend: str = "auto",
        device: str = "cpu",
        vote_config: VoteConfig | None = None,
    ) -> "Segmenter":
        """Load a bundle.

        Args:
            path: a bundle folder; None for the default bundle.
            backend: "auto", "torch", "onnx" or "tensorrt" (the bundle must contain that backend's
                files; for "tensorrt", engines built for this GPU and TensorRT version). "auto"
                takes the bundle's ONNX graphs on the CPU (they load without torch or
                transformers, in a fraction of the time; fp32, verified against torch at export)
                and torch on a GPU, each where the bundle has its files and this machine the
                package, else the other one; the choice is `Segmenter.backend`.
            device: "cpu", "cuda" or "cuda:N" ("tensorrt" needs a CUDA device).
            vote_config: majority-voting knobs (defaults: the StAR reference values).
        """
        if backend not in ("auto", "torch", "onnx", "tensorrt"):
            raise InvalidInputError(f"backend must be 'auto', 'torch', 'onnx' or 'tensorrt', got {backend!r}")
        _check_device_name(device)
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise InvalidInputError(f"path must be a bundle folder or None, got {type(path).__name__}")
        if path is None:
            from star_edge.defaults import default_bundle_path

            path = default_bundle_path()
        bundle = load_bundle(path)
        if backend == "auto":
            backend = _automatic_backend(bundle, device)
        if backend == "tensorrt":
            return cls._load_tensorrt(bundle, device, vote_config)
        if backend not in bundle.backends:
            raise BackendUnavailableError(
                f"bundle {bundle.root} has no {backend!r} files (it has: {', '.join(bundle.backends)}); "
                f"use backend={bundle.backends[0]!r}"
            )
        if backend == "onnx":
            return cls._load_onnx(bundle, device, vote_config)
        return cls._load_torch(bundle, device, vote_config)

    @classmethod
    def _load_onnx(cls, bundle: Bundle, device: str, vote_config: VoteConfig | None) -> "Segmenter":
        """The bundle's onnx/ graphs on onnxruntime (fp32 decoders); torch is never imported."""
        from star_edge.reasoner.onnx_backend import OnnxReasoner
        from star_edge.sam.onnx_backend import OnnxMaskDecoder, check_export_of

        onnx_dir = bundle.root / "onnx"
        check_export_of(onnx_dir, bundle.sam.model)
        reasoner = OnnxReasoner.from_dir(onnx_dir, bundle.reasoner_dir, bundle.manifest["reasoner"], device=device)
        return cls(bundle, reasoner, OnnxMaskDecoder.from_dir(onnx_dir, device=device), vote_config, "onnx")

    @classmethod
    def _load_tensorrt(cls, bundle: Bundle, device: str, vote_config: VoteConfig | None) -> "Segmenter":
        """The bundle's engines for this GPU and TensorRT version (raises BackendUnavailableError,
        naming what is missing, without TensorRT 10, torch with CUDA, or such engines)."""
        from star_edge.reasoner.tensorrt_backend import tensorrt_reasoner
        from star_edge.sam.onnx_backend import check_export_of
        from star_edge.sam.tensorrt_backend import tensorrt_mask_decoder
        from star_edge.tensorrt_runtime import detect_platform, engine_opener, select_engines

        platform = detect_platform(device)
        engines = select_engines(bundle, platform)
        open_engine = engine_opener(bundle, engines, platform)
        onnx_dir = bundle.root / "onnx"
        check_export_of(onnx_dir, bundle.sam.model)
        reasoner = tensorrt_reasoner(onnx_dir, bundle.reasoner_dir, bundle.manifest["reasoner"], open_engine)
        mask_decoder = tensorrt_mask_decoder(onnx_dir, open_engine, engines.max_prompts)
        return cls(bundle, reasoner, mask_decoder, vote_config, "tensorrt")

    @classmethod
    def _load_torch(cls, bundle: Bundle, device: str, vote_config: VoteConfig | None) -> "Segmenter":
        import torch

        from star_edge.reasoner.torch_backend import TorchReasoner
        from star_edge.sam.torch_backend import MaskDecoder

        _check_torch_device(device)
        reasoner_manifest = bundle.manifest["reasoner"]
        reasoner = TorchReasoner.from_dir(bundle.reasoner_dir, reasoner_manifest, device=device)
        mask_decoder = MaskDecoder.from_dir(bundle.sam_dir, device=device)
        segmenter = cls(bundle, reasoner, mask_decoder, vote_config, "torch")
        segmenter._torch_threads = torch.get_num_threads()
        return segmenter

    def segment(
        self,
        image: ImageInput,
        query: str,
        samples: int = 8,
        seed: int | None = None,
        adaptive: bool = False,
        margin: int | None = None,
    ) -> Result:
        """Segment what `query` refers to in `image`.

        Args:
            image: a path, a PIL image or an (H, W, 3) uint8 RGB array.
            query: the (possibly implicit) request, e.g. "what could I cut the rope with?".
            samples: 1 = greedy decoding, no voting; 2..64 = sampling (temperature 1.0, top-p 0.9)
                and mask-level majority voting.
            seed: makes sampling reproducible; None draws a fresh one.
            adaptive: with samples > 1, vote on the answers as they finish decoding (SAM decodes
                each step's new prompts in one call) and stop the batch as soon as the answers still
                being decoded cannot change the vote's outcome (see `star_edge.adaptive`). The rows
                and their order are those of the fixed-N call with the same seed, so a call that
                does not stop early equals it, and one that stops has the same outcome.
            margin: with adaptive, also stop once `margin` more samples could not change the
                outcome (a looser rule when margin < the samples left); None = only the exact rule.

        Returns:
            Result with masks (H, W) bool in the original image's pixels. `samples` holds the samples
            in the order they finished decoding (fewer tokens first, then by row), which is also the
            order they are voted in; with adaptive, only those finished before the stop.
        """
        started = time.perf_counter()
        pixels = load_image(image)
        query = validate_query(query)
        samples = check_samples(samples)
        seed = check_seed(seed)
        if not isinstance(adaptive, bool):
            raise InvalidInputError(f"adaptive must be a bool, got {type(adaptive).__name__}")
        margin = check_margin(margin, adaptive)
        if adaptive and samples > 1:
            return self._segment_adaptive(started, pixels, query, samples, seed, margin)
        timings: dict[str, float] = {}
        with self._lock:
            self._check_open()
            self._pin_threads()
            generated = self.reasoner.generate(Image.fromarray(pixels), query, n=samples, seed=seed)
            timings.update(generated.timings)
            finish_order = sorted(range(len(generated.texts)),
                                  key=lambda i: (len(generated.token_ids[i]), generated.rows[i]))
            parsed = self._parse_all([generated.texts[i] for i in finish_order], pixels)
            valid = [s for s in parsed if s.ok]
            boxes, points, sample_ids, labels = _prompts_of(valid)
            masks = np.zeros((0, *pixels.shape[:2]), dtype=bool)
            scores = np.zeros((0,), dtype=np.float32)
            timings["sam_encode"] = timings["sam_decode"] = 0.0
            if len(boxes):  # "no target" answers and failed samples leave SAM nothing to do
                begin = time.perf_counter()
                embedding = self.mask_decoder.embed(pixels)
                timings["sam_encode"] = _ms_since(begin)
                begin = time.perf_counter()
                masks, scores = decode_distinct(self.mask_decoder, embedding, boxes, points, masks, scores)
                timings["sam_decode"] = _ms_since(begin)
        begin = time.perf_counter()
        if samples == 1:
            objects = _objects_without_voting(masks, scores, boxes, points, labels)
        else:
            objects = self._vote(masks, scores, boxes, points, sample_ids, labels, valid)
        timings["vote"] = _ms_since(begin)
        mask = union_mask(objects, pixels.shape[:2])
        timings["total"] = _ms_since(started)
        return Result(query=query, image=pixels, objects=objects, mask=mask, samples=parsed,
                      timings=timings)

    def _segment_adaptive(
        self, started: float, pixels: np.ndarray, query: str, samples: int, seed: int | None, margin: int | None
    ) -> Result:
        """`segment` with adaptive=True (see there)."""
        seed = secrets.randbits(63) if seed is None else seed
        with self._lock:
            self._check_open()
            self._pin_threads()
            prepared = self.reasoner.prefill(Image.fromarray(pixels), query)
            vote = _StreamingVote(self, pixels, samples, margin)
            drawn = self.reasoner.sample(prepared, range(samples), seed, on_finished=vote.add)
        timings = {**prepared.timings, **drawn.timings, **vote.timings}
        timings["generate"] = timings["vision"] + timings["prefill"] + timings["decode"]
        begin = time.perf_counter()
        boxes, points, sample_ids, labels = _prompts_of(vote.valid)
        objects = self._vote(vote.masks, vote.scores, boxes, points, sample_ids, labels, vote.valid)
        mask = union_mask(objects, pixels.shape[:2])
        timings["vote"] += _ms_since(begin)
        timings["total"] = _ms_since(started)
        return Result(query=query, image=pixels, objects=objects, mask=mask, samples=vote.parsed, timings=timings)

    def _check_open(self) -> None:
        """Raise StarEdgeError after `close` (the models are gone)."""
        if self.reasoner is None or self.mask_decoder is None:
            raise StarEdgeError("this Segmenter is closed; load another with Segmenter.from_pretrained")

    def _pin_threads(self) -> None:
        """Set torch's intra-op thread count for the calling thread to the one the Segmenter was
        loaded with. OpenMP keeps the count per thread, and Numba's parallel kernels (voting) set it
        to Numba's own, so a call's floating-point results would otherwise depend on which thread
        calls and on what that thread ran before."""
        if self._torch_threads is not None:
            import torch

            torch.set_num_threads(self._torch_threads)

    def _parse_all(self, texts: list[str], pixels: np.ndarray) -> list[Sample]:
        spec = self.bundle.reasoner
        image_size = (pixels.shape[1], pixels.shape[0])
        samples = []
        for text in texts:
            try:
                answer = parse(text, image_size=image_size, input_size=spec.input_size, frame=spec.frame)
                samples.append(Sample(text=text, answer=answer))
            except ParseError as exc:
                samples.append(Sample(text=text, answer=None, error=str(exc)))
        return samples

    def _vote(
        self,
        masks: np.ndarray,
        scores: np.ndarray,
        boxes: np.ndarray,
        points: np.ndarray,
        sample_ids: np.ndarray,
        labels: list[str],
        valid: list[Sample],
    ) -> list[ObjectMask]:
        object_counts = [len(s.answer.objects) for s in valid]  # type: ignore[union-attr]
        voted = majority_vote(masks, scores, sample_ids, labels, n_valid=len(valid),
                              object_counts=object_counts, config=self.vote_config)
        objects = []
        for obj in voted:
            best = obj.best_member
            objects.append(ObjectMask(mask=obj.mask, box=_int_tuple(boxes[best]),
                                      point=_int_tuple(points[best]), label=obj.label,
                                      votes=obj.votes, score=float(obj.score)))
        return objects

    def close(self) -> None:
        """Release the models (the Segmenter is unusable afterwards)."""
        with self._lock:
            self.reasoner = None  # type: ignore[assignment]
            self.mask_decoder = None  # type: ignore[assignment]

    def __enter__(self) -> "Segmenter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _StreamingVote:
    """The vote of an adaptive `segment` call, fed answers as they finish decoding.

    Attributes:
        parsed: the samples so far, in the order they finished.
        valid: the ones that parsed.
        masks: (M, H, W) bool, SAM's masks of every object of `valid`, in candidate order.
        scores: (M,) float32, their scores.
        timings: "sam_encode" (the image is encoded at the first object answered, never when no
            answer has one), "sam_decode" and "vote" (the settled checks) in ms, summed over the calls.
    """

    def __init__(self, segmenter: Segmenter, pixels: np.ndarray, samples: int, margin: int | None) -> None:
        self._segmenter = segmenter
        self._pixels = pixels
        self._embedding: Any = None
        self._samples = samples
        self._margin = margin
        self.parsed: list[Sample] = []
        self.valid: list[Sample] = []
        self.masks = np.zeros((0, *pixels.shape[:2]), dtype=bool)
        self.scores = np.zeros((0,), dtype=np.float32)
        self.timings = {"sam_encode": 0.0, "sam_decode": 0.0, "vote": 0.0}

    def add(self, finished: list[tuple[int, str]]) -> bool:
        """Take the (row, text) answers that finished at one decoding step (in row order); return
        True once the answers still decoding cannot change the vote's outcome."""
        new = self._segmenter._parse_all([text for _, text in finished], self._pixels)
        self.parsed += new
        self.valid += [sample for sample in new if sample.ok]
        boxes, points, sample_ids, labels = _prompts_of(self.valid)
        if len(boxes) > len(self.masks) and self._embedding is None:
            begin = time.perf_counter()
            self._embedding = self._segmenter.mask_decoder.embed(self._pixels)
            self.timings["sam_encode"] = _ms_since(begin)
        begin = time.perf_counter()
        if len(boxes) > len(self.masks):
            self.masks, self.scores = decode_distinct(self._segmenter.mask_decoder, self._embedding,
                                                      boxes, points, self.masks, self.scores)
        self.timings["sam_decode"] += _ms_since(begin)
        left = self._samples - len(self.parsed)
        if left == 0:
            return False
        begin = time.perf_counter()
        counts = [len(sample.answer.objects) for sample in self.valid]  # type: ignore[union-attr]
        settled = vote_is_settled(self.masks, self.scores, sample_ids, labels, counts,
                                  slack=left if self._margin is None else min(self._margin, left),
                                  config=self._segmenter.vote_config)
        self.timings["vote"] += _ms_since(begin)
        self._segmenter._pin_threads()  # the rest of the call decodes on the Segmenter's threads
        return settled


def decode_distinct(
    decoder: MaskDecoderBackend,
    embedding: Any,
    boxes: np.ndarray,
    points: np.ndarray,
    known_masks: np.ndarray,
    known_scores: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Masks of M prompts of which the first D are decoded already, decoding each distinct new
    prompt once: the N samples of one query often repeat an object exactly, and a repeated
    prompt gets a copy of its first mask instead of a second decode.

    boxes: (M, 4) float64; points: (M, 2) float64; known_masks: (D, H, W) bool and known_scores:
    (D,) float32, the results of the first D prompts.

    Returns:
        masks: (M, H, W) bool and scores: (M,) float32, in prompt order.
    """
    done = len(known_masks)
    prompts = np.concatenate([boxes, points], axis=1)
    _, first, inverse = np.unique(prompts, axis=0, return_index=True, return_inverse=True)
    source = first[inverse.reshape(-1)]
    fresh = np.flatnonzero((source == np.arange(len(prompts))) & (np.arange(len(prompts)) >= done))
    masks = np.empty((len(prompts), *known_masks.shape[1:]), dtype=bool)
    scores = np.empty((len(prompts),), dtype=np.float32)
    masks[:done], scores[:done] = known_masks, known_scores
    if len(fresh):
        masks[fresh], scores[fresh] = decoder.decode(embedding, boxes[fresh], points[fresh])
    copies = np.arange(done, len(prompts))
    copies = copies[source[copies] != copies]
    masks[copies], scores[copies] = masks[source[copies]], scores[source[copies]]
    return masks, scores


def _prompts_of(valid: list[Sample]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Every object of every valid sample, in candidate order: boxes (M, 4) float64, points
    (M, 2) float64, sample ids (M,) int64 (index among the valid samples), labels."""
    boxes, points, sample_ids, labels = [], [], [], []
    for index, sample in enumerate(valid):
        answer: Answer = sample.answer  # type: ignore[assignment]
        for obj in answer.objects:
            boxes.append(obj.box)
            points.append(obj.point)
            sample_ids.append(index)
            labels.append(obj.label)
    return (
        np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        np.asarray(points, dtype=np.float64).reshape(-1, 2),
        np.asarray(sample_ids, dtype=np.int64),
        labels,
    )


def _objects_without_voting(
    masks: np.ndarray, scores: np.ndarray, boxes: np.ndarray, points: np.ndarray, labels: list[str]
) -> list[ObjectMask]:
    return [
        ObjectMask(mask=masks[i], box=_int_tuple(boxes[i]), point=_int_tuple(points[i]),
                   label=labels[i], votes=1, score=float(scores[i]))
        for i in range(len(labels))
    ]


def _int_tuple(values: np.ndarray) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def _ms_since(begin: float) -> float:
    return (time.perf_counter() - begin) * 1000.0


def check_samples(samples: object) -> int:
    """Return `samples` as an int in [1, MAX_SAMPLES], or raise InvalidInputError."""
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)):
        raise InvalidInputError(f"samples must be an integer, got {type(samples).__name__}")
    if not 1 <= samples <= MAX_SAMPLES:
        raise InvalidInputError(f"samples must be in [1, {MAX_SAMPLES}], got {samples}")
    return int(samples)


def check_margin(margin: object, adaptive: bool) -> int | None:
    """Return `margin` (None or a non-negative int, and None unless `adaptive`), or raise
    InvalidInputError."""
    if margin is not None and not adaptive:
        raise InvalidInputError(f"margin {margin!r} applies to adaptive voting only; pass adaptive=True "
                                "(--adaptive) or leave margin out")
    if margin is None:
        return None
    if isinstance(margin, bool) or not isinstance(margin, (int, np.integer)) or margin < 0:
        raise InvalidInputError(f"margin must be a non-negative integer or None, got {margin!r}")
    return int(margin)


def check_seed(seed: object) -> int | None:
    """Return `seed` (None or an int in [0, 2**63 - 1]), or raise InvalidInputError."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InvalidInputError(f"seed must be an integer or None, got {type(seed).__name__}")
    if not 0 <= seed <= MAX_SEED:
        raise InvalidInputError(f"seed must be in [0, 2**63 - 1], got {seed}")
    return int(seed)


#: The Python packages each backend needs on top of star-edge's own.
_BACKEND_PACKAGES = {"onnx": ("onnxruntime", "tokenizers"), "torch": ("torch", "transformers")}


def _automatic_backend(bundle: Bundle, device: str) -> str:
    """What backend="auto" loads (see `Segmenter.from_pretrained`).

    Raises:
        BackendUnavailableError: neither the bundle's backends nor their packages are here.
    """
    import importlib.util

    preferred = ("onnx", "torch") if device == "cpu" else ("torch", "onnx")
    for name in preferred:
        if name in bundle.backends and all(importlib.util.find_spec(p) for p in _BACKEND_PACKAGES[name]):
            return name
    raise BackendUnavailableError(
        f"bundle {bundle.root} has backends {', '.join(bundle.backends)}, and neither onnxruntime nor torch with "
        "transformers is installed for them: pip install 'star-edge[onnx]' or 'star-edge[torch]'")


def _check_device_name(device: object) -> None:
    if not isinstance(device, str):
        raise InvalidInputError(f"device must be a string, got {type(device).__name__}")
    name, _, index = device.partition(":")
    if name not in ("cpu", "cuda") or (index and not index.isdigit()) or (name == "cpu" and index):
        raise InvalidInputError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def _check_torch_device(device: str) -> None:
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            f"device {device!r} asked for, but this torch build has no CUDA device "
            "(install a CUDA build of torch, or use device='cpu')"
        )
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise InvalidInputError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
