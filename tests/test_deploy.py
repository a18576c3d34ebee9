"""Deployment: ONNX parity, the runtimes (one exporter, one session builder, one TensorRT
builder), engine backend selection and budget check, manifest, hashes, predict."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from models import build_model
from pipeline import deploy
from pipeline.data import PreparedData, normalize
from pipeline.deploy import DeployError, check_manifest, model_card, parity, select_backend, sha256, verify_bundle
from pipeline.latency import make_backend
from pipeline.predict import main as predict_main
from pipeline.predict import predict
from pipeline.runtimes import (
    INPUT,
    OUTPUT,
    ConversionError,
    TensorRTRunner,
    build_tensorrt_plan,
    export_onnx,
    ort_logits,
    ort_session,
    tensorrt_available,
)
from stages import engine
from tests.conftest import REPO


def assert_same_top1(reference: torch.Tensor, other: torch.Tensor, tol: float, got: list[int] | None = None) -> None:
    """Top-1 of ``other`` (or the classes ``got``) equals the reference's on every sample whose
    reference top-2 gap is above ``tol``: an untrained network's near-ties may flip between runtimes."""
    top2 = reference.topk(2, dim=1).values
    decided = (top2[:, 0] - top2[:, 1]) > tol
    picked = torch.tensor(got) if got is not None else other.argmax(1)
    assert decided.sum() >= len(reference) // 2, "too many near-ties for the check to mean anything"
    assert torch.equal(picked[decided], reference.argmax(1)[decided])


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet_tiny", num_classes=10, in_channels=1).eval()


def test_export_matches_pytorch_and_batch_is_dynamic(tmp_path: Path, digits: PreparedData) -> None:
    model = _model()
    export_onnx(model, (1, 8, 8), tmp_path / "m.onnx")
    x = normalize(digits.test.x[:50], *digits.norm())
    with torch.no_grad():
        ref = model(x)
    sess = ort_session(tmp_path / "m.onnx", optimize=False)
    for bs in (1, 7, 50):
        out = ort_logits(sess, x, batch_size=bs)
        assert parity(ref, out)["max_abs_diff"] <= 1e-4
        assert_same_top1(ref, out, tol=2e-4)
    import onnx

    m = onnx.load(str(tmp_path / "m.onnx"))
    assert next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 17


