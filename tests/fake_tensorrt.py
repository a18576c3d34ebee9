"""Fakes of the TensorRT 10.x and 11.x Python APIs: just enough of the builder and the runtime to
record what ``pipeline.runtimes.tensorrt`` asks of TensorRT, on a machine without it.

Written from NVIDIA's 10.x -> 11.x Python migration reference. The 11 fake has nothing of what
11 removed (the precision ``BuilderFlag``s, ``IBuilderConfig.int8_calibrator``,
``set_calibration_profile`` and the quantization flags, the calibrator classes): every object is
slotted, so reading *or assigning* a removed attribute raises AttributeError, as the real
bindings do. The 10 fake has them, records any use, and like real TensorRT 10 refuses to build a
strongly typed network with a precision flag set. ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``
is 1 in 10.x (after ``EXPLICIT_BATCH``) and 0 in 11.x (deprecated there, ignored: always strongly
typed); ``strongly_typed_flag=False`` fakes an 11.x that dropped it.
"""

from __future__ import annotations

import enum
import types
from typing import Any

# removed in TensorRT 11 (migration reference)
REMOVED_FLAGS = ("FP16", "INT8", "FP8", "BF16", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                 "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO")
REMOVED_CONFIG = ("int8_calibrator", "set_calibration_profile", "get_calibration_profile", "set_quantization_flag",
                  "get_quantization_flag", "quantization_flags", "clear_quantization_flag")


class TensorIOMode(enum.IntEnum):
    NONE, INPUT, OUTPUT = 0, 1, 2


class DataType(enum.IntEnum):
    FLOAT, HALF, INT8 = 0, 1, 2


class Logger:
    WARNING = 2

    def __init__(self, level: int) -> None:
        self.level = level


