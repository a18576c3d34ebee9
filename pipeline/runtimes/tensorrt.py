"""TensorRT: the one engine builder (the engine stage and the latency backend) and a runner for
the serialized engine (plan).

TensorRT cannot be installed on the CPU build machines (ENV.md): ``tensorrt`` is imported only
inside these functions, and a missing package is a RuntimeUnavailable. Written against the
TensorRT 10 Python API (precision builder flags, entropy calibrator for int8).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.runtimes.errors import ConversionError, RuntimeUnavailable


def tensorrt_available() -> bool:
    """Whether the ``tensorrt`` package is installed and torch sees a CUDA GPU."""
    return importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


def _trt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as err:
        raise RuntimeUnavailable("TensorRT needs the `tensorrt` Python package and an NVIDIA GPU (e.g. the NVIDIA "
                                 "PyTorch container, see the Dockerfile)") from err
    return trt


def build_tensorrt_plan(onnx_model: bytes | str | Path, input_shape: tuple[int, ...], batch: tuple[int, int, int],
                        precision: str, *, timing_cache: str | Path | None = None,
                        calibration: np.ndarray | None = None, calibration_cache: str | Path | None = None) -> bytes:
    """The serialized engine (plan) built from an ONNX model (a file or its bytes) with one input.

    ``input_shape``: (C, H, W). ``batch``: (min, opt, max) of the optimisation profile (all three
    equal for a fixed batch). ``precision``: fp32 | fp16 | int8; int8 also enables fp16 kernels
    and needs ``calibration`` images (normalised NCHW float32) and a ``calibration_cache`` path
    (entropy calibrator; the cache is read if present and written). ``timing_cache``: read if
    present and written back. A model TensorRT cannot parse or build is a ConversionError.
    """
    trt = _trt()
    if precision == "int8" and (calibration is None or calibration_cache is None):
        raise ConversionError("TensorRT int8 needs calibration images and a calibration cache path")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    onnx_bytes = onnx_model if isinstance(onnx_model, bytes) else Path(onnx_model).read_bytes()
    if not parser.parse(onnx_bytes):
        raise ConversionError("TensorRT cannot parse the ONNX model: "
                              + "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    config = builder.create_builder_config()
    if timing_cache is not None:
        cache_bytes = Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b""
        config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    profile.set_shape(network.get_input(0).name, *[(b, *input_shape) for b in batch])
    config.add_optimization_profile(profile)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_calibration_profile(profile)
        config.int8_calibrator = _entropy_calibrator(trt, calibration, batch[1], calibration_cache)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ConversionError("TensorRT failed to build the engine (see its log above)")
    if timing_cache is not None:
        Path(timing_cache).write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def _entropy_calibrator(trt: Any, images: np.ndarray, batch: int, cache_path: str | Path) -> Any:
    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()
            self.data = torch.from_numpy(images.astype(np.float32))
            self.index = 0
            self.device_batch = torch.empty((batch, *images.shape[1:]), device="cuda")

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.index + batch > len(self.data):
                return None
            self.device_batch.copy_(self.data[self.index : self.index + batch])
            self.index += batch
            return [int(self.device_batch.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            p = Path(cache_path)
            return p.read_bytes() if p.is_file() else None

        def write_calibration_cache(self, cache: bytes) -> None:
            Path(cache_path).write_bytes(bytes(cache))

    return Calibrator()


class TensorRTRunner:
    """Runs a serialized engine (plan file or bytes) with one input and one output on CUDA
    tensors, at any batch within its profile."""

    def __init__(self, plan: bytes | str | Path) -> None:
        trt = _trt()
        data = plan if isinstance(plan, bytes) else Path(plan).read_bytes()
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(data)
        if self.engine is None:
            where = "" if isinstance(plan, bytes) else f" {plan}"
            raise ConversionError(f"TensorRT cannot deserialize the engine{where}")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = self.engine.get_tensor_mode
        self.input_name = next(n for n in names if mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if mode(n) == trt.TensorIOMode.OUTPUT)
        self.ctx = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()

    def bind(self, x: torch.Tensor) -> torch.Tensor:
        """Bind ``x`` (contiguous float32 on CUDA) as the input and return the output buffer the
        next ``enqueue`` writes into; both must stay alive until that work has finished."""
        self.ctx.set_input_shape(self.input_name, tuple(x.shape))
        y = torch.empty(tuple(self.ctx.get_tensor_shape(self.output_name)), device="cuda", dtype=torch.float32)
        self.ctx.set_tensor_address(self.input_name, x.data_ptr())
        self.ctx.set_tensor_address(self.output_name, y.data_ptr())
        return y

    def enqueue(self, stream: torch.cuda.Stream) -> None:
        """Enqueue one run of the bound buffers on ``stream`` (asynchronous)."""
        self.ctx.execute_async_v3(stream.cuda_stream)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Output of one batch ``x`` (N, C, H, W), synchronised."""
        x = x.to("cuda", torch.float32).contiguous()
        y = self.bind(x)
        self.stream.wait_stream(torch.cuda.current_stream())  # x was written on the current stream
        self.enqueue(self.stream)
        self.stream.synchronize()
        return y

    def logits(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Float32 CPU logits of every image in ``x``, ``batch_size`` at a time."""
        return torch.cat([self(x[i : i + batch_size]).float().cpu() for i in range(0, len(x), batch_size)])
