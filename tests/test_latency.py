"""Latency backends, the lookup-table predictor and the fingerprint check."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from models import build_model
from pipeline.errors import ConfigError
from pipeline.latency import BackendUnavailable, FingerprintMismatch, make_backend
from pipeline.latency_table import (
    LatencyTable, build_table, check_supported_layers, detect_multiple, grid_values, validate,
)

FAST = dict(batch_size=1, threads=1, min_run_time=0.002, warmup=1)


@pytest.fixture(scope="module")
def tiny_table() -> tuple[nn.Module, LatencyTable]:
    torch.manual_seed(0)
    model = build_model("cifar_resnet", num_classes=4, in_channels=1, blocks=[1, 1], stage_widths=[8, 16]).eval()
    backend = make_backend("onnxruntime", **FAST)
    table = build_table(model, (1, 8, 8), backend, {"arch": "cifar_resnet"}, multiple=4, min_fraction=0.25,
                        max_seconds=120, staircase_channels=16, progress=False)
    return model, table


def test_interpolation_is_exact_at_grid_points(tiny_table) -> None:  # noqa: ANN001
    _, table = tiny_table
    pred = table.predictor()
    for layer in table.layers:
        tab = table.tables[layer["key"]]
        for i, c_in in enumerate(tab["in"]):
            for j, c_out in enumerate(tab["out"]):
                if layer["depthwise"] and i != j:
                    continue
                got = pred.layer_ms(layer["key"], torch.tensor(float(c_in), dtype=torch.float64),
                                    torch.tensor(float(c_out), dtype=torch.float64))
                assert got.item() == pytest.approx(tab["ms"][i][j], abs=1e-12)
    # Full width: exact by construction (the remainder closes the gap to the measured network).
    assert pred({}).item() == pytest.approx(table.full_ms, rel=1e-9)


def test_prediction_is_bilinear_between_grid_points() -> None:
    table = LatencyTable(
        fingerprint={}, model={"input_shape": [1, 4, 4]}, groups={"a": 8, "b": 8},
        layers=[{"key": "k", "in_group": "a", "out_group": "b", "in_max": 8, "out_max": 8, "depthwise": False}],
        tables={"k": {"in": [4, 8], "out": [4, 8], "ms": [[1.0, 2.0], [3.0, 5.0]]}},
        remainder_ms=0.5, overhead_ms=0.0, full_ms=5.5,
    )
    pred = table.predictor()
    assert pred({"a": 6.0, "b": 6.0}).item() == pytest.approx(0.5 + (1 + 2 + 3 + 5) / 4)
    assert pred({"a": 2.0, "b": 100.0}).item() == pytest.approx(0.5 + 2.0)  # clamped to the grid
    with pytest.raises(ConfigError, match="unknown channel group"):
        pred({"zzz": 1.0})


def test_gradient_wrt_widths_is_finite_and_nonzero(tiny_table) -> None:  # noqa: ANN001
    _, table = tiny_table
    pred = table.predictor()
    widths = {g: torch.tensor(0.7 * n, dtype=torch.float64, requires_grad=True) for g, n in table.groups.items()}
    pred(widths).backward()
    grads = torch.stack([w.grad for w in widths.values()])
    assert torch.isfinite(grads).all()
    assert (grads != 0).any()


def test_predictor_tracks_measured_subnetworks(tiny_table) -> None:  # noqa: ANN001
    model, table = tiny_table
    v = validate(model, table, make_backend("onnxruntime", **FAST), samples=4, seed=0, progress=False)
    assert len(v.measured_ms) == 4 and all(m > 0 for m in v.measured_ms)
    assert v.metrics()["mape"] < 1.0  # loose: CI machines are noisy; the benchmark measures accuracy


def test_table_round_trip_and_fingerprint_refusal(tiny_table, tmp_path: Path) -> None:  # noqa: ANN001
    _, table = tiny_table
    table.save(tmp_path / "t.json")
    same = LatencyTable.load(tmp_path / "t.json", fingerprint=table.fingerprint)
    assert same.predictor()({}).item() == pytest.approx(table.predictor()({}).item())
    other = {**table.fingerprint, "batch_size": 8, "threads": 4}
    with pytest.raises(FingerprintMismatch, match=r"batch_size: recorded 1, here 8[\s\S]*threads"):
        LatencyTable.load(tmp_path / "t.json", fingerprint=other)


def test_missing_backends_give_clear_messages() -> None:
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(BackendUnavailable, match="needs the `tensorrt` Python package"):
            make_backend("tensorrt", device="cuda")
    with pytest.raises(BackendUnavailable, match="runs on device: cuda only"):
        make_backend("tensorrt", device="cpu")
    with pytest.raises(BackendUnavailable, match="unknown latency backend 'openvino'"):
        make_backend("openvino")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="torch sees no CUDA GPU"):
            make_backend("torch", device="cuda")
        with pytest.raises(BackendUnavailable, match="onnxruntime-gpu"):
            make_backend("onnxruntime", device="cuda")


def test_unsupported_layer_is_named() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.LSTM(4, 4))
    with pytest.raises(ConfigError, match=r"layer 1 \(LSTM\) is not supported"):
        check_supported_layers(model)
    grouped = nn.Sequential(nn.Conv2d(8, 8, 3, groups=2))
    with pytest.raises(ConfigError, match="grouped convolution"):
        check_supported_layers(grouped)


def test_staircase_detection() -> None:
    steps = [10.0 + 2.0 * (c // 16) + 0.01 * (c % 3) for c in range(64)]
    assert detect_multiple(steps) == 16
    noisy = list(steps)
    noisy[57] *= 1.3  # one slow measurement (seen on this machine) must not hide the staircase
    assert detect_multiple(noisy) == 16
    assert detect_multiple([float(c) for c in range(1, 65)]) == 1  # a ramp is not a staircase
    gentle = [8.8 + 0.08 * c + 0.05 * (c % 2) for c in range(58)]  # seen: off the fast path, ~1% per channel
    assert detect_multiple(gentle) == 1
    assert detect_multiple([5.0] * 64) == 1  # flat: no steps either
    assert grid_values(64, 16, 0.25) == [16, 32, 48, 64]
    assert grid_values(20, 16, 0.25) == [16, 20]
    assert grid_values(8, 16, 0.25) == [8]


def test_torch_cpu_backend_measures() -> None:
    backend = make_backend("torch", device="cpu", **FAST)
    t = backend.measure(nn.Conv2d(3, 8, 3), (3, 16, 16))
    assert 0 < t.median_ms <= t.p90_ms and t.runs > 0
    assert backend.fingerprint()["backend"] == "torch"


@pytest.mark.gpu
def test_torch_cuda_backend_measures() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine: the torch CUDA backend cannot be measured here")
    backend = make_backend("torch", device="cuda", cuda_graph=True, **FAST)
    t = backend.measure(nn.Conv2d(3, 8, 3), (3, 16, 16))
    assert t.median_ms > 0 and backend.fingerprint()["device"]["type"] == "cuda"


@pytest.mark.tensorrt
def test_tensorrt_backend_builds_and_measures() -> None:
    if importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available():
        pytest.skip("TensorRT is not installed here (it cannot be on the CPU build machines, see ENV.md)")
    backend = make_backend("tensorrt", device="cuda", precision="fp16", **FAST)
    assert backend.measure(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), (3, 16, 16)).median_ms > 0