def fake_tensorrt(version: str, *, strongly_typed_flag: bool = True, io_dtype: DataType = DataType.FLOAT,
                  parse_ok: bool = True) -> types.ModuleType:
    """A fake ``tensorrt`` module of ``version`` ("10.x" or "11.x" API by its major; other majors
    get the 11 API). ``trt.calls`` records what was asked: ``networks`` (their creation flags and
    ``strongly_typed``), ``parsed`` (the ONNX bytes given to the parser), ``profile``,
    ``timing_cache_in``, ``built``, ``touched_removed`` (10: uses of the APIs 11 removed).
    ``io_dtype``: the engine's input/output type; ``parse_ok``: what the parser answers."""
    old = version.split(".")[0] == "10"
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    calls: dict[str, Any] = {"networks": [], "parsed": [], "touched_removed": [], "built": 0}
    trt.calls = calls
    trt.Logger, trt.TensorIOMode, trt.DataType = Logger, TensorIOMode, DataType

    members = {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1} if old else {"STRONGLY_TYPED": 0}
    if not strongly_typed_flag:
        members.pop("STRONGLY_TYPED")
    members["PREFER_JIT_PYTHON_PLUGINS"] = max(members.values(), default=-1) + 1
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", members)
    kept = {"TF32": 10, "REFIT": 11, "DEBUG": 12, "GPU_FALLBACK": 13}
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", {**({f: i for i, f in enumerate(REMOVED_FLAGS)} if old else {}),
                                                   **kept})
    typed_bit = members.get("STRONGLY_TYPED")

    class Network:
        __slots__ = ("flags", "input_name")

        def __init__(self, flags: int) -> None:
            self.flags, self.input_name = flags, "input"

        @property
        def strongly_typed(self) -> bool:  # 11.x: always
            return not old or (typed_bit is not None and bool(self.flags & (1 << typed_bit)))

        def get_input(self, index: int) -> Any:
            return types.SimpleNamespace(name=self.input_name)

    class Profile:
        __slots__ = ()

        def set_shape(self, name: str, min: tuple, opt: tuple, max: tuple) -> None:  # noqa: A002
            calls["profile"] = (name, (min, opt, max))

    class TimingCache:
        __slots__ = ("data",)

        def __init__(self, data: bytes) -> None:
            self.data = data

        def serialize(self) -> bytes:
            return b"cache:" + self.data

    class Config11:
        """IBuilderConfig as 11.x has it (the parts the builder may use)."""

        __slots__ = ("flags", "profiles", "cache")

        def __init__(self) -> None:
            self.flags: list[Any] = []
            self.profiles: list[Any] = []
            self.cache: TimingCache | None = None

        def create_timing_cache(self, data: bytes) -> TimingCache:
            calls["timing_cache_in"] = bytes(data)
            return TimingCache(bytes(data))

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            self.cache = cache
            return True

        def get_timing_cache(self) -> TimingCache | None:
            return self.cache

        def add_optimization_profile(self, profile: Profile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def set_flag(self, flag: Any) -> None:
            self.flags.append(trt.BuilderFlag(flag))  # a removed flag cannot even be named in 11

    class Config10(Config11):
        """IBuilderConfig as 10.x has it: the APIs 11 removed are here, and recorded when used."""

        __slots__ = ()

        def set_flag(self, flag: Any) -> None:
            if trt.BuilderFlag(flag).name in REMOVED_FLAGS:
                calls["touched_removed"].append(f"BuilderFlag.{trt.BuilderFlag(flag).name}")
            super().set_flag(flag)

        @property
        def int8_calibrator(self) -> Any:
            calls["touched_removed"].append("int8_calibrator")
            return None

        @int8_calibrator.setter
        def int8_calibrator(self, value: Any) -> None:
            calls["touched_removed"].append("int8_calibrator")

        def set_calibration_profile(self, profile: Any) -> bool:
            calls["touched_removed"].append("set_calibration_profile")
            return True

    class Builder:
        __slots__ = ()

        def __init__(self, logger: Logger) -> None:
            pass

        def create_network(self, flags: int = 0) -> Network:
            network = Network(int(flags))
            calls["networks"].append(network)
            return network

        def create_builder_config(self) -> Config11:
            return Config10() if old else Config11()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config11) -> bytes | None:
            precision_flags = [f for f in config.flags if f.name in REMOVED_FLAGS]
            if network.strongly_typed and precision_flags:
                return None  # TensorRT 10: precision flags are an error on a strongly typed network
            if not config.profiles:
                return None  # a dynamic input without a profile does not build
            calls["built"] += 1
            return b"plan"

    class OnnxParser:
        __slots__ = ("network",)

        def __init__(self, network: Network, logger: Logger) -> None:
            self.network = network

        def parse(self, data: bytes) -> bool:
            import onnx

            calls["parsed"].append(bytes(data))
            if not parse_ok:
                return False
            self.network.input_name = onnx.load_from_string(bytes(data)).graph.input[0].name
            return True

        @property
        def num_errors(self) -> int:
            return 0 if parse_ok else 1

        def get_error(self, index: int) -> str:
            return "fake parser error: unsupported node"

    class Context:
        __slots__ = ("shapes", "addresses", "runs")

        def __init__(self) -> None:
            self.shapes: dict[str, tuple] = {}
            self.addresses: dict[str, int] = {}
            self.runs: list[int] = []

        def set_input_shape(self, name: str, shape: tuple) -> bool:
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name: str) -> tuple:
            return (self.shapes["input"][0], 10) if name == "logits" else self.shapes[name]

        def set_tensor_address(self, name: str, address: int) -> bool:
            self.addresses[name] = address
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            self.runs.append(stream_handle)
            return True

    class Engine:
        __slots__ = ()
        tensors = (("input", TensorIOMode.INPUT), ("logits", TensorIOMode.OUTPUT))

        @property
        def num_io_tensors(self) -> int:
            return len(self.tensors)

        def get_tensor_name(self, index: int) -> str:
            return self.tensors[index][0]

        def get_tensor_mode(self, name: str) -> TensorIOMode:
            return dict(self.tensors)[name]

        def get_tensor_dtype(self, name: str) -> DataType:
            return io_dtype

        def create_execution_context(self) -> Context:
            return Context()

    class Runtime:
        __slots__ = ()

        def __init__(self, logger: Logger) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
            return Engine() if bytes(data) == b"plan" else None

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    if old:
        class IInt8EntropyCalibrator2:  # deprecated since 10.1, gone in 11
            def __init__(self) -> None:
                calls["touched_removed"].append("IInt8EntropyCalibrator2")

        trt.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2
    return trt
