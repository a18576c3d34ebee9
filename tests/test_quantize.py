"""Post-training static INT8 (pipeline/quantize.py): Q/DQ models ONNX Runtime runs, both activation
types, the calibration record, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import build_model
from pipeline.errors import ConfigError
from pipeline.quantize import calibration_rows, qdq_nodes, quantize_int8
from pipeline.runtimes import export_onnx
from pipeline.runtimes.onnxruntime import ort_logits, ort_session


@pytest.mark.parametrize("activation", ["uint8", "int8"])
def test_int8_qdq_model_runs_and_follows_the_fp32_model(tmp_path: Path, activation: str) -> None:
    torch.manual_seed(0)
    model = build_model("resnet_tiny", num_classes=10, in_channels=1).eval()
    export_onnx(model, (1, 8, 8), tmp_path / "fp32.onnx")
    calib = torch.randn(64, 1, 8, 8)
    rec = quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", calib, activation, batch_size=16)
    assert qdq_nodes(tmp_path / "int8.onnx") > 0 and qdq_nodes(tmp_path / "fp32.onnx") == 0
    assert rec["activations"] == activation and rec["calibration"]["images"] == 64 and rec["format"] == "QDQ"
    again = quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8b.onnx", calib, activation, batch_size=16)
    assert again["calibration"]["sha256"] == rec["calibration"]["sha256"]  # the same images, the same hash
    other = quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8c.onnx", calib[:32], activation, batch_size=16)
    assert other["calibration"]["sha256"] != rec["calibration"]["sha256"]
    x = torch.randn(200, 1, 8, 8)
    ref = ort_logits(ort_session(tmp_path / "fp32.onnx", "cpu", optimize=False), x)
    got = ort_logits(ort_session(tmp_path / "int8.onnx", "cpu"), x)
    # quantized, not identical; the same network: logits within a few percent of theirs on average
    # (an untrained network's top-1 margins are too thin to compare argmaxes)
    assert not torch.equal(got, ref)
    assert (got - ref).abs().mean() < 0.1 * ref.abs().mean()


def test_calibration_rows_and_refusals(tmp_path: Path) -> None:
    rows = calibration_rows(100, 10, seed=3)
    assert len(rows) == len(set(rows.tolist())) == 10 and torch.equal(rows, calibration_rows(100, 10, seed=3))
    for bad in (0, 101):
        with pytest.raises(ConfigError, match=r"engine.calibration_images is .*\[1, 100\]"):
            calibration_rows(100, bad, seed=0)
    with pytest.raises(ConfigError, match="at least one image"):
        quantize_int8(tmp_path / "none.onnx", tmp_path / "out.onnx", torch.zeros(0, 1, 8, 8))
    with pytest.raises(ConfigError, match="uint8 or int8"):
        quantize_int8(tmp_path / "none.onnx", tmp_path / "out.onnx", torch.zeros(1, 1, 8, 8), "int4")  # type: ignore[arg-type]


from tests.test_bad_inputs import _engine_int8, world  # noqa: E402, F401  (the tiny pipeline, built once here)


def test_int8_engine_on_onnxruntime_is_measured_checked_and_handed_over(world: dict, tmp_path: Path) -> None:  # noqa: F811
    import json

    import numpy as np
    from PIL import Image

    from pipeline.predict import predict
    from stages import handoff

    code, _ = _engine_int8(world, tmp_path, calibration_images=64, max_accuracy_drop=1.0)
    assert code == 0
    m = json.loads((tmp_path / "em.json").read_text())
    q = m["quantization"]
    assert m["precision"] == "int8" and m["engine_file"] == "model.int8.onnx" and q["calibration"]["images"] == 64
    assert set(q["measured_ms"]) == {"uint8", "int8"} and q["activations"] == min(q["measured_ms"], key=q["measured_ms"].get)
    assert qdq_nodes(tmp_path / "e" / "model.int8.onnx") > 0 and sorted(p.name for p in (tmp_path / "e").iterdir()) == [
        "engine.json", "model.int8.onnx"]
    assert m["accuracy_drop"] == pytest.approx(m["test_acc_onnx"] - m["test_acc"])
    w = world["dir"]
    assert handoff.main(["--params", str(world["params"]), "--data", str(w / "prep"), "--teachers", str(w / "t"),
                         "--student", str(w / "t" / "a.pt"), "--slim", str(w / "s" / "model.pt"), "--onnx",
                         str(w / "x" / "model.onnx"), "--engine-dir", str(tmp_path / "e"), "--widths-png",
                         str(w / "p" / "prune" / "widths.png"), "--latency-table", str(w / "prof" / "table.json"),
                         "--out-dir", str(tmp_path / "bundle")]) == 0
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["engine"]["precision"] == "int8" and manifest["engine"]["quantization"]["calibration"] == q["calibration"]
    # pipeline.predict runs the int8 model: its classes are the int8 session's, image by image
    from pipeline.data import load_prepared

    test = load_prepared(w / "prep").test
    files = []
    for i in range(12):
        img = test.take(torch.tensor([i]))[0].permute(1, 2, 0).numpy()
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(files[-1])
    got = predict(tmp_path / "bundle", files)
    from pipeline.deploy import check_manifest
    from pipeline.predict import preprocess

    spec = check_manifest(manifest)
    x = preprocess(files, spec.preprocessing)

    def top(model: str) -> tuple[list[int], np.ndarray]:
        logits = ort_session(tmp_path / "bundle" / model, "cpu").run(None, {spec.input.name: x})[0].astype(np.float64)
        prob = np.exp(logits - logits.max(1, keepdims=True))
        prob /= prob.sum(1, keepdims=True)
        return prob.argmax(1).tolist(), prob.max(1)

    (k8, p8), (_, p32) = top("model.int8.onnx"), top("model.onnx")
    assert [r["index"] for r in got] == k8
    assert np.allclose([r["probability"] for r in got], p8, atol=1e-6) and not np.allclose(p8, p32, atol=1e-6)
