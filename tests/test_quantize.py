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
