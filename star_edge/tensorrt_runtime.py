"""Where the TensorRT backend may run, and which of a bundle's engines it loads there.

A TensorRT engine runs only on the GPU architecture (compute capability) and with the TensorRT
version that built it, so a bundle keeps one set of engines per (compute capability, TensorRT
version), each in `tensorrt/<key>/`, with key `sm_<major><minor>-trt<version>` (`engine_key`), and
records them in its manifest (written by `star_edge.export.tensorrt_engines`)::

    "tensorrt": {"engines": {"sm_87-trt10.3.0": {
        "compute_capability": [8, 7], "tensorrt_version": "10.3.0", "device_name": str,
        "precision": "fp16" | "fp32", "onnx_fingerprint": str,
        "settings": {"max_samples", "opt_samples", "max_query_tokens", "opt_query_tokens",
                     "max_prompts", "opt_prompts", "workspace_bytes"},
        "graphs": {"<graph>": {"engine": "tensorrt/<key>/<graph>.engine", "onnx": "onnx/<graph>.onnx",
                               "profiles": [{"<input>": [min shape, opt shape, max shape]}, ...]}}}}}

with one graph per exported ONNX graph the runtime reads (`GRAPHS`). The engine files are listed in
the manifest's `files` with their sha256 like every other file.

The compute capability comes from torch (`torch.cuda.get_device_capability`): the TensorRT backend
keeps its tensors in CUDA memory through torch, so a CUDA build of torch is part of its install
(on Jetson, NVIDIA's torch wheel for the JetPack release). tensorrt and torch are imported here
only inside the functions that need them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from star_edge.bundle import Bundle
from star_edge.errors import BackendUnavailableError, BundleError, InvalidInputError

INSTALL_HINT = "install it with: pip install 'star-edge[tensorrt]' (on Jetson, TensorRT comes with JetPack)"
BUILD_HINT = "build them on this machine with: star-edge export --bundle DIR --out DIR --tensorrt"
#: The TensorRT major version this backend is written for.
TENSORRT_MAJOR = 10
#: The graphs a set of engines holds: the ONNX graphs' file stems (onnx/<graph>.onnx).
GRAPHS = ("reasoner_vision", "reasoner_embed", "reasoner_decoder", "sam_encoder", "sam_decoder")

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Platform:
    """The GPU and TensorRT a process runs on.

    Attributes:
        tensorrt_version: tensorrt.__version__, e.g. "10.3.0".
        compute_capability: (major, minor), e.g. (8, 7) for Jetson Orin.
        device_name: the GPU's name as CUDA reports it.
        device_index: the CUDA device index.
    """

    tensorrt_version: str
    compute_capability: tuple[int, int]
    device_name: str
    device_index: int

    @property
    def engine_key(self) -> str:
        return engine_key(self.compute_capability, self.tensorrt_version)


def engine_key(compute_capability: tuple[int, int], tensorrt_version: str) -> str:
    """The folder and manifest key of the engines for a GPU architecture and TensorRT version:
    (8, 7), "10.3.0" -> "sm_87-trt10.3.0"."""
    major, minor = compute_capability
    return f"sm_{major}{minor}-trt{tensorrt_version}"


def detect_platform(device: str) -> Platform:
    """The GPU `device` ("cuda" or "cuda:N") and the installed TensorRT.

    Raises:
        InvalidInputError: device is not a CUDA device name.
        BackendUnavailableError: tensorrt missing or not 10.x, torch missing, no CUDA device, or no
            device N; the message says what to install.
    """
    name, _, index = device.partition(":") if isinstance(device, str) else ("", "", "")
    if name != "cuda" or (index and not index.isdigit()):
        raise InvalidInputError(f"the TensorRT backend runs on a CUDA device: device must be 'cuda' or 'cuda:N', "
                                f"got {device!r}")
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailableError(f"tensorrt is not installed; {INSTALL_HINT}") from exc
    version = str(tensorrt.__version__)
    if not version.startswith(f"{TENSORRT_MAJOR}."):
        raise BackendUnavailableError(f"TensorRT {version} is installed; star-edge's TensorRT backend is written "
                                      f"for TensorRT {TENSORRT_MAJOR}.x ({INSTALL_HINT})")
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailableError("the TensorRT backend keeps its tensors in CUDA memory through torch, which is "
                                      "not installed; install a CUDA build of torch (on Jetson, NVIDIA's wheel for "
                                      "your JetPack)") from exc
    if not torch.cuda.is_available():
        raise BackendUnavailableError(f"TensorRT needs a CUDA device, and torch {torch.__version__} sees none "
                                      "(no NVIDIA GPU or driver, or a CPU-only build of torch)")
    device_index = int(index or 0)
    if device_index >= torch.cuda.device_count():
        raise BackendUnavailableError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    capability = torch.cuda.get_device_capability(device_index)
    return Platform(version, (int(capability[0]), int(capability[1])), torch.cuda.get_device_name(device_index),
                    device_index)


@dataclass(frozen=True)
class EngineSet:
    """One set of engines of a bundle, as its manifest records it.

    Attributes:
        key: engine_key of the platform they were built for.
        precision: "fp16" or "fp32".
        max_samples: the most sample rows the reasoner's decoder engine takes at once.
        max_prompts: the most prompts the SAM decoder engine takes at once.
        files: graph name -> engine file, relative to the bundle folder.
    """

    key: str
    precision: str
    max_samples: int
    max_prompts: int
    files: dict[str, str]


def engine_records(bundle: Bundle) -> dict[str, Any]:
    """The manifest's engine records by key ({} when it has none)."""
    section = bundle.manifest.get("tensorrt", {})
    records = section.get("engines", {}) if isinstance(section, dict) else None
    if not isinstance(records, dict):
        raise BundleError(f"{bundle.root}/star_edge.json: 'tensorrt' must be {{'engines': {{key: record}}}}")
    return records


