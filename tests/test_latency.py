"""Latency: the timing protocol, backends, the step probe, the lookup table and its calibration."""

from __future__ import annotations

import importlib.util
import itertools
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from models import build_model
from pipeline.errors import ConfigError
from pipeline.latency import (
    Backend,
    BackendUnavailable,
    FingerprintMismatch,
    LatencyTable,
    TimingProtocol,
    build_table,
    calibrate,
    check_supported_layers,
    conv_layers,
    detect_step,
    fit_scale_offset,
    grid_values,
    make_backend,
    measure_step,
    sample_values,
)
from pipeline.latency.timing import measure_calls
from pipeline.slim import ChannelGraph

FAST = TimingProtocol(passes=2, window_s=0.0005, min_calls=2, warmup=1, min_span_s=0.0)


def _backend(name: str = "onnxruntime", **kw: object) -> Backend:
    return make_backend(name, batch_size=1, threads=1, protocol=FAST, **kw)


@pytest.fixture(scope="module")
def tiny() -> tuple[nn.Module, LatencyTable]:
    torch.manual_seed(0)
    model = build_model("cifar_resnet", num_classes=4, in_channels=1, blocks=[1, 1], stage_widths=[8, 16]).eval()
    table = build_table(model, (1, 8, 8), _backend(), {"arch": "cifar_resnet"}, step=4, min_fraction=0.25,
                        max_points=6, progress=False)
    return model, table


# --- timing -------------------------------------------------------------------------------------


def _scripted(values: list[float], log: list[str], name: str):  # noqa: ANN202
    it = iter(values)

    def call() -> float:
        log.append(name)
        return next(it)

    return call


def test_estimate_is_the_fastest_window_median_and_windows_interleave() -> None:
    order: list[str] = []
    # 3 passes of 3 calls: a slow spell in pass 0 (x1.25), a single slow call in pass 2
    a = _scripted([1.25, 1.26, 1.25, 1.0, 1.01, 1.0, 1.0, 3.0, 1.02], order, "a")
    b = _scripted([2.5, 2.5, 2.5, 2.0, 2.0, 2.02, 2.01, 2.0, 2.0], order, "b")
    proto = TimingProtocol(passes=3, window_s=0.0, min_calls=3, warmup=0, min_span_s=0.0)
    ta, tb = measure_calls([a, b], proto)
    assert order == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
    assert ta.ms == 1.0 and tb.ms == 2.0  # the slow spell and the outlier call do not move the estimate
    assert ta.window_ms == (1.25, 1.0, 1.02) and ta.calls == 9
    assert ta.spread == pytest.approx(0.02)
    assert ta.p99_ms == 3.0 and ta.p50_ms == 1.02  # the distribution a user would see is kept


def test_protocol_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="invalid timing protocol"):
        TimingProtocol(passes=0)


# --- backends -----------------------------------------------------------------------------------


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


@pytest.mark.parametrize("name", ["onnxruntime", "torch"])
def test_cpu_backends_measure_and_leave_the_model_alone(name: str) -> None:
    model = nn.Conv2d(3, 8, 3)
    before = model.weight.clone()
    t = _backend(name).measure(model, (3, 16, 16))
    assert 0 < t.ms <= t.p99_ms and t.calls >= 4 and len(t.window_ms) == 2
    assert torch.equal(model.weight, before) and model.weight.device.type == "cpu"


def test_torch_cpu_backend_restores_thread_count() -> None:
    prev = torch.get_num_threads()
    _backend("torch").measure_many([nn.Conv2d(3, 4, 1), nn.Conv2d(3, 8, 1)], (3, 8, 8))
    assert torch.get_num_threads() == prev


def test_kernels_are_chosen_by_heuristics_whatever_training_left_behind() -> None:
    """Training turns cuDNN's benchmark mode on for the process; a latency reading (and the torch
    engine) must not inherit it: inside, benchmark is off; after, as it was, also after an error."""
    from pipeline.cuda_graph import heuristic_kernels

    prev = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = True
        with heuristic_kernels():
            assert torch.backends.cudnn.benchmark is False
        assert torch.backends.cudnn.benchmark is True
        with pytest.raises(RuntimeError), heuristic_kernels():
            raise RuntimeError("a failed capture")
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = prev


