"""Run a model on the deployment runtime and time it, behind one interface.

Backends: ``onnxruntime`` (CPU provider; CUDA provider where onnxruntime-gpu and a GPU exist),
``torch`` (eager on CPU or CUDA, optionally replaying a captured CUDA graph) and ``tensorrt``
(engine built from ONNX, imported lazily). A backend *prepares* a model once (export, session,
engine or graph capture) into a ``TimedCall``, and times prepared calls with the protocol of
``pipeline.latency.timing`` (interleaved windows, fastest window median). Export, sessions and
engines come from ``pipeline.runtimes``, the same code the deployment uses.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from pipeline.cuda_graph import heuristic_kernels
from pipeline.errors import SlimdeployError
from pipeline.latency.timing import TimedCall, Timing, TimingProtocol, measure_calls
from pipeline.runtime import cpu_name
from pipeline.runtimes import (
    RuntimeUnavailable,
    TensorRTRunner,
    build_tensorrt_plan,
    check_tensorrt_version,
    export_onnx,
    ort_providers,
    ort_session,
)

# the runtimes' own error, under the name the latency API has always used
BackendUnavailable = RuntimeUnavailable


class FingerprintMismatch(SlimdeployError):
    """A latency artifact was measured on another device, runtime or setting."""


def cuda_timed(fn: Callable[[], Any]) -> TimedCall:
    """``fn`` (which enqueues work on the current CUDA stream) timed by CUDA events, in ms."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def call() -> float:
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    return call


def wall_timed(fn: Callable[[], Any]) -> TimedCall:
    """A synchronous ``fn`` timed by the wall clock, in ms."""

    def call() -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return call


class Backend(ABC):
    """A runtime that can time a model at a fixed batch size and precision."""

    name: str

    def __init__(self, batch_size: int, precision: str, threads: int, protocol: TimingProtocol | None = None) -> None:
        self.batch_size = batch_size
        self.precision = precision
        self.threads = threads
        self.protocol = protocol or TimingProtocol()

    @abstractmethod
    def device(self) -> dict[str, Any]:
        """Hardware record: CPU model and cores, or GPU name and driver."""

    @abstractmethod
    def versions(self) -> dict[str, str]:
        """Runtime library versions."""

    @abstractmethod
    def prepare(self, model: nn.Module, input_shape: tuple[int, ...]) -> TimedCall:
        """``model`` ready to run on a (batch_size, *input_shape) float input; the caller's model
        is not modified or moved."""

    def at_precision(self, precision: str) -> Backend:
        """This runtime, device and protocol at another ``precision`` (the fp32 reference of a budget)."""
        twin = copy.copy(self)
        twin.precision = precision
        return twin

    def measure_many(self, models: Sequence[nn.Module], input_shapes: Sequence[tuple[int, ...]] | tuple[int, ...],
                     protocol: TimingProtocol | None = None,
                     on_pass: Callable[[int], None] | None = None) -> list[Timing]:
        """Latency of every model, their windows interleaved (``pipeline.latency.timing``).
        ``input_shapes``: one (C, H, W) for all, or one per model."""
        return self.measure_readings(models, input_shapes, protocol, 1, on_pass)[0]

    def measure_readings(self, models: Sequence[nn.Module],
                         input_shapes: Sequence[tuple[int, ...]] | tuple[int, ...],
                         protocol: TimingProtocol | None = None, readings: int = 1,
                         on_pass: Callable[[int], None] | None = None,
                         extra: Sequence[TimedCall] = ()) -> list[list[Timing]]:
        """``readings`` independent measurements of every model, each one ``measure_many``'s (its
        windows interleaved), one after the other with the models prepared once: ``[reading][model]``.
        ``extra``: calls prepared elsewhere (an engine) interleaved with the models, their timings
        after the models' in each reading (at most ``protocol.chunk`` models then)."""
        protocol = protocol or self.protocol
        if readings < 1:
            raise ValueError(f"readings must be >= 1, got {readings}")
        shapes = [input_shapes] * len(models) if input_shapes and isinstance(input_shapes[0], int) else list(input_shapes)
        if len(shapes) != len(models):
            raise ValueError(f"{len(models)} models but {len(shapes)} input shapes")
        if extra and len(models) > protocol.chunk:
            raise ValueError(f"extra calls are interleaved with at most {protocol.chunk} models, got {len(models)}")
        out: list[list[Timing]] = [[] for _ in range(readings)]
        with self._threads():
            for lo in range(0, max(len(models), 1), protocol.chunk):
                calls = [self.prepare(m, tuple(s)) for m, s in zip(models[lo:lo + protocol.chunk], shapes[lo:lo + protocol.chunk])]
                calls += list(extra) if lo == 0 else []
                for r in range(readings):
                    out[r] += measure_calls(calls, protocol, on_pass) if calls else []
                del calls
        return out

    def measure(self, model: nn.Module, input_shape: tuple[int, ...], protocol: TimingProtocol | None = None) -> Timing:
        """Latency of one model (its windows spread over ``protocol.min_span_s``)."""
        return self.measure_many([model], input_shape, protocol)[0]

    def _threads(self) -> Any:
        from contextlib import nullcontext

        return nullcontext()

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