def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deploy, "tensorrt_available", lambda: False)
    monkeypatch.setattr(deploy, "ort_has_cuda", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for requested in ("auto", "torch"):  # the torch engine on a CUDA target torch cannot see
        with pytest.raises(DeployError, match=f"engine.backend {requested} gives the torch engine.*no CUDA GPU"):
            select_backend(requested, "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # a GPU without TensorRT and without ONNX Runtime's CUDA provider: the PyTorch-native engine
    assert select_backend("auto", "cuda")[0] == "torch"
    monkeypatch.setattr(deploy, "ort_has_cuda", lambda: True)
    assert select_backend("auto", "cuda")[0] == "onnxruntime"
    assert select_backend("onnxruntime", "cuda") == ("onnxruntime", "requested")
    assert select_backend("torch", "cpu") == ("torch", "requested")
    with pytest.raises(DeployError, match="engine.backend tensorrt needs"):
        select_backend("tensorrt", "cuda")
    monkeypatch.setattr(deploy, "tensorrt_available", lambda: True)
    assert select_backend("auto", "cuda")[0] == "tensorrt"
    assert select_backend("auto", "cpu")[0] == "onnxruntime"  # a CPU target never gets a GPU engine


META = {"image_size": [8, 8], "channels": 1, "mean": [0.3], "std": [0.3], "classes": [str(i) for i in range(10)]}


def _manifest(files: dict[str, str], meta: dict = META) -> dict:
    card = model_card(meta)
    return {
        "format": "slimdeploy-handoff/1", "model": {"onnx": "model.onnx"}, "engine": {"file": "model.onnx"},
        "input": card["input"], "output": card["output"], "preprocessing": card["preprocessing"],
        "classes": card["classes"], "accuracy": {}, "latency": {}, "budget": {}, "device": {},
        "versions": {}, "git_revision": "x", "files": files,
    }


def _bundle(tmp_path: Path, meta: dict = META) -> Path:
    b = tmp_path / "bundle"
    b.mkdir()
    export_onnx(_model(), (1, 8, 8), b / "model.onnx", card=model_card(meta))
    (b / "manifest.json").write_text(json.dumps(_manifest({"model.onnx": sha256(b / "model.onnx")}, meta)))
    return b


def _edit_manifest(b: Path, **changes: object) -> None:
    m = json.loads((b / "manifest.json").read_text())
    m.update(changes)
    (b / "manifest.json").write_text(json.dumps(m))


def test_manifest_that_disagrees_with_the_model_is_refused(tmp_path: Path, digits: PreparedData,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    b = _bundle(tmp_path)
    img = tmp_path / "x.png"
    Image.fromarray(digits.test.x[0, 0].numpy()).save(img)
    assert predict_main(["--bundle", str(b), str(img)]) == 0
    capsys.readouterr()
    _edit_manifest(b, classes=[str(i) for i in reversed(range(10))])  # labels reversed, hashes untouched
    assert predict_main(["--bundle", str(b), str(img)]) == 2
    assert "classes: the same names in another order" in capsys.readouterr().err
    _edit_manifest(b, classes=[str(i) for i in range(9)])  # one short: was an IndexError traceback
    assert predict_main(["--bundle", str(b), str(img)]) == 2
    assert "9 classes in the manifest, 10 in the model" in capsys.readouterr().err
    _edit_manifest(b, classes=META["classes"], preprocessing={**model_card(META)["preprocessing"], "std": [1.0]})
    assert predict_main(["--bundle", str(b), str(img)]) == 2
    assert "preprocessing: manifest" in capsys.readouterr().err


def test_swapped_model_with_rewritten_hashes(tmp_path: Path, digits: PreparedData,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """What a bundle can and cannot detect when someone swaps model.onnx and rewrites its sha256."""
    img = tmp_path / "x.png"
    Image.fromarray(digits.test.x[0, 0].numpy()).save(img)
    b = _bundle(tmp_path)

    def swap(writer) -> None:  # noqa: ANN001
        writer(b / "model.onnx")
        m = json.loads((b / "manifest.json").read_text())
        m["files"]["model.onnx"] = sha256(b / "model.onnx")
        (b / "manifest.json").write_text(json.dumps(m))

    # detected: an ONNX model from elsewhere (no card), whatever it computes
    swap(lambda p: export_onnx(build_model("resnet_tiny", num_classes=10, in_channels=1).eval(), (1, 8, 8), p))
    assert predict_main(["--bundle", str(b), str(img)]) == 2
    assert "carries no 'slimdeploy' metadata" in capsys.readouterr().err
    # detected: a model of ours for other classes (its card and its graph say 5 outputs)
    other = {**META, "classes": list("abcde")}
    swap(lambda p: export_onnx(build_model("resnet_tiny", num_classes=5, in_channels=1).eval(), (1, 8, 8), p,
                               card=model_card(other)))
    assert predict_main(["--bundle", str(b), str(img)]) == 2
    assert "5 in the model" in capsys.readouterr().err
    # detected: a card edited to claim 10 classes over a 5-output graph
    swap(lambda p: export_onnx(build_model("resnet_tiny", num_classes=5, in_channels=1).eval(), (1, 8, 8), p,
                               card=model_card(META)))
    assert predict_main(["--bundle", str(b), str(img)]) == 2
    assert "do not give one score per class" in capsys.readouterr().err
    # NOT detectable without a signature: another network for the same classes, exported with the same
    # card and its hash rewritten consistently. The manifest's hashes protect against corruption and
    # accidental edits, not against a deliberate, consistent rewrite.
    torch.manual_seed(123)
    swap(lambda p: export_onnx(build_model("resnet_tiny", num_classes=10, in_channels=1).eval(), (1, 8, 8), p,
                               card=model_card(META)))
    assert predict_main(["--bundle", str(b), str(img)]) == 0


def test_manifest_schema() -> None:
    check_manifest(_manifest({"a": "0" * 64}))
    bad = _manifest({"a": "0" * 64})
    del bad["preprocessing"]["mean"]
    with pytest.raises(DeployError, match="preprocessing lacks 'mean'"):
        check_manifest(bad)
    bad = _manifest({"a": "0" * 64})
    del bad["budget"]
    with pytest.raises(DeployError, match="lacks \\['budget'\\]"):
        check_manifest(bad)


def test_tampered_or_missing_bundle_file_is_refused(tmp_path: Path) -> None:
    b = _bundle(tmp_path)
    verify_bundle(b)
    data = bytearray((b / "model.onnx").read_bytes())
    data[-1] ^= 1
    (b / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(DeployError, match="model.onnx does not match its sha256"):
        verify_bundle(b)
    (b / "model.onnx").unlink()
    with pytest.raises(DeployError, match="model.onnx listed in manifest.json is missing"):
        verify_bundle(b)
    (b / "manifest.json").unlink()
    with pytest.raises(DeployError, match="manifest.json is missing"):
        verify_bundle(b)


def test_predict_applies_the_manifest_preprocessing(tmp_path: Path, digits: PreparedData,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    b = _bundle(tmp_path)
    paths = []
    for i in range(4):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(digits.test.x[i, 0].numpy()).save(p)
        paths.append(p)
    got = predict(b, paths)
    x = (digits.test.x[:4].float() / 255 - 0.3) / 0.3
    with torch.no_grad():
        expected = torch.softmax(_model()(x), 1)
    assert_same_top1(expected, expected, tol=1e-4, got=[r["index"] for r in got])
    assert np.allclose([r["probability"] for r in got], expected.max(1).values.numpy(), atol=1e-4)
    assert predict_main(["--bundle", str(b), *map(str, paths)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 4
    (b / "model.onnx").write_bytes(b"tampered")
    assert predict_main(["--bundle", str(b), str(paths[0])]) == 2
    assert "does not match its sha256" in capsys.readouterr().err


def _engine_run(tmp_path: Path, digits_dir: Path, budget_ms: float, **engine_values: object) -> int:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["engine"].update(timing_passes=3, timing_span_s=0.0, **engine_values)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    export_onnx(_model(), (1, 8, 8), tmp_path / "m.onnx")
    (tmp_path / "masks.json").write_text(json.dumps({"budget_ms": budget_ms, "predicted_ms": 0.01, "measured_ms": 0.01}))
    return engine.main(["--params", str(tmp_path / "params.yaml"), "--data", str(digits_dir), "--onnx",
                        str(tmp_path / "m.onnx"), "--pruned", str(tmp_path / "masks.json"), "--out-dir",
                        str(tmp_path / "engine"), "--metrics", str(tmp_path / "engine.json")])


def test_engine_stage_onnxruntime_within_budget(tmp_path: Path, digits_dir: Path) -> None:
    assert _engine_run(tmp_path, digits_dir, budget_ms=1e6, backend="onnxruntime") == 0
    m = json.loads((tmp_path / "engine.json").read_text())
    assert m["backend"] == "onnxruntime" and m["top1_agreement_with_onnx"] >= 0.995 and m["within_budget"]
    assert m["latency"]["p50_ms"] <= m["latency"]["p90_ms"] <= m["latency"]["p99_ms"]
    assert 0 < m["latency"]["ms"] <= m["latency"]["interval_ms"][1] and m["latency"]["windows"] == 3
    assert (tmp_path / "engine" / "model.opt.onnx").is_file() and (tmp_path / "engine" / "engine.json").is_file()


def test_engine_stage_fails_over_budget_and_writes_no_engine(tmp_path: Path, digits_dir: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    assert _engine_run(tmp_path, digits_dir, budget_ms=1e-6) == 2
    assert "over the budget" in caplog.text and "predicted" in caplog.text
    assert not (tmp_path / "engine").exists()
    assert not json.loads((tmp_path / "engine.json").read_text())["within_budget"]  # the evidence


def test_engine_stage_over_budget_can_warn(tmp_path: Path, digits_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert _engine_run(tmp_path, digits_dir, budget_ms=1e-6, on_over_budget="warn") == 0
    assert "over the budget" in caplog.text and (tmp_path / "engine" / "model.opt.onnx").is_file()


def test_tensorrt_engine_build(tmp_path: Path, digits: PreparedData) -> None:
    if not tensorrt_available():
        reason = "TensorRT is not installed here (it cannot be on the CPU build machines, see ENV.md)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    export_onnx(_model(), (1, 8, 8), tmp_path / "m.onnx")
    plan = build_tensorrt_plan(tmp_path / "m.onnx", (1, 8, 8), (1, 4, 16), "fp16",
                               timing_cache=tmp_path / "timing.cache")
    assert (tmp_path / "timing.cache").is_file()
    (tmp_path / "m.plan").write_bytes(plan)
    runner = TensorRTRunner(tmp_path / "m.plan")
    x = normalize(digits.test.x[:32], *digits.norm())
    ref = ort_logits(ort_session(tmp_path / "m.onnx", optimize=False), x)
    assert parity(ref, runner.logits(x, 4))["top1_agreement"] >= 0.995


# --- the runtimes, as the deployment and the latency profiler share them --------------------------


def test_one_exporter_for_the_bundle_and_the_profiler(tmp_path: Path) -> None:
    """The deployment file (dynamic batch, checked) and the profiler's graph (fixed batch) come
    from one function with the same tensor names; exporting leaves the model's mode alone."""
    import onnx

    model = _model().train()
    data = export_onnx(model, (1, 8, 8), tmp_path / "m.onnx")
    assert model.training and data == (tmp_path / "m.onnx").read_bytes()
    fixed = onnx.load_from_string(export_onnx(model, (1, 8, 8), batch=3, check=False))
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert [i.name for i in fixed.graph.input] == [INPUT] and [o.name for o in fixed.graph.output] == [OUTPUT]
    assert dims(fixed.graph.input[0]) == [3, 1, 8, 8] and dims(fixed.graph.output[0]) == [3, 10]
    dynamic = onnx.load(str(tmp_path / "m.onnx"))
    assert dims(dynamic.graph.input[0])[0] == "batch" and dynamic.graph.output[0].name == OUTPUT
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        ref = model.eval()(x)
    for m in (data, fixed.SerializeToString()):  # the same numbers from both graphs
        assert torch.allclose(ort_logits(ort_session(m, optimize=False), x), ref, atol=1e-4)


def test_onnxruntime_backend_times_the_exported_graph() -> None:
    backend = make_backend("onnxruntime", batch_size=2, threads=1)
    call = backend.prepare(_model(), (1, 8, 8))
    assert call() > 0


def test_one_tensorrt_builder_serves_the_engine_stage_and_the_profiler(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Without TensorRT installed, on a fake of the TensorRT 11 API (it raises on any attribute 11
    removed): the builder asks for what both callers need (the profile's min/opt/max batch, a
    strongly typed network, the timing cache, fp16 as an fp16 conversion of the ONNX model) and
    refuses int8 of a model without Q/DQ nodes. tests/test_tensorrt_api.py covers 10.x and 11.x."""
    from pipeline.runtimes import onnx_precision
    from tests.fake_tensorrt import fake_tensorrt

    trt = fake_tensorrt("11.4.0")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    onnx_model = export_onnx(_model(), (1, 8, 8), tmp_path / "m.onnx")
    # the engine stage: a file, a batch range, fp16, a timing cache written back
    plan = build_tensorrt_plan(tmp_path / "m.onnx", (1, 8, 8), (1, 4, 16), "fp16", timing_cache=tmp_path / "t.cache")
    assert plan == b"plan" and (tmp_path / "t.cache").read_bytes() == b"cache:"
    assert trt.calls["profile"] == (INPUT, ((1, 1, 8, 8), (4, 1, 8, 8), (16, 1, 8, 8)))
    assert trt.calls["networks"][-1].strongly_typed and onnx_precision(trt.calls["parsed"][-1]) == "fp16"
    # the latency backend: bytes, one fixed batch, fp32 (the model as given), no cache
    assert build_tensorrt_plan(onnx_model, (1, 8, 8), (2, 2, 2), "fp32") == b"plan"
    assert trt.calls["profile"][1] == ((2, 1, 8, 8),) * 3 and trt.calls["parsed"][-1] == onnx_model
    with pytest.raises(ConversionError, match="int8 needs an explicitly quantized ONNX model"):
        build_tensorrt_plan(onnx_model, (1, 8, 8), (2, 2, 2), "int8")
    with pytest.raises(ConversionError, match="cannot parse"):
        build_tensorrt_plan(b"not onnx", (1, 8, 8), (2, 2, 2), "fp32")


def test_the_engine_budget_verdict_is_the_median_of_paired_readings(monkeypatch: pytest.MonkeyPatch) -> None:
    """engine.timing_readings paired readings (network, student), each ratio times the prune
    stage's student latency, the median kept: one reading off by 30% does not decide."""
    from types import SimpleNamespace

    import stages.engine as se
    from pipeline.config import EngineConfig, TargetConfig

    class Fake:
        def measure_readings(self, models, shape, protocol, readings=1, extra=()):  # noqa: ANN001, ANN201
            assert len(models) == 2 and shape == (1, 8, 8) and not extra
            return [[0.5, 1.0], [0.9, 1.0], [0.6, 1.0], [0.55, 1.0], [0.58, 1.0]][:readings]

    monkeypatch.setattr(se, "target_backend", lambda target: Fake())
    monkeypatch.setattr(se, "load_student", lambda path, meta: (torch.nn.Identity(), {}))
    monkeypatch.setattr("pipeline.slim.load_slimmed_model", lambda path: (torch.nn.Identity(), {}))
    args = SimpleNamespace(model="slim.pt", student="student.pt")
    data = SimpleNamespace(meta={"image_size": [8, 8]}, channels=1)
    from pipeline.prune import Budget

    budget = Budget.derive(0.5, "fraction", (0.9, 1.0), 2.0, 0.0)  # the student at 2 ms, no fp32 reference
    median, values = se._paired_reading(args, EngineConfig(), TargetConfig(), data, budget, None)
    assert values == pytest.approx([1.0, 1.8, 1.2]) and median == pytest.approx(1.2)
    median, values = se._paired_reading(args, EngineConfig(timing_readings=1), TargetConfig(), data, budget, None)
    assert values == pytest.approx([1.0]) and median == pytest.approx(1.0)
    assert se._paired_reading(SimpleNamespace(model=None, student=None), EngineConfig(), TargetConfig(), data,
                              budget, None) == (None, [])
