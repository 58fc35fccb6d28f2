"""One serialised TensorRT engine, run with torch tensors in CUDA memory (TensorRT 10 Python API).

An engine built with several optimisation profiles (the reasoner's: prefill and decode) gets one
execution context per profile, each allocating its activation memory for its own profile only
(`ExecutionContextAllocationStrategy.ON_PROFILE_CHANGE`); a run takes the first profile whose
shape ranges hold every input. Outputs are allocated per run with the shapes TensorRT infers from
the inputs, and everything is enqueued on torch's current stream of the device, so torch's own
work on the tensors (copies, row selection) is ordered with the engine's without synchronising.
Empty inputs (a KV cache of length 0) are bound to a one-byte placeholder: TensorRT reads nothing
from them but wants an address.

Untested on hardware so far (see README, "TensorRT and Jetson").
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from star_edge.errors import BundleError, InvalidInputError
from star_edge.tensorrt_runtime import BUILD_HINT, tensorrt_logger

#: TensorRT data type name -> torch dtype name (the I/O types an ONNX graph's engine can have).
_TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
                 "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}


class TensorRTEngine:
    """A deserialised engine and its execution contexts, on one CUDA device.

    Attributes:
        path: the engine file.
        device: torch.device("cuda", index) of its tensors.
        input_names, output_names: its I/O tensors, in the engine's order.
    """

    def __init__(self, path: Path, device_index: int) -> None:
        """Deserialise `path` on CUDA device `device_index`.

        Raises:
            BundleError: the file is missing, or this TensorRT cannot deserialise it (another
                TensorRT version or GPU built it), or it has I/O of a type torch lacks.
        """
        import tensorrt
        import torch

        self.path = Path(path)
        self.device = torch.device("cuda", device_index)
        if not self.path.is_file():
            raise BundleError(f"{self.path} is missing (a TensorRT engine listed in the manifest)")
        self._runtime = tensorrt.Runtime(tensorrt_logger())
        with torch.cuda.device(self.device):
            engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise BundleError(f"{self.path}: TensorRT {tensorrt.__version__} cannot load this engine "
                              f"({tensorrt_logger().last_error or 'see the log'}); {BUILD_HINT}")
        self._engine = engine
        names = [engine.get_tensor_name(index) for index in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == tensorrt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if engine.get_tensor_mode(n) == tensorrt.TensorIOMode.OUTPUT]
        self._dtypes = {name: self._torch_dtype(name, engine.get_tensor_dtype(name).name) for name in names}
        profiles = max(1, engine.num_optimization_profiles)  # an engine without dynamic inputs has its default
        self._ranges = [self._profile_ranges(profile) for profile in range(profiles)]
        stream = torch.cuda.current_stream(self.device)
        strategy = tensorrt.ExecutionContextAllocationStrategy.ON_PROFILE_CHANGE
        self._contexts = []
        for profile in range(profiles):
            context = engine.create_execution_context(strategy)
            if context is None or not context.set_optimization_profile_async(profile, stream.cuda_stream):
                raise BundleError(f"{self.path}: TensorRT could not prepare profile {profile} "
                                  f"({tensorrt_logger().last_error or 'see the log'})")
            self._contexts.append(context)
        stream.synchronize()
        self._placeholder = torch.zeros(1, dtype=torch.uint8, device=self.device)
        self._lock = threading.Lock()

    def _torch_dtype(self, name: str, trt_type: str) -> Any:
        import torch

        if trt_type not in _TORCH_DTYPES:
            raise BundleError(f"{self.path}: tensor {name!r} has TensorRT type {trt_type}, which torch lacks")
        return getattr(torch, _TORCH_DTYPES[trt_type])

    def _profile_ranges(self, profile: int) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        """input name -> (min shape, max shape) under `profile` (static inputs: their shape twice)."""
        ranges = {}
        for name in self.input_names:
            shape = tuple(self._engine.get_tensor_shape(name))
            if all(size >= 0 for size in shape):
                ranges[name] = (shape, shape)
            else:
                low, _, high = self._engine.get_tensor_profile_shape(name, profile)
                ranges[name] = (tuple(low), tuple(high))
        return ranges

    def _profile_for(self, shapes: dict[str, tuple[int, ...]]) -> int:
        for profile, ranges in enumerate(self._ranges):
            if all(len(shapes[n]) == len(low) and all(a <= s <= b for a, s, b in zip(low, shapes[n], high))
                   for n, (low, high) in ranges.items()):
                return profile
        built = "; ".join(", ".join(f"{n} {low}..{high}" for n, (low, high) in r.items()) for r in self._ranges)
        raise InvalidInputError(f"{self.path.name}: inputs {shapes} are outside the shapes the engine was built "
                                f"for ({built}); build the engines for larger sizes")

    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """Run the engine once.

        Args:
            feeds: input name -> torch tensor of the input's shape (any device and dtype: moved
                and cast to the engine's).

        Returns:
            output name -> torch tensor on `device`, in the engine's output dtype; the work is
            enqueued on torch's current stream (reading a tensor from torch waits for it).

        Raises:
            InvalidInputError: input shapes outside every optimisation profile.
            BundleError: TensorRT rejects a shape or fails to run (message from its log).
        """
        import torch

        missing = sorted(set(self.input_names) - set(feeds))
        if missing:
            raise BundleError(f"{self.path.name} needs inputs {missing}")
        profile = self._profile_for({name: tuple(feeds[name].shape) for name in self.input_names})
        context = self._contexts[profile]
        outputs: dict[str, Any] = {}
        with self._lock, torch.cuda.device(self.device):
            inputs = {name: feeds[name].to(self.device, self._dtypes[name]).contiguous() for name in self.input_names}
            for name, tensor in inputs.items():
                if not context.set_input_shape(name, tuple(tensor.shape)):
                    raise BundleError(f"{self.path.name}: TensorRT rejects shape {tuple(tensor.shape)} for {name} "
                                      f"({tensorrt_logger().last_error or 'see the log'})")
                context.set_tensor_address(name, self._address(tensor))
            for name in self.output_names:
                shape = tuple(context.get_tensor_shape(name))
                if any(size < 0 for size in shape):
                    raise BundleError(f"{self.path.name}: output {name} has no shape for these inputs ({shape})")
                outputs[name] = torch.empty(shape, dtype=self._dtypes[name], device=self.device)
                context.set_tensor_address(name, self._address(outputs[name]))
            if not context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
                raise BundleError(f"{self.path.name}: TensorRT failed to run the engine "
                                  f"({tensorrt_logger().last_error or 'see the log'})")
        return outputs

    def _address(self, tensor: Any) -> int:
        return tensor.data_ptr() if tensor.numel() else self._placeholder.data_ptr()