MAX_NOISE = 0.05


def measure_reference(backend: Backend, reference: nn.Module, other: nn.Module, input_shape: tuple[int, ...],
                      repeats: int = 3) -> tuple[float, float, float]:
    """(reference ms, other ms, noise): both measured together ``repeats`` times, each the fastest
    of its repeats; ``noise`` is how much the reference's repeats differ, (slowest - fastest) /
    fastest, at most ``MAX_NOISE``: the allowance a verdict against a budget should give one
    measurement on this machine."""
    reps = [backend.measure_many([reference, other], input_shape) for _ in range(repeats)]
    ref = [r[0].ms for r in reps]
    return min(ref), min(r[1].ms for r in reps), min(MAX_NOISE, (max(ref) - min(ref)) / min(ref))


def paired_ms(reference_ms: float, timed: Timing | float, reference_timed: Timing | float) -> float:
    """``timed``'s latency in ms on the scale of ``reference_ms``: ``reference_ms * timed /
    reference_timed``, where ``timed`` and ``reference_timed`` were measured together (interleaved
    windows, ``Backend.measure_many``), so a slow spell of the machine moves both and cancels out.
    ``timed``/``reference_timed``: Timings (their ``ms``) or ms."""
    ms = timed.ms if isinstance(timed, Timing) else timed
    ref = reference_timed.ms if isinstance(reference_timed, Timing) else reference_timed
    return reference_ms * ms / ref


def median_paired(reference_ms: float, readings: Sequence[Sequence[Timing]], index: int, reference_index: int) -> float:
    """The median over ``readings`` (``Backend.measure_readings``) of model ``index``'s ``paired_ms``
    against model ``reference_index`` of the same reading: one reading of a sub-millisecond network
    on a shared machine can be 20% off, and a loop that stops on the first reading inside a band
    keeps the readings that were off in its favour."""
    return statistics.median(paired_ms(reference_ms, r[index], r[reference_index]) for r in readings)


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

    def __init__(self, device: str = "cpu", int8_activations: str = "uint8", **kw: Any) -> None:
        super().__init__(**kw)
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise BackendUnavailable("backend onnxruntime needs the onnxruntime package (make install)") from err
        self.ort = ort
        self.target = device
        ort_providers(device)  # fails now, naming what to install, rather than at the first model
        if self.precision not in ("fp32", "int8") or (self.precision == "int8" and device != "cpu"):
            raise BackendUnavailable("backend onnxruntime measures fp32 models, or int8 ones on device cpu; "
                                     f"got precision {self.precision} on {device}")
        self.int8_activations = int8_activations

    def device(self) -> dict[str, Any]:
        return device_record(self.target)

    def versions(self) -> dict[str, str]:
        return {"onnxruntime": self.ort.__version__, "torch": torch.__version__}

    def fingerprint(self) -> dict[str, Any]:
        fp = super().fingerprint()
        if self.precision == "int8":  # a table measured with one activation type does not price the other
            fp["int8_activations"] = self.int8_activations
        return fp

    def prepare_onnx(self, onnx_model: bytes, input_shape: tuple[int, ...]) -> TimedCall:
        """An exported model (bytes) ready to run on a (batch_size, *input_shape) input; at precision
        int8, its post-training Q/DQ model (``pipeline.quantize``; the ranges, from a few random
        inputs, do not change the latency)."""
        if self.precision == "int8":
            onnx_model = _quantized(onnx_model, input_shape, self.int8_activations)
        sess = ort_session(onnx_model, self.target, self.threads, log_severity=3)
        x = torch.randn(self.batch_size, *input_shape, generator=torch.Generator().manual_seed(0)).numpy()
        feed = {sess.get_inputs()[0].name: x}
        return wall_timed(lambda: sess.run(None, feed))

    def prepare(self, model: nn.Module, input_shape: tuple[int, ...]) -> TimedCall:
        return self.prepare_onnx(_export(model, input_shape, self.batch_size), input_shape)