def select_engines(bundle: Bundle, platform: Platform) -> EngineSet:
    """The bundle's engines for `platform`.

    Raises:
        BackendUnavailableError: the bundle has none for this GPU architecture and TensorRT version
            (the message lists those it has and how to build them).
        BundleError: a malformed record, or an engine file the manifest does not list.
    """
    records = engine_records(bundle)
    record = records.get(platform.engine_key)
    if record is None:
        have = ", ".join(sorted(records)) or "none"
        major, minor = platform.compute_capability
        raise BackendUnavailableError(
            f"bundle {bundle.root} has no TensorRT engines for this GPU ({platform.device_name}, compute capability "
            f"{major}.{minor}) and TensorRT {platform.tensorrt_version} (key {platform.engine_key}; it has: {have}). "
            f"Engines work only on the GPU architecture and TensorRT version that built them; {BUILD_HINT}")
    where = f"{bundle.root}/star_edge.json: tensorrt.engines[{platform.engine_key!r}]"
    try:
        settings = record["settings"]
        files = {name: str(record["graphs"][name]["engine"]) for name in GRAPHS}
        engines = EngineSet(platform.engine_key, str(record["precision"]), int(settings["max_samples"]),
                            int(settings["max_prompts"]), files)
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{where} is malformed: {exc!r}") from None
    for path in engines.files.values():
        if path not in bundle.files:
            raise BundleError(f"{where}: {path} is not listed in the manifest's files")
    return engines


class Engine(Protocol):
    """A named-tensor runner: what the TensorRT backends need of an engine (`TensorRTEngine`).

    Attributes:
        device: the torch.device of its tensors.
        input_names, output_names: its I/O tensors (an engine keeps its ONNX graph's names).
    """

    device: Any
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """Input name -> torch tensor in; output name -> torch tensor (on `device`) out."""


#: graph name (one of GRAPHS) -> its engine.
EngineOpener = Callable[[str], Engine]


def engine_opener(bundle: Bundle, engines: EngineSet, platform: Platform) -> EngineOpener:
    """Opens the engines of `engines` on the platform's device, by graph name."""
    from star_edge.tensorrt_engine import TensorRTEngine

    def open_engine(graph: str) -> Engine:
        return TensorRTEngine(bundle.root / engines.files[graph], platform.device_index)

    return open_engine


@functools.cache
def tensorrt_logger() -> Any:
    """The one TensorRT logger of the process: TensorRT's messages go to this module's logging logger
    (errors and warnings at their level, the rest at debug); the last error is kept in `last_error`."""
    import tensorrt

    severity = tensorrt.ILogger.Severity
    levels = {severity.INTERNAL_ERROR: logging.ERROR, severity.ERROR: logging.ERROR,
              severity.WARNING: logging.WARNING}

    class Logger(tensorrt.ILogger):
        def __init__(self) -> None:
            tensorrt.ILogger.__init__(self)
            self.last_error = ""

        def log(self, level: Any, message: str) -> None:
            python_level = levels.get(level, logging.DEBUG)
            if python_level == logging.ERROR:
                self.last_error = message
            _log.log(python_level, "TensorRT: %s", message)

    return Logger()
