"""The one TensorRT builder and its runner on the TensorRT 10.x and 11.x APIs, without TensorRT:
strongly typed networks, no API that 11 removed, FP16 from an fp16 ONNX model (converted here
and checked on ONNX Runtime), INT8 only from a Q/DQ model, unsupported versions refused.

The fakes (``tests/fake_tensorrt.py``) fail when a removed attribute is touched; they say what the
code asks of TensorRT, not what TensorRT does with it. Builds with real TensorRT are in
``test_real_tensorrt_builds_every_precision`` and skip with the reason printed where it is absent.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml

from models import build_model
from pipeline import deploy
from pipeline.data import PreparedData, normalize
from pipeline.errors import SlimdeployError
from pipeline.latency import make_backend
from pipeline.runtimes import (
    INPUT,
    OUTPUT,
    ConversionError,
    RuntimeUnavailable,
    TensorRTRunner,
    build_tensorrt_plan,
    convert_to_fp16,
    export_onnx,
    onnx_precision,
    ort_logits,
    ort_session,
    tensorrt_available,
)
from stages import engine
from tests.conftest import REPO, randomise_bn
from tests.fake_tensorrt import DataType, fake_tensorrt

VERSIONS = ("10.0.1.6", "10.13.3.9", "11.0.0.114", "11.4.0.7")
SHAPE = (1, 8, 8)  # digits: (C, H, W)


def _model(arch: str = "resnet_tiny") -> torch.nn.Module:
    torch.manual_seed(0)
    return randomise_bn(build_model(arch, num_classes=10, in_channels=1))


@pytest.fixture(scope="module")
def fp32_onnx() -> bytes:
    return export_onnx(_model(), SHAPE)


@pytest.fixture(scope="module")
def qdq_onnx(tmp_path_factory: pytest.TempPathFactory, fp32_onnx: bytes) -> bytes:
    """The fp32 model statically quantized to Q/DQ by ONNX Runtime (int8 symmetric activations and
    per-channel weights, zero points 0 as TensorRT wants), 16 random calibration images."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    d = tmp_path_factory.mktemp("qdq")
    (d / "fp32.onnx").write_bytes(fp32_onnx)
    images = np.random.RandomState(0).randn(16, *SHAPE).astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{INPUT: images[i : i + 1]} for i in range(len(images))])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    quantize_static(str(d / "fp32.onnx"), str(d / "qdq.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    return (d / "qdq.onnx").read_bytes()


def _install(monkeypatch: pytest.MonkeyPatch, version: str, **kw: object) -> types.ModuleType:
    trt = fake_tensorrt(version, **kw)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


# --- the fp16 model (CPU, ONNX Runtime) ------------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet_tiny", "mobilenetv2_tiny"])
def test_fp16_conversion_keeps_float32_io_and_matches_fp32(arch: str, digits: PreparedData) -> None:
    """fp16 weights, float32 input and output (callers feed float32), dynamic batch kept, and the
    logits within fp16 rounding of the fp32 model's with the same top-1 wherever the fp32 top-2
    gap is above that rounding. ONNX Runtime's CPU provider runs the fp16 nodes it has no fp16
    kernel for in float32 (it inserts Casts), so this checks the model, not fp16 arithmetic."""
    fp32 = export_onnx(_model(arch), SHAPE)
    half = convert_to_fp16(fp32)
    proto = onnx.load_from_string(half)
    io = [*proto.graph.input, *proto.graph.output]
    assert [v.type.tensor_type.elem_type for v in io] == [onnx.TensorProto.FLOAT] * 2
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    floats = [t for t in proto.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert floats and all(t.data_type == onnx.TensorProto.FLOAT16 for t in floats)
    assert onnx_precision(fp32) == "fp32" and onnx_precision(half) == "fp16"
    weight_bytes = lambda m: sum(len(t.raw_data) for t in onnx.load_from_string(m).graph.initializer)  # noqa: E731
    assert weight_bytes(half) == weight_bytes(fp32) // 2  # every weight really is stored in 16 bits

    x = normalize(digits.test.x, *digits.norm())
    ref = ort_logits(ort_session(fp32, optimize=False), x)
    got = ort_logits(ort_session(half, optimize=False), x)
    assert got.dtype == torch.float32
    scale = ref.abs().max()
    assert (got - ref).abs().max() <= 5e-3 * scale  # fp16 epsilon is 9.8e-4
    top2 = ref.topk(2, dim=1).values
    decided = (top2[:, 0] - top2[:, 1]) > 1e-2 * scale
    assert decided.float().mean() > 0.9
    assert torch.equal(got.argmax(1)[decided], ref.argmax(1)[decided])
    # the same rows at batch 1 and batch 7 (the batch axis survived the conversion)
    sess = ort_session(half, optimize=False)
    assert torch.allclose(ort_logits(sess, x[:7]), got[:7]) and torch.allclose(ort_logits(sess, x[:1]), got[:1])


def test_fp16_conversion_takes_fp16_as_is_and_refuses_qdq(fp32_onnx: bytes, qdq_onnx: bytes, tmp_path: Path) -> None:
    half = convert_to_fp16(fp32_onnx)
    assert convert_to_fp16(half) == half
    (tmp_path / "m.onnx").write_bytes(fp32_onnx)
    assert convert_to_fp16(tmp_path / "m.onnx") == half  # a file, the same model
    assert onnx_precision(qdq_onnx) == "int8"
    with pytest.raises(ConversionError, match="Q/DQ"):
        convert_to_fp16(qdq_onnx)
    with pytest.raises(ConversionError, match="cannot parse"):
        convert_to_fp16(b"not onnx")


# --- the builder on both API versions ------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_builder_is_strongly_typed_and_touches_no_removed_api(version: str, precision: str, fp32_onnx: bytes,
                                                              qdq_onnx: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every precision builds a strongly typed network from a model of that precision: fp32 and
    int8 (Q/DQ) as given, fp16 from the converted fp32 model. On the 11 fake a removed attribute
    raises; on the 10 fake its use is recorded and a precision flag fails the build."""
    trt = _install(monkeypatch, version)
    model = qdq_onnx if precision == "int8" else fp32_onnx
    assert build_tensorrt_plan(model, SHAPE, (1, 4, 16), precision) == b"plan"
    (network,) = trt.calls["networks"]
    assert network.strongly_typed
    flag = int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert network.flags == 1 << flag and flag == (1 if version.startswith("10.") else 0)
    assert trt.calls["touched_removed"] == [] and trt.calls["built"] == 1
    (parsed,) = trt.calls["parsed"]
    assert onnx_precision(parsed) == precision
    if precision != "fp16":
        assert parsed == model  # taken as is
    else:
        assert parsed == convert_to_fp16(fp32_onnx)


def test_eleven_without_the_deprecated_flag_still_builds(fp32_onnx: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """11.x deprecated STRONGLY_TYPED (always on): should a later 11.x drop it, flags 0 is the
    same network; a 10.x without it cannot be strongly typed and is refused."""
    trt = _install(monkeypatch, "11.9.0", strongly_typed_flag=False)
    assert build_tensorrt_plan(fp32_onnx, SHAPE, (2, 2, 2), "fp16") == b"plan"
    assert trt.calls["networks"][0].flags == 0 and trt.calls["networks"][0].strongly_typed
    _install(monkeypatch, "10.0.0", strongly_typed_flag=False)
    with pytest.raises(RuntimeUnavailable, match="STRONGLY_TYPED"):
        build_tensorrt_plan(fp32_onnx, SHAPE, (2, 2, 2), "fp32")


@pytest.mark.parametrize("version", ["10.13.3.9", "11.4.0.7"])
def test_int8_needs_an_explicitly_quantized_model(version: str, fp32_onnx: bytes,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    trt = _install(monkeypatch, version)
    with pytest.raises(ConversionError) as err:
        build_tensorrt_plan(fp32_onnx, SHAPE, (1, 4, 16), "int8")
    msg = str(err.value)
    assert "Q/DQ" in msg and "QuantizeLinear/DequantizeLinear" in msg and "removed in TensorRT 11" in msg
    assert trt.calls["networks"] == [] and trt.calls["built"] == 0  # refused before TensorRT builds anything


def test_a_precision_the_model_does_not_carry_is_refused(fp32_onnx: bytes, qdq_onnx: bytes,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Strong typing builds the model's own types, so an fp32 engine of an fp16 model (or fp16 of a
    Q/DQ model) would silently be something else: each is refused, naming what to ask for."""
    _install(monkeypatch, "11.4.0")
    with pytest.raises(ConversionError, match="precision fp32 asked of an fp16 ONNX model.*ask for precision fp16"):
        build_tensorrt_plan(convert_to_fp16(fp32_onnx), SHAPE, (1, 1, 1), "fp32")
    with pytest.raises(ConversionError, match="precision fp16 asked of an int8 ONNX model"):
        build_tensorrt_plan(qdq_onnx, SHAPE, (1, 1, 1), "fp16")
    with pytest.raises(ConversionError, match="'bf16' is not one of"):
        build_tensorrt_plan(fp32_onnx, SHAPE, (1, 1, 1), "bf16")


@pytest.mark.parametrize("version", ["8.6.1", "9.3.0.1", "12.0.0", "12.1.0.5"])
def test_an_unsupported_tensorrt_is_refused_naming_its_version(version: str, fp32_onnx: bytes,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    trt = _install(monkeypatch, version)
    match = rf"TensorRT {version} is not supported.*10\.x to 11\.x"
    with pytest.raises(RuntimeUnavailable, match=match) as err:
        build_tensorrt_plan(fp32_onnx, SHAPE, (1, 4, 16), "fp16")
    assert isinstance(err.value, SlimdeployError) and trt.calls["networks"] == []
    with pytest.raises(RuntimeUnavailable, match=match):
        TensorRTRunner(b"plan")
    with pytest.raises(RuntimeUnavailable, match=match):  # the latency backend checks when it is made
        make_backend("tensorrt", device="cuda", precision="fp16")


@pytest.mark.parametrize("version", ["10.13.3.9", "11.4.0.7"])
def test_profile_shapes_and_timing_cache(version: str, tmp_path: Path, fp32_onnx: bytes,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine stage's call (a file, batch 1..16 optimised at 4, a timing cache read and written
    back) and the latency backend's (bytes, one fixed batch, no cache)."""
    trt = _install(monkeypatch, version)
    (tmp_path / "m.onnx").write_bytes(fp32_onnx)
    cache = tmp_path / "timing.cache"
    assert build_tensorrt_plan(tmp_path / "m.onnx", SHAPE, (1, 4, 16), "fp16", timing_cache=cache) == b"plan"
    assert trt.calls["profile"] == (INPUT, ((1, *SHAPE), (4, *SHAPE), (16, *SHAPE)))
    assert trt.calls["timing_cache_in"] == b"" and cache.read_bytes() == b"cache:"
    build_tensorrt_plan(tmp_path / "m.onnx", SHAPE, (1, 4, 16), "fp16", timing_cache=cache)
    assert trt.calls["timing_cache_in"] == b"cache:"  # the second build starts from the first's cache
    assert build_tensorrt_plan(fp32_onnx, SHAPE, (2, 2, 2), "fp32") == b"plan"
    assert trt.calls["profile"] == (INPUT, ((2, *SHAPE),) * 3) and trt.calls["touched_removed"] == []


def test_parser_errors_are_conversion_errors(fp32_onnx: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, "11.4.0", parse_ok=False)
    with pytest.raises(ConversionError, match="TensorRT cannot parse the ONNX model: fake parser error"):
        build_tensorrt_plan(fp32_onnx, SHAPE, (1, 1, 1), "fp32")
    with pytest.raises(ConversionError, match="cannot parse the ONNX model"):
        build_tensorrt_plan(b"not onnx", SHAPE, (1, 1, 1), "fp32")


# --- the runner --------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["10.13.3.9", "11.4.0.7"])
def test_runner_uses_the_name_based_api_both_versions_share(version: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deserialise, find the input and output by name and mode, bind float32 buffers, enqueue
    with execute_async_v3: on the 11 fake (slotted objects) any other call would raise. CUDA is
    faked too (CPU buffers; their addresses are what TensorRT is given)."""
    _install(monkeypatch, version)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: types.SimpleNamespace(cuda_stream=7))
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda shape, device, dtype: empty(shape, dtype=dtype))
    runner = TensorRTRunner(b"plan")
    assert (runner.input_name, runner.output_name) == (INPUT, OUTPUT)
    x = torch.zeros(3, *SHAPE)
    y = runner.bind(x)
    assert y.shape == (3, 10) and y.dtype == torch.float32
    assert runner.ctx.shapes[INPUT] == (3, *SHAPE)
    assert runner.ctx.addresses == {INPUT: x.data_ptr(), OUTPUT: y.data_ptr()}
    runner.enqueue(types.SimpleNamespace(cuda_stream=7))
    assert runner.ctx.runs == [7]
    with pytest.raises(ConversionError, match="cannot deserialize"):
        TensorRTRunner(b"not a plan")
    _install(monkeypatch, version, io_dtype=DataType.HALF)
    with pytest.raises(ConversionError, match="not float32"):
        TensorRTRunner(b"plan")


# --- the engine stage ----------------------------------------------------------------------------


def _engine_stage(tmp_path: Path, digits_dir: Path, **engine_values: object) -> int:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["engine"].update(backend="tensorrt", timing_passes=3, timing_span_s=0.0, **engine_values)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    export_onnx(_model(), SHAPE, tmp_path / "m.onnx")
    (tmp_path / "masks.json").write_text(json.dumps({"budget_ms": 1e6, "predicted_ms": 0.01, "measured_ms": 0.01}))
    return engine.main(["--params", str(tmp_path / "params.yaml"), "--data", str(digits_dir), "--onnx",
                        str(tmp_path / "m.onnx"), "--pruned", str(tmp_path / "masks.json"), "--out-dir",
                        str(tmp_path / "engine"), "--metrics", str(tmp_path / "engine.json")])


@pytest.mark.parametrize(("version", "precision", "message", "values"), [
    ("12.0.0", "fp16", "TensorRT 12.0.0 is not supported", {}),
    ("11.4.0", "int8", "does not build in TensorRT", {"int8_activations": "uint8"}),
    ("11.4.0", "int8", "engine.calibration_images is 100000", {"calibration_images": 100000}),
])
def test_engine_stage_exits_2_and_leaves_no_engine(version: str, precision: str, message: str,
                                                   values: dict[str, object], tmp_path: Path, digits_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    _install(monkeypatch, version)
    monkeypatch.setattr(deploy, "tensorrt_available", lambda: True)
    assert _engine_stage(tmp_path, digits_dir, precision=precision, **values) == 2
    assert message in caplog.text and not (tmp_path / "engine").exists()


@pytest.mark.parametrize("version", ["10.13.0", "11.4.0"])
def test_engine_stage_builds_int8_from_its_own_qdq_model(version: str, tmp_path: Path, digits_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """engine.precision int8 on TensorRT: the exported fp32 model is quantized (symmetric int8
    activations, calibrated on the training split) and that Q/DQ model is what the fake builder of
    either version receives, with precision int8 (the real one would refuse the fp32 model)."""
    _install(monkeypatch, version)
    monkeypatch.setattr(deploy, "tensorrt_available", lambda: True)
    seen: dict[str, object] = {}
    real_build = engine.build_tensorrt_plan

    def build(source: object, *args: object, **kw: object) -> bytes:
        proto = onnx.load(str(source))
        inits = {i.name: i.data_type for i in proto.graph.initializer}
        seen.update(precision=args[2], model=onnx_precision(proto), zero_points={
            inits.get(n.input[2]) for n in proto.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2})
        real_build(source, *args, **kw)  # the fake builder of this version: no removed attribute touched
        raise SlimdeployError("stop after the build: the runner needs a GPU")

    monkeypatch.setattr(engine, "build_tensorrt_plan", build)
    assert _engine_stage(tmp_path, digits_dir, precision="int8", calibration_images=32) == 2
    assert seen["precision"] == "int8" and seen["model"] == "int8"
    assert seen["zero_points"] == {onnx.TensorProto.INT8}  # symmetric int8 activations, as TensorRT needs
    assert not (tmp_path / "engine").exists()


# --- real TensorRT -------------------------------------------------------------------------------


@pytest.mark.tensorrt
def test_real_tensorrt_builds_every_precision(tmp_path: Path, digits: PreparedData, fp32_onnx: bytes,
                                              qdq_onnx: bytes) -> None:
    """On a GPU with TensorRT 10 or 11: fp32, fp16 (converted) and int8 (Q/DQ) engines build and
    agree with ONNX Runtime's fp32 (fp32, fp16) or Q/DQ (int8) logits on the digits test split."""
    if not tensorrt_available():
        reason = "TensorRT is not installed here (it cannot be on the CPU build machines, see ENV.md)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    x = normalize(digits.test.x, *digits.norm())
    for precision, model, least in (("fp32", fp32_onnx, 0.995), ("fp16", fp32_onnx, 0.99), ("int8", qdq_onnx, 0.95)):
        plan = build_tensorrt_plan(model, SHAPE, (1, 8, 32), precision, timing_cache=tmp_path / "timing.cache")
        got = TensorRTRunner(plan).logits(x, 8)
        ref = ort_logits(ort_session(model, optimize=False), x)
        agreement = (got.argmax(1) == ref.argmax(1)).float().mean().item()
        print(f"TensorRT {precision}: top-1 agreement with ONNX Runtime {agreement:.4f}")
        assert agreement >= least, precision