class _Threads:
    """torch's intra-op thread count set for a block (restored afterwards)."""

    def __init__(self, n: int) -> None:
        self.n, self.prev = n, torch.get_num_threads()

    def __enter__(self) -> None:
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.prev)


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, device: str = "cpu", cuda_graph: bool = False, **kw: Any) -> None:
        super().__init__(**kw)
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable("target.device cuda: torch sees no CUDA GPU here; use device: cpu")
        if self.precision == "fp16" and device != "cuda":
            raise BackendUnavailable("precision fp16 with the torch backend needs device: cuda")
        if self.precision == "int8":
            raise BackendUnavailable("precision int8 is measured with backend onnxruntime on device cpu; the torch "
                                     "backend measures fp32 or fp16")
        self.dev = torch.device(device)
        self.cuda_graph = cuda_graph and device == "cuda"

    def device(self) -> dict[str, Any]:
        return device_record(self.dev.type)

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__, "cuda": str(torch.version.cuda)}

    def _threads(self) -> Any:
        return _Threads(self.threads) if self.dev.type == "cpu" else super()._threads()

    @torch.no_grad()
    def prepare(self, model: nn.Module, input_shape: tuple[int, ...]) -> TimedCall:
        dtype = torch.float16 if self.precision == "fp16" else torch.float32
        m = copy.deepcopy(model).eval().to(self.dev, dtype)  # the caller's model stays where it is
        x = torch.randn(self.batch_size, *input_shape, device=self.dev, dtype=dtype)

        def run() -> None:
            with torch.no_grad():
                m(x)

        if self.dev.type == "cpu":
            return wall_timed(run)
        if not self.cuda_graph:
            with heuristic_kernels():  # cuDNN caches the plan chosen here for these shapes
                run()
            return cuda_timed(run)
        # warm up on a side stream (cuDNN/cuBLAS choose their kernels), then capture one forward pass
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), heuristic_kernels():
            for _ in range(3):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), heuristic_kernels():
            y = m(x)
        keep = (m, x, y)  # the graph reads and writes these buffers: the closure keeps them alive
        return cuda_timed(lambda: (graph.replay(), keep))


