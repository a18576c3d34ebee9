"""Measure a model's latency on the deployment runtime, behind one interface.

Backends: ``onnxruntime`` (CPU provider; CUDA provider where onnxruntime-gpu and a GPU exist),
``torch`` (eager on CPU or CUDA, optional CUDA graph) and ``tensorrt`` (engine built from ONNX,
imported lazily). Every measurement is warm-up, then ``torch.utils.benchmark``'s
``blocked_autorange`` for at least ``min_run_time`` seconds; the result is the median over blocks
with p90 and the inter-quartile range, in milliseconds per batch.
"""

from __future__ import annotations

import copy
import io
import os
import platform
import statistics
import warnings
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import benchmark

from pipeline.errors import SlimdeployError
from pipeline.runtime import cpu_name


class BackendUnavailable(SlimdeployError):
    """The requested runtime is not installed or has no device here."""


class FingerprintMismatch(SlimdeployError):
    """A latency artifact was measured on another device, runtime or setting."""


@dataclass(frozen=True)
class Timing:
    """Latency of one batch in milliseconds: median, p90 and IQR over timed blocks."""

    median_ms: float
    p90_ms: float
    iqr_ms: float
    runs: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _timing(m: benchmark.Measurement) -> Timing:
    times = sorted(t * 1e3 for t in m.times)  # per-run seconds of each block -> ms
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    return Timing(m.median * 1e3, q[8], m.iqr * 1e3, len(times) * m.number_per_run)


def export_onnx_bytes(model: nn.Module, example: torch.Tensor, opset: int = 17) -> bytes:
    """ONNX bytes of ``model`` (eval) for ``example``'s shape, with the TorchScript exporter.

    The TorchScript-based exporter (``dynamo=False``) is used here because profiling exports
    hundreds of small models and it is about 10x faster; the deployment export stage checks its
    own output against PyTorch.
    """
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), buf, dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["output"])
    return buf.getvalue()


class Backend(ABC):
    """A runtime that can time a model at a fixed batch size and precision."""

    name: str

    def __init__(self, batch_size: int, precision: str, threads: int, min_run_time: float, warmup: int) -> None:
        self.batch_size = batch_size
        self.precision = precision
        self.threads = threads
        self.min_run_time = min_run_time
        self.warmup = warmup

    @abstractmethod
    def device(self) -> dict[str, Any]:
        """Hardware record: CPU model and cores, or GPU name and driver."""

    @abstractmethod
    def versions(self) -> dict[str, str]:
        """Runtime library versions."""

    @abstractmethod
    def measure(self, model: nn.Module, input_shape: tuple[int, int, int]) -> Timing:
        """Latency of ``model`` on a (batch_size, *input_shape) float input."""

    def fingerprint(self) -> dict[str, Any]:
        """Everything a latency figure depends on besides the model itself."""
        return {
            "backend": self.name,
            "device": self.device(),
            "versions": self.versions(),
            "batch_size": self.batch_size,
            "precision": self.precision,
            "threads": self.threads,
            "cuda_graph": bool(getattr(self, "cuda_graph", False)),
        }

    def _time(self, fn: Any) -> Timing:
        for _ in range(self.warmup):
            fn()
        timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=self.threads)
        return _timing(timer.blocked_autorange(min_run_time=self.min_run_time))


def device_record(device: str) -> dict[str, Any]:
    """Hardware record for a latency figure: GPU name/capability/driver on "cuda", else the CPU."""
    return _cuda_device() if device == "cuda" else _cpu_device()


def _cpu_device() -> dict[str, Any]:
    return {"type": "cpu", "name": cpu_name(), "cores": os.cpu_count(), "machine": platform.machine()}