@pytest.mark.gpu
@pytest.mark.parametrize("graph", [True, False])
def test_cuda_readings_choose_kernels_by_heuristics_after_training(graph: bool) -> None:
    """What training leaves behind (benchmark mode on) does not reach a reading's kernel choice."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine: the torch CUDA backend cannot be measured here")

    class Spy(nn.Conv2d):
        seen: list[bool] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            Spy.seen.append(torch.backends.cudnn.benchmark)
            return super().forward(x)

    prev = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = True
        backend = make_backend("torch", device="cuda", precision="fp16", cuda_graph=graph, protocol=FAST)
        backend.measure_many([Spy(3, 8, 3)], (3, 8, 8))
        # graph: 3 warm-ups and the capture (replays call no forward); eager: the first call, whose plan cuDNN caches
        assert Spy.seen and not any(Spy.seen[:4] if graph else Spy.seen[:1])
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = prev


@pytest.mark.gpu
def test_torch_cuda_graph_table_captures_real_work() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine: the torch CUDA backend cannot be measured here")
    model = build_model("cifar_resnet", num_classes=4, in_channels=3, blocks=[1, 1], stage_widths=[8, 16]).eval()
    backend = make_backend("torch", device="cuda", precision="fp16", cuda_graph=True, protocol=FAST)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = build_table(model, (3, 8, 8), backend, {"arch": "cifar_resnet"}, step=4, min_fraction=0.25,
                            max_points=3, progress=False)
    assert not [w for w in caught if "empty" in str(w.message)]  # the overhead unit was an empty graph once
    assert table.overhead_ms > 0 and table.full_ms > 0 and backend.fingerprint()["device"]["type"] == "cuda"
    assert next(model.parameters()).device.type == "cpu"  # the caller's model is not moved


@pytest.mark.tensorrt
def test_tensorrt_backend_builds_and_measures() -> None:
    if importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available():
        pytest.skip("TensorRT is not installed here (it cannot be on the CPU build machines, see ENV.md)")
    backend = make_backend("tensorrt", device="cuda", precision="fp16", protocol=FAST)
    assert backend.measure(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), (3, 16, 16)).ms > 0


# --- the step -----------------------------------------------------------------------------------


def test_staircase_detection() -> None:
    steps = [10.0 + 2.0 * (c // 16) + 0.01 * (c % 3) for c in range(64)]
    assert detect_step(steps) == 16
    noisy = list(steps)
    noisy[57] *= 1.3  # one slow measurement must not hide the staircase
    assert detect_step(noisy) == 16
    assert detect_step([float(c) for c in range(1, 65)]) == 1  # a ramp is not a staircase
    gentle = [8.8 + 0.08 * c + 0.05 * (c % 2) for c in range(58)]  # seen: off the fast path, ~1% per channel
    assert detect_step(gentle) == 1
    assert detect_step([5.0] * 64) == 1  # flat: no steps either
    assert detect_step([10.0 + 1.0 * (c // 8) for c in range(64)]) == 8


class FakeStairs(Backend):
    """A backend whose latency is a staircase of ``step`` in the output channels of the model's
    first convolution; ``spell(repeat, channels)`` multiplies chosen measurements (a slow spell)."""

    name = "fake"

    def __init__(self, step: int, spell=lambda r, c: 1.0) -> None:  # noqa: ANN001
        super().__init__(batch_size=1, precision="fp32", threads=1, protocol=FAST)
        self.step, self.spell, self.calls = step, spell, itertools.count()
        self.repeat = 0

    def device(self) -> dict:
        return {"type": "cpu", "name": "fake"}

    def versions(self) -> dict:
        return {}

    def prepare(self, model: nn.Module, input_shape: tuple[int, ...]):  # noqa: ANN201
        c = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).out_channels
        base = 10.0 + 3.0 * ((c + self.step - 1) // self.step)
        return lambda: base * self.spell(self.repeat, c)

    def measure_many(self, models, input_shapes, protocol=None, on_pass=None):  # noqa: ANN001, ANN201
        out = super().measure_many(models, input_shapes, protocol, on_pass)
        self.repeat += 1
        return out


def _specs() -> list:
    model = build_model("cifar_resnet", num_classes=4, in_channels=1, blocks=[1], stage_widths=[16]).eval()
    example = torch.zeros(1, 1, 8, 8)
    return conv_layers(model, example, ChannelGraph(model, example).groups)


def test_step_is_repeatable_through_a_slow_spell() -> None:
    clean = measure_step(FakeStairs(16), _specs(), 64, 3, FAST)
    assert (clean.step, clean.source, clean.repeat_steps) == (16, "detected", (16, 16, 16)) and clean.agree
    # repeat 1 runs 25% slow over channels 20..40 (seen: slow spells of up to a second): the median curve
    # still shows the steps, and that repeat alone does not support 16, so the step is not trusted blindly
    spell = measure_step(FakeStairs(16, lambda r, c: 1.25 if r == 1 and 20 <= c <= 40 else 1.0), _specs(), 64, 3, FAST)
    assert spell.detected == 16 and spell.curve_ms == clean.curve_ms
    # the slow repeat reads no staircase (step 1): the step all three support is 1, and it says why
    assert spell.repeat_steps == (16, 1, 16) and not spell.agree
    assert (spell.step, spell.source) == (1, "repeats disagreed")


def test_repeats_that_disagree_fall_back_to_a_step_all_support() -> None:
    # repeat 2 sees a staircase of 8 (e.g. another kernel chosen); the others 16: their common divisor
    class Mixed(FakeStairs):
        def prepare(self, model, input_shape):  # noqa: ANN001, ANN201
            step = 8 if self.repeat == 2 else 16
            c = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).out_channels
            return lambda: 10.0 + 3.0 * ((c + step - 1) // step)

    det = measure_step(Mixed(16), _specs(), 64, 3, FAST)
    assert det.repeat_steps == (16, 16, 8) and det.step == 8 and det.source == "repeats disagreed" and not det.agree


def test_stated_step_wins_and_detection_is_still_recorded() -> None:
    det = measure_step(FakeStairs(16), _specs(), 64, 2, FAST, stated=4)
    assert det.step == 4 and det.source == "target" and det.detected == 16


# --- table and predictor ------------------------------------------------------------------------


def test_lattice_sampling() -> None:
    assert grid_values(64, 16, 0.25) == [16, 32, 48, 64]
    assert grid_values(20, 16, 0.25) == [16, 20]
    assert grid_values(8, 16, 0.25) == [8]
    vals = list(range(10, 101))
    s = sample_values(vals, 6)
    assert len(s) == 6 and s[0] == 10 and s[-1] == 100 and s == sorted(s)
    assert sample_values([16, 32], 6) == [16, 32]


def test_interpolation_is_exact_at_grid_points(tiny) -> None:  # noqa: ANN001
    _, table = tiny
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
    # uncalibrated, the offset closes the gap to the measured full network
    assert pred({}).item() == pytest.approx(table.full_ms, rel=1e-9)


def test_units_are_conv_bn_activation_as_executed(tiny) -> None:  # noqa: ANN001
    _, table = tiny
    acts = {layer["name"]: (layer["bn"], layer["act"]) for layer in table.layers}
    assert acts["stages.0.0.conv1"] == (True, "ReLU")
    assert acts["stages.0.0.conv2"] == (True, None)  # its BN output meets the shortcut before the ReLU
    assert acts["stages.1.0.shortcut.0"] == (True, None)


def test_prediction_is_bilinear_between_grid_points_and_calibrated() -> None:
    table = LatencyTable(
        fingerprint={}, model={"input_shape": [1, 4, 4]}, groups={"a": 8, "b": 8},
        layers=[{"key": "k", "in_group": "a", "out_group": "b", "in_max": 8, "out_max": 8, "depthwise": False}],
        tables={"k": {"in": [4, 8], "out": [4, 8], "ms": [[1.0, 2.0], [3.0, 5.0]]}},
        overhead_ms=0.0, full_ms=5.5, calibration={"scale": 2.0, "offset_ms": 0.5},
    )
    pred = table.predictor()
    assert pred({"a": 6.0, "b": 6.0}).item() == pytest.approx(0.5 + 2.0 * (1 + 2 + 3 + 5) / 4)
    assert pred({"a": 2.0, "b": 100.0}).item() == pytest.approx(0.5 + 2.0 * 2.0)  # clamped to the grid
    assert pred.raw({"a": 8.0, "b": 8.0}).item() == 5.0
    with pytest.raises(ConfigError, match="unknown channel group"):
        pred({"zzz": 1.0})


def test_gradient_wrt_widths_is_finite_and_nonzero(tiny) -> None:  # noqa: ANN001
    _, table = tiny
    pred = table.predictor()
    widths = {g: torch.tensor(0.7 * n, dtype=torch.float64, requires_grad=True) for g, n in table.groups.items()}
    pred(widths).backward()
    grads = torch.stack([w.grad for w in widths.values()])
    assert torch.isfinite(grads).all()
    assert (grads != 0).any()


def test_table_round_trip_and_fingerprint_refusal(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    _, table = tiny
    table.save(tmp_path / "t.json")
    same = LatencyTable.load(tmp_path / "t.json", fingerprint=table.fingerprint)
    assert same.predictor()({}).item() == pytest.approx(table.predictor()({}).item())
    other = {**table.fingerprint, "batch_size": 8, "threads": 4}
    with pytest.raises(FingerprintMismatch, match=r"batch_size: recorded 1, here 8[\s\S]*threads"):
        LatencyTable.load(tmp_path / "t.json", fingerprint=other)
    (tmp_path / "old.json").write_text('{"fingerprint": {}, "remainder_ms": 1.0}')
    with pytest.raises(ConfigError, match="not a latency table written by the profile stage"):
        LatencyTable.load(tmp_path / "old.json")


def test_unsupported_layer_is_named() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.LSTM(4, 4))
    with pytest.raises(ConfigError, match=r"layer 1 \(LSTM\) is not supported"):
        check_supported_layers(model)
    grouped = nn.Sequential(nn.Conv2d(8, 8, 3, groups=2))
    with pytest.raises(ConfigError, match="grouped convolution"):
        check_supported_layers(grouped)


# --- calibration --------------------------------------------------------------------------------


def test_fit_recovers_scale_and_offset_and_refuses_a_reversed_scale() -> None:
    raw = [0.1, 0.15, 0.2, 0.3]
    scale, offset = fit_scale_offset(raw, [1.2 * r + 0.01 for r in raw])
    assert scale == pytest.approx(1.2) and offset == pytest.approx(0.01)
    assert fit_scale_offset(raw, [0.5 - r for r in raw])[0] == 1.0  # decreasing: fall back, never negative
    assert fit_scale_offset([0.1, 0.1, 0.1], [0.2, 0.2, 0.2]) == pytest.approx((1.0, 0.1))


def test_calibration_is_fitted_and_checked_on_disjoint_subnetworks(tiny) -> None:  # noqa: ANN001
    model, table = tiny
    import copy

    table = copy.deepcopy(table)
    result = calibrate(model, table, _backend(), fit_samples=4, heldout_samples=4, seed=0, progress=False)
    cal = table.calibration
    fitted = {tuple(sorted(s["widths"].items())) for s in cal["fit_set"]}
    held = {tuple(sorted(s["widths"].items())) for s in cal["heldout_set"]}
    assert len(fitted) == 4 and len(held) == 4 and not fitted & held
    assert result.heldout_metrics["samples"] == 4
    # fitted: on the fit set and the full network, no nearby (scale, offset) has a smaller relative
    # squared error, and the held-out set took no part in it
    pred = table.predictor()
    points = [(f["raw_ms"], f["measured_ms"]) for f in cal["fit_set"]]
    points.append((pred.raw({}).item(), cal["full"]["measured_ms"]))

    def rel_sse(scale: float, offset: float) -> float:
        return sum(((scale * r + offset) - m) ** 2 / m**2 for r, m in points)

    if cal["scale"] == 1.0:  # the documented fallback (a reversed or degenerate fit): the mean gap
        assert cal["offset_ms"] == pytest.approx(sum(m - r for r, m in points) / len(points))
    else:
        best = rel_sse(cal["scale"], cal["offset_ms"])
        for ds, do in ((1.02, 0.0), (0.98, 0.0), (1.0, 0.002), (1.0, -0.002)):
            assert best <= rel_sse(cal["scale"] * ds, cal["offset_ms"] + do) + 1e-12
    for s in cal["heldout_set"]:  # what is recorded is what the predictor says
        assert pred(s["widths"]).item() == pytest.approx(s["predicted_ms"])


class _Readings(Backend):
    """A backend whose every call of the ``k``-th prepared model takes ``ms[k]``, except during the
    readings listed in ``off`` (reading index -> factor on the first model): a slow spell in one
    reading. Counts the models it prepares."""

    name = "fake"

    def __init__(self, ms: list[float], off: dict[int, float]) -> None:
        super().__init__(batch_size=1, precision="fp32", threads=1, protocol=FAST)
        self.ms, self.off, self.prepared, self.reading = ms, off, 0, 0

    def device(self) -> dict:
        return {"type": "cpu", "name": "fake"}

    def versions(self) -> dict:
        return {}

    def prepare(self, model: nn.Module, input_shape: tuple[int, ...]):  # noqa: ANN201
        k = self.prepared
        self.prepared += 1
        return lambda: self.ms[k] * (self.off.get(self.reading, 1.0) if k == 0 else 1.0)


def test_readings_prepare_once_and_the_median_ignores_one_slow_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.latency.backends as lb
    from pipeline.latency import median_paired

    backend = _Readings([2.0, 4.0], off={1: 3.0})
    measure_calls = lb.measure_calls

    def counting(calls, protocol, on_pass=None):  # noqa: ANN001, ANN202
        out = measure_calls(calls, protocol, on_pass)
        backend.reading += 1
        return out

    monkeypatch.setattr(lb, "measure_calls", counting)
    reads = backend.measure_readings([nn.Conv2d(1, 2, 1), nn.Conv2d(1, 2, 1)], (1, 4, 4), readings=3)
    assert backend.prepared == 2 and [len(r) for r in reads] == [2, 2, 2]
    assert [round(r[0].ms / r[1].ms, 6) for r in reads] == [0.5, 1.5, 0.5]  # the second reading is off
    assert median_paired(10.0, reads, 0, 1) == pytest.approx(5.0)  # 10 ms x 0.5: the slow reading left out
    with pytest.raises(ValueError, match="readings must be >= 1"):
        backend.measure_readings([nn.Conv2d(1, 2, 1)], (1, 4, 4), readings=0)