class TensorRTBackend(Backend):
    """Engine built from ONNX with the TensorRT Python API, timed with CUDA events.

    TensorRT cannot be installed on the CPU build machines (ENV.md); the import is lazy and a
    missing package is a clear BackendUnavailable.
    """

    name = "tensorrt"

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        if self.precision == "int8":  # its sub-networks would need Q/DQ models: measured with onnxruntime on a CPU
            raise BackendUnavailable("precision int8 is measured with backend onnxruntime on device cpu; with tensorrt, "
                                     "measure fp16 and deploy int8 with engine.precision: int8")
        try:
            import tensorrt as trt
        except ImportError as err:
            raise BackendUnavailable(
                "backend tensorrt needs the `tensorrt` Python package and an NVIDIA GPU (e.g. the NVIDIA "
                "PyTorch container, see Dockerfile); use target.backend: onnxruntime here"
            ) from err
        check_tensorrt_version(trt)  # 10.x or 11.x: strongly typed builds (fp16 from an fp16 ONNX model)
        if not torch.cuda.is_available():
            raise BackendUnavailable("backend tensorrt needs a CUDA GPU visible to torch")
        self.trt = trt

    def device(self) -> dict[str, Any]:
        return _cuda_device()

    def versions(self) -> dict[str, str]:
        return {"tensorrt": self.trt.__version__, "torch": torch.__version__}

    def prepare(self, model: nn.Module, input_shape: tuple[int, ...]) -> TimedCall:
        b = self.batch_size
        runner = TensorRTRunner(build_tensorrt_plan(_export(model, input_shape, b), input_shape, (b, b, b),
                                                    self.precision))
        x = torch.randn(b, *input_shape, device="cuda")
        y = runner.bind(x)
        stream = torch.cuda.current_stream()
        keep = (runner, x, y)  # the engine reads and writes these buffers: the closure keeps them alive
        return cuda_timed(lambda: (runner.enqueue(stream), keep))


def _quantized(onnx_model: bytes, input_shape: tuple[int, ...], activations: str) -> bytes:
    """The Q/DQ INT8 model of ``onnx_model`` (``pipeline.quantize.quantize_int8``), calibrated on
    four random inputs: what a latency of the int8 network needs."""
    import tempfile
    from pathlib import Path

    from pipeline.quantize import quantize_int8

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(onnx_model)
        calib = torch.randn(4, *input_shape, generator=torch.Generator().manual_seed(0))
        quantize_int8(src, dst, calib, activations, batch_size=1)  # type: ignore[arg-type]
        return dst.read_bytes()


def _export(model: nn.Module, input_shape: tuple[int, ...], batch: int) -> bytes:
    # fixed batch, no onnx.checker: profiling exports hundreds of models, each only timed
    return export_onnx(model, input_shape, batch=batch, check=False)


BACKENDS = ("onnxruntime", "torch", "tensorrt")


def make_backend(name: str, *, device: str = "cpu", batch_size: int = 1, precision: str = "fp32",
                 threads: int = 1, protocol: TimingProtocol | None = None, cuda_graph: bool = False,
                 int8_activations: str = "uint8") -> Backend:
    """The backend called ``name``; BackendUnavailable says what is missing and what to use instead."""
    kw: dict[str, Any] = dict(batch_size=batch_size, precision=precision, threads=threads, protocol=protocol)
    if name == "onnxruntime":
        return OnnxRuntimeBackend(device=device, int8_activations=int8_activations, **kw)
    if name == "torch":
        return TorchBackend(device=device, cuda_graph=cuda_graph, **kw)
    if name == "tensorrt":
        if device != "cuda":
            raise BackendUnavailable("backend tensorrt runs on device: cuda only")
        return TensorRTBackend(**kw)
    raise BackendUnavailable(f"unknown latency backend {name!r}; choose one of {BACKENDS}")


def timing_protocol(target: Any, **overrides: Any) -> TimingProtocol:
    """The ``TimingProtocol`` of a ``TargetConfig``'s ``timing`` block."""
    t = target.timing
    base = dict(passes=t.passes, window_s=t.window_ms / 1e3, min_span_s=t.span_s)
    return TimingProtocol(**{**base, **overrides})


def target_backend(target: Any) -> Backend:
    """``make_backend`` for a ``TargetConfig`` (the params' `target` section)."""
    return make_backend(target.backend, device=target.device, batch_size=target.batch_size, precision=target.precision,
                        threads=target.threads, protocol=timing_protocol(target), cuda_graph=target.cuda_graph,
                        int8_activations=target.int8_activations)


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