def _cuda_device() -> dict[str, Any]:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    driver = "unknown"
    try:
        import ctypes

        v = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(v))
        driver = f"{v.value // 1000}.{(v.value % 1000) // 10}"
    except OSError:
        pass
    return {"type": "cuda", "name": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1), "cuda_driver_api": driver,
            "cuda_runtime": torch.version.cuda}


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, device: str = "cpu", **kw: Any) -> None:
        super().__init__(**kw)
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise BackendUnavailable("backend onnxruntime needs the onnxruntime package (make install)") from err
        self.ort = ort
        self.target = device
        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailable(
                "target.device cuda with onnxruntime needs onnxruntime-gpu and a CUDA GPU "
                f"(providers here: {ort.get_available_providers()}); run `make gpu-runtime` or use device: cpu"
            )
        if self.precision != "fp32":
            raise BackendUnavailable("backend onnxruntime measures fp32 models; use precision: fp32")

    def device(self) -> dict[str, Any]:
        return device_record(self.target)

    def versions(self) -> dict[str, str]:
        return {"onnxruntime": self.ort.__version__, "torch": torch.__version__}

    def session(self, onnx_model: bytes) -> Any:
        so = self.ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = self.ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.target == "cuda" else ["CPUExecutionProvider"]
        return self.ort.InferenceSession(onnx_model, so, providers=providers)

    def measure_onnx(self, onnx_model: bytes, input_shape: tuple[int, ...]) -> Timing:
        sess = self.session(onnx_model)
        x = torch.randn(self.batch_size, *input_shape, generator=torch.Generator().manual_seed(0)).numpy()
        feed = {sess.get_inputs()[0].name: x}
        return self._time(lambda: sess.run(None, feed))

    def measure(self, model: nn.Module, input_shape: tuple[int, int, int]) -> Timing:
        example = torch.zeros(self.batch_size, *input_shape)
        return self.measure_onnx(export_onnx_bytes(model, example), input_shape)


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, device: str = "cpu", cuda_graph: bool = False, **kw: Any) -> None:
        super().__init__(**kw)
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable("target.device cuda: torch sees no CUDA GPU here; use device: cpu")
        if self.precision == "fp16" and device != "cuda":
            raise BackendUnavailable("precision fp16 with the torch backend needs device: cuda")
        self.dev = torch.device(device)
        self.cuda_graph = cuda_graph and device == "cuda"

    def device(self) -> dict[str, Any]:
        return device_record(self.dev.type)

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__, "cuda": str(torch.version.cuda)}

    @torch.no_grad()
    def measure(self, model: nn.Module, input_shape: tuple[int, int, int]) -> Timing:
        dtype = torch.float16 if self.precision == "fp16" else torch.float32
        model = copy.deepcopy(model).eval().to(self.dev, dtype)  # the caller's model stays where it is
        x = torch.randn(self.batch_size, *input_shape, device=self.dev, dtype=dtype)
        if self.dev.type == "cpu":
            prev = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            try:
                return self._time(lambda: model(x))
            finally:
                torch.set_num_threads(prev)
        if self.cuda_graph:
            for _ in range(3):
                model(x)  # warm up kernels before capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                model(x)
            return self._time_cuda(graph.replay)
        return self._time_cuda(lambda: model(x))

    def _time_cuda(self, fn: Any) -> Timing:
        """CUDA events around each run after warm-up, until min_run_time has elapsed."""
        for _ in range(max(self.warmup, 10)):
            fn()
        torch.cuda.synchronize()
        times: list[float] = []
        total = 0.0
        while total < self.min_run_time * 1e3 or len(times) < 10:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
            total += times[-1]
        times.sort()
        q = statistics.quantiles(times, n=100, method="inclusive")
        return Timing(statistics.median(times), q[89], q[74] - q[24], len(times))


