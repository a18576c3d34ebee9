"""Deployment: ONNX parity, engine backend selection and budget check, manifest, hashes, predict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from models import build_model
from pipeline import deploy
from pipeline.data import PreparedData, normalize
from pipeline.deploy import (DeployError, check_manifest, export_onnx, model_card, ort_logits, ort_session, parity,
                             select_backend, sha256, verify_bundle)
from pipeline.predict import main as predict_main
from pipeline.predict import predict
from stages import engine
from tests.conftest import REPO


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
        check = parity(ref, ort_logits(sess, x, batch_size=bs))
        assert check["max_abs_diff"] <= 1e-4 and check["top1_agreement"] == 1.0
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
    assert [r["index"] for r in got] == expected.argmax(1).tolist()
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


def test_budget_verdict_allows_the_measured_noise_and_no_more() -> None:
    assert deploy.budget_verdict(0.099, 0.1, 0.02) == (True, "within")
    within, how = deploy.budget_verdict(0.1015, 0.1, 0.02)  # 1.5% over, noise 2%: a pass, said so
    assert within and "within the measured noise of 2.0%" in how
    assert deploy.budget_verdict(0.103, 0.1, 0.02)[0] is False
    assert deploy.budget_verdict(0.1001, 0.1, 0.0)[0] is False


def test_tensorrt_engine_build(tmp_path: Path, digits: PreparedData) -> None:
    if not deploy.tensorrt_available():
        reason = "TensorRT is not installed here (it cannot be on the CPU build machines, see ENV.md)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    export_onnx(_model(), (1, 8, 8), tmp_path / "m.onnx")
    deploy.build_tensorrt_engine(tmp_path / "m.onnx", tmp_path / "m.plan", (1, 8, 8), (1, 4, 16), "fp16",
                                 tmp_path / "timing.cache")
    runner = deploy.TensorRTRunner(tmp_path / "m.plan")
    x = normalize(digits.test.x[:32], *digits.norm())
    ref = ort_logits(ort_session(tmp_path / "m.onnx", optimize=False), x)
    assert parity(ref, runner.logits(x, 4))["top1_agreement"] >= 0.995
