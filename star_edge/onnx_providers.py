"""onnxruntime execution providers for a device name, shared by the ONNX backends (imports
onnxruntime only when called)."""

from __future__ import annotations

from typing import Any

from star_edge.errors import BackendUnavailableError, InvalidInputError

INSTALL_HINT = "install it with: pip install 'star-edge[onnx]'"


def execution_providers(device: str) -> list[Any]:
    """Providers for "cpu" or "cuda[:N]", best first.

    "cuda" takes onnxruntime's TensorRT provider first where the installed onnxruntime has it, then
    its CUDA provider, then the CPU provider for operators neither supports.

    Raises:
        BackendUnavailableError: onnxruntime is missing, or "cuda" without its CUDA provider.
        InvalidInputError: another device name.
    """
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailableError(f"onnxruntime is not installed; {INSTALL_HINT}") from exc
    name, _, index = device.partition(":") if isinstance(device, str) else ("", "", "")
    if name == "cpu" and not index:
        return ["CPUExecutionProvider"]
    if name == "cuda" and (not index or index.isdigit()):
        available = onnxruntime.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise BackendUnavailableError(
                f"device {device!r} needs onnxruntime's CUDA execution provider, which this "
                "onnxruntime build lacks; install onnxruntime-gpu or use device='cpu'"
            )
        options = {"device_id": int(index or 0)}
        providers: list[Any] = []
        if "TensorrtExecutionProvider" in available:
            providers.append(("TensorrtExecutionProvider", options))
        return providers + [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
    raise InvalidInputError(f"device must be 'cpu' or 'cuda[:index]', got {device!r}")
