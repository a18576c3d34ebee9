"""TensorRT: the one engine builder (the engine stage and the latency backend) and a runner for
the serialized engine (plan).

TensorRT cannot be installed on the CPU build machines (ENV.md): ``tensorrt`` is imported only
inside these functions, and a missing package is a RuntimeUnavailable.

Written for TensorRT 10.x and 11.x alike (``SUPPORTED_MAJOR``; another major version is a
RuntimeUnavailable naming it). Networks are strongly typed: precision comes from the ONNX model's
own types, never from builder flags. TensorRT 11 removed the precision flags
(``BuilderFlag.FP16``, ``INT8``, ...), ``IBuilderConfig.int8_calibrator`` and
``set_calibration_profile``, and the calibrator classes were deprecated in 10.1, so none of them
is used: FP16 is an FP16 ONNX model (``convert_to_fp16``, done here from an fp32 model), INT8 an
explicitly quantized (Q/DQ) ONNX model. The runner uses the name-based I/O API that both
versions share.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from pipeline.runtimes.errors import ConversionError, RuntimeUnavailable
from pipeline.runtimes.precision import convert_to_fp16, load_onnx, onnx_precision

SUPPORTED_MAJOR = (10, 11)  # the TensorRT major versions this module is written against
PRECISIONS = ("fp32", "fp16", "int8")


def tensorrt_available() -> bool:
    """Whether the ``tensorrt`` package is installed and torch sees a CUDA GPU."""
    return importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


def check_tensorrt_version(trt: Any) -> int:
    """The major version of the imported ``tensorrt`` module; a RuntimeUnavailable naming the
    version when it is outside ``SUPPORTED_MAJOR``."""
    version = str(getattr(trt, "__version__", "unknown"))
    head = version.split(".")[0]
    major = int(head) if head.isdigit() else -1
    if major not in SUPPORTED_MAJOR:
        lo, hi = SUPPORTED_MAJOR[0], SUPPORTED_MAJOR[-1]
        raise RuntimeUnavailable(f"TensorRT {version} is not supported: slimdeploy builds and runs engines with "
                                 f"TensorRT {lo}.x to {hi}.x (strongly typed networks); install one of those, or "
                                 "set engine.backend / target.backend to onnxruntime or torch")
    return major


def _trt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as err:
        raise RuntimeUnavailable("TensorRT needs the `tensorrt` Python package and an NVIDIA GPU (e.g. the NVIDIA "
                                 "PyTorch container, see the Dockerfile)") from err
    check_tensorrt_version(trt)
    return trt


def _model_for(onnx_model: bytes | str | Path, precision: str) -> bytes:
    """The ONNX bytes a strongly typed build of ``precision`` needs: fp16 converts an fp32 model
    (an fp16 one is taken as is), int8 takes a Q/DQ model as is, fp32 an fp32 model as is."""
    if precision not in PRECISIONS:
        raise ConversionError(f"TensorRT precision {precision!r} is not one of {PRECISIONS}")
    proto = load_onnx(onnx_model)
    kind = onnx_precision(proto)
    if precision == "int8" and kind != "int8":
        raise ConversionError(
            "TensorRT int8 needs an explicitly quantized ONNX model (QuantizeLinear/DequantizeLinear nodes, "
            f"'Q/DQ'), and this {kind} model has none: implicit INT8 calibration (BuilderFlag.INT8 with a "
            "calibrator) was removed in TensorRT 11 (calibrators deprecated since 10.1). Quantize the model to "
            "Q/DQ first, or use precision fp16 or fp32")
    if precision == "fp16" and kind == "fp32":
        return convert_to_fp16(proto)
    if kind != precision:
        raise ConversionError(f"TensorRT precision {precision} asked of an {kind} ONNX model: a strongly typed "
                              f"network runs in the model's own types; ask for precision {kind}")
    return proto.SerializeToString()


def build_tensorrt_plan(onnx_model: bytes | str | Path, input_shape: tuple[int, ...], batch: tuple[int, int, int],
                        precision: str, *, timing_cache: str | Path | None = None) -> bytes:
    """The serialized engine (plan) built from an ONNX model (a file or its bytes) with one input,
    as a strongly typed network (TensorRT 10.x and 11.x).

    ``input_shape``: (C, H, W). ``batch``: (min, opt, max) of the optimisation profile (all three
    equal for a fixed batch). ``precision``: fp32 | fp16 | int8, what the engine computes in.
    fp16 converts an fp32 model to fp16 first (``convert_to_fp16``: inputs and outputs stay
    float32) and takes an fp16 model as is; int8 needs an explicitly quantized (Q/DQ) model,
    taken as is (layers outside its Q/DQ pairs run in the model's float type); a mismatch
    (int8 of a model without Q/DQ nodes, fp32 of an fp16 or Q/DQ model) is a ConversionError
    saying what to pass. ``timing_cache``: read if present and written back. A model TensorRT
    cannot parse or build is a ConversionError; an unsupported TensorRT a RuntimeUnavailable.
    """
    trt = _trt()
    onnx_bytes = _model_for(onnx_model, precision)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = _strongly_typed_network(trt, builder)
    parser = trt.OnnxParser(network, logger)
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
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ConversionError("TensorRT failed to build the engine (see its log above)")
    if timing_cache is not None:
        Path(timing_cache).write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def _strongly_typed_network(trt: Any, builder: Any) -> Any:
    # 10.x: strong typing is opt-in with this creation flag. 11.x: always on; the flag is kept
    # (deprecated, ignored), and should it go, flags 0 is the same network.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        if check_tensorrt_version(trt) < 11:
            raise RuntimeUnavailable(f"TensorRT {trt.__version__} has no NetworkDefinitionCreationFlag.STRONGLY_TYPED")
        return builder.create_network(0)
    return builder.create_network(1 << int(flag))


class TensorRTRunner:
    """Runs a serialized engine (plan file or bytes) with one float32 input and one float32
    output on CUDA tensors, at any batch within its profile.

    Only the name-based I/O API that TensorRT 10 and 11 share: ``num_io_tensors``,
    ``get_tensor_name``, ``get_tensor_mode``, ``get_tensor_dtype``, ``set_input_shape``,
    ``get_tensor_shape``, ``set_tensor_address``, ``execute_async_v3``."""

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
        for name in (self.input_name, self.output_name):  # the buffers bound below are float32
            if self.engine.get_tensor_dtype(name) != trt.DataType.FLOAT:
                raise ConversionError(f"TensorRT engine tensor {name!r} is {self.engine.get_tensor_dtype(name)}, "
                                      "not float32: build it from a model with float32 inputs and outputs "
                                      "(convert_to_fp16 keeps them float32)")
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