class TensorRTBackend(Backend):
    """Engine built from ONNX with the TensorRT Python API, timed with CUDA events.

    TensorRT cannot be installed on the CPU build machines (ENV.md); the import is lazy and a
    missing package is a clear BackendUnavailable.
    """

    name = "tensorrt"

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        try:
            import tensorrt as trt
        except ImportError as err:
            raise BackendUnavailable(
                "backend tensorrt needs the `tensorrt` Python package and an NVIDIA GPU (e.g. the NVIDIA "
                "PyTorch container, see Dockerfile); use target.backend: onnxruntime here"
            ) from err
        if not torch.cuda.is_available():
            raise BackendUnavailable("backend tensorrt needs a CUDA GPU visible to torch")
        self.trt = trt

    def device(self) -> dict[str, Any]:
        return _cuda_device()

    def versions(self) -> dict[str, str]:
        return {"tensorrt": self.trt.__version__, "torch": torch.__version__}

    def build(self, onnx_model: bytes, input_shape: tuple[int, ...]) -> Any:
        trt = self.trt
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(onnx_model):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendUnavailable(f"TensorRT could not parse the ONNX model: {errors}")
        config = builder.create_builder_config()
        if self.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        shape = (self.batch_size, *input_shape)
        profile.set_shape(network.get_input(0).name, shape, shape, shape)
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise BackendUnavailable("TensorRT failed to build an engine (see its log above)")
        return trt.Runtime(logger).deserialize_cuda_engine(plan)

    def measure(self, model: nn.Module, input_shape: tuple[int, int, int]) -> Timing:
        engine = self.build(export_onnx_bytes(model, torch.zeros(self.batch_size, *input_shape)), input_shape)
        ctx = engine.create_execution_context()
        x = torch.randn(self.batch_size, *input_shape, device="cuda")
        out_name = engine.get_tensor_name(1)
        y = torch.empty(tuple(ctx.get_tensor_shape(out_name)), device="cuda")
        ctx.set_tensor_address(engine.get_tensor_name(0), x.data_ptr())
        ctx.set_tensor_address(out_name, y.data_ptr())
        stream = torch.cuda.current_stream()
        helper = TorchBackend(device="cuda", batch_size=self.batch_size, precision="fp32", threads=self.threads,
                              min_run_time=self.min_run_time, warmup=self.warmup)
        return helper._time_cuda(lambda: ctx.execute_async_v3(stream.cuda_stream))


BACKENDS = ("onnxruntime", "torch", "tensorrt")


def make_backend(name: str, *, device: str = "cpu", batch_size: int = 1, precision: str = "fp32",
                 threads: int = 1, min_run_time: float = 0.05, warmup: int = 5, cuda_graph: bool = False) -> Backend:
    """The backend called ``name``; BackendUnavailable says what is missing and what to use instead."""
    kw = dict(batch_size=batch_size, precision=precision, threads=threads, min_run_time=min_run_time, warmup=warmup)
    if name == "onnxruntime":
        return OnnxRuntimeBackend(device=device, **kw)
    if name == "torch":
        return TorchBackend(device=device, cuda_graph=cuda_graph, **kw)
    if name == "tensorrt":
        if device != "cuda":
            raise BackendUnavailable("backend tensorrt runs on device: cuda only")
        return TensorRTBackend(**kw)
    raise BackendUnavailable(f"unknown latency backend {name!r}; choose one of {BACKENDS}")


def target_backend(target: Any, min_run_time: float, warmup: int = 5) -> Backend:
    """``make_backend`` for a ``TargetConfig`` (the params' `target` section)."""
    return make_backend(target.backend, device=target.device, batch_size=target.batch_size, precision=target.precision,
                        threads=target.threads, min_run_time=min_run_time, warmup=warmup, cuda_graph=target.cuda_graph)


def check_fingerprint(recorded: dict[str, Any], current: dict[str, Any], what: str) -> None:
    """Refuse ``what`` when it was measured under another fingerprint; lists every difference."""
    diffs = []
    for key in sorted(set(recorded) | set(current)):
        if recorded.get(key) != current.get(key):
            diffs.append(f"  {key}: recorded {recorded.get(key)!r}, here {current.get(key)!r}")
    if diffs:
        raise FingerprintMismatch(
            f"{what} was measured under a different target fingerprint:\n" + "\n".join(diffs)
            + "\nRe-run the profile stage on this target (dvc repro profile)."
        )
