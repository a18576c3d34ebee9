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


def test_an_int8_target_measures_every_network_as_its_qdq_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.quantize as pq
    from pipeline.latency import BackendUnavailable, TimingProtocol, make_backend

    calls: list[str] = []
    real = pq.quantize_int8

    def counting(src, dst, images, activation="uint8", batch_size=32):  # noqa: ANN001, ANN202
        calls.append(activation)
        return real(src, dst, images, activation, batch_size)

    monkeypatch.setattr(pq, "quantize_int8", counting)
    fast = TimingProtocol(passes=2, window_s=0.0005, min_calls=2, warmup=1, min_span_s=0.0)
    be = make_backend("onnxruntime", precision="int8", int8_activations="int8", protocol=fast)
    t = be.measure_many([build_model("resnet_tiny", num_classes=10, in_channels=1).eval()] * 2, (1, 8, 8))
    assert calls == ["int8", "int8"] and all(x.ms > 0 for x in t)
    fp = be.fingerprint()
    assert fp["precision"] == "int8" and fp["int8_activations"] == "int8"
    assert "int8_activations" not in make_backend("onnxruntime", protocol=fast).fingerprint()
    for name in ("torch",):
        with pytest.raises(BackendUnavailable, match="precision int8 is measured with backend onnxruntime"):
            make_backend(name, precision="int8")


def test_int8_target_cross_checks() -> None:
    from pipeline.config import validate_params

    def problems(target: dict, engine: dict) -> str:
        with pytest.raises(ConfigError) as err:
            validate_params({"target": {"precision": "int8", **target}, "engine": engine})
        return str(err.value)

    assert "set engine.precision: int8" in problems({}, {"precision": "fp16"})
    assert "backend onnxruntime on device cpu (got torch on cpu)" in problems({"backend": "torch"},
                                                                              {"precision": "int8"})
    assert "set them alike" in problems({"int8_activations": "uint8"}, {"precision": "int8", "int8_activations": "int8"})
    validate_params({"target": {"precision": "int8"}, "engine": {"precision": "int8"}})  # consistent: accepted
    validate_params({"target": {"precision": "int8"}, "engine": {"precision": "auto"}})  # auto: int8 alone


def test_bf16_is_refused_by_engines_without_it() -> None:
    from pipeline.config import validate_params

    for backend in ("tensorrt", "onnxruntime"):
        with pytest.raises(ConfigError, match=f"bf16 runs on the torch engine on CUDA only, not engine.backend {backend}"):
            validate_params({"engine": {"precision": "bf16", "backend": backend}})
    validate_params({"engine": {"precision": "bf16", "backend": "torch"}})
    validate_params({"engine": {"precision": "bf16", "backend": "auto"}})


def test_int8_target_profiles_prunes_and_deploys_int8(world: dict, tmp_path: Path) -> None:  # noqa: F811
    """The tiny pipeline with target.precision int8: the table, the closed loop and the engine all int8."""
    import json
    import shutil
    from unittest import mock

    from stages import compare, engine, profile, prune
    from tests.test_bad_inputs import _params

    w = world["dir"]
    params = _params(tmp_path, target={"precision": "int8"}, compare={"methods": []},
                     prune={"epochs": 1, "progress": False, "band": [0.05, 1.0], "latency_budget": 1.0,
                            "budget_unit": "ms"},
                     engine={"precision": "int8", "calibration_images": 32, "max_accuracy_drop": 1.0,
                             "timing_passes": 2, "timing_span_s": 0.0})
    shutil.copytree(w / "t", tmp_path / "t")
    p = ["--params", str(params), "--data", str(w / "prep")]
    assert profile.main([*p, "--arch", str(tmp_path / "none.json"), "--out", str(tmp_path / "prof" / "table.json"),
                         "--metrics", str(tmp_path / "m" / "profile.json"), "--plots-dir", str(tmp_path / "p")]) == 0
    table = json.loads((tmp_path / "prof" / "table.json").read_text())
    assert table["fingerprint"]["precision"] == "int8" and table["fingerprint"]["int8_activations"] == "uint8"
    assert prune.main([*p, "--teachers", str(tmp_path / "t"), "--student", str(tmp_path / "t" / "a.pt"), "--table",
                       str(tmp_path / "prof" / "table.json"), "--out-dir", str(tmp_path / "pr"), "--metrics",
                       str(tmp_path / "m" / "prune.json"), "--plots-dir", str(tmp_path / "p" / "prune"),
                       "--resume-dir", str(tmp_path / "resume")]) == 0
    # the world's int8 engine from the world's fp32 ONNX model, judged against this run's int8 budget
    assert engine.main([*p, "--onnx", str(w / "x" / "model.onnx"), "--pruned", str(tmp_path / "pr" / "masks.json"),
                        "--out-dir", str(tmp_path / "e"), "--metrics", str(tmp_path / "em.json")]) == 0
    m = json.loads((tmp_path / "em.json").read_text())
    assert m["precision"] == "int8" and m["quantization"]["activations"] == "uint8"
    assert m["quantization"]["chosen_by"].startswith("target.int8_activations")
    # compare reads every network's accuracy as deployed: its Q/DQ model (the student's: INT8 alone)
    assert compare.main([*p, "--teachers", str(tmp_path / "t"), "--student", str(tmp_path / "t" / "a.pt"), "--table",
                         str(tmp_path / "prof" / "table.json"), "--pruned", str(tmp_path / "pr" / "masks.json"),
                         "--model", str(tmp_path / "pr" / "model.pt"), "--metrics", str(tmp_path / "cm.json")]) == 0
    c = json.loads((tmp_path / "cm.json").read_text())
    assert c["int8"]["activations"] == "uint8" and c["int8"]["calibration_images"] == 32
    for name in ("student", "ours"):
        assert 0.0 <= c[name]["test_acc_int8"] <= 1.0 and "test_acc" in c[name]
    # a fraction of the fp32 student: read here as 10x the int8 one, so INT8 alone meets half of it and
    # the loop keeps every channel (a stand-in for a fast int8 kernel: tiny networks gain nothing from int8)
    import pipeline.prune.measure as pm

    def ten_times(backend, student, student_ms, shape, readings):  # noqa: ANN001, ANN202
        assert backend.precision == "int8" and readings == 5  # prune.reference_readings over loop_readings' 3
        return 10 * student_ms

    def ten_times_call(self):  # noqa: ANN001, ANN202  the loop's reference: the int8 student's call, read 10x
        int8_call = self.backend.prepare(self.student, self.shape)
        return lambda: 10 * int8_call()

    (tmp_path / "frac").mkdir()
    params2 = _params(tmp_path / "frac", target={"precision": "int8"}, compare={"methods": []},
                      prune={"epochs": 1, "progress": False, "latency_budget": 0.5}, engine={"precision": "int8"})
    with (mock.patch.object(pm, "measure_fp32_student", ten_times),
          mock.patch.object(pm.BudgetReading, "fp32_call", property(ten_times_call))):
        assert prune.main(["--params", str(params2), "--data", str(w / "prep"), "--teachers", str(tmp_path / "t"),
                           "--student", str(tmp_path / "t" / "a.pt"), "--table", str(tmp_path / "prof" / "table.json"),
                           "--out-dir", str(tmp_path / "pr3"), "--metrics", str(tmp_path / "m" / "prune3.json"),
                           "--plots-dir", str(tmp_path / "p3"), "--resume-dir", str(tmp_path / "resume3")]) == 0
    m3 = json.loads((tmp_path / "m" / "prune3.json").read_text())
    assert m3["budget_reference"] == "fp32 student" and m3["student_fp32_ms"] == pytest.approx(10 * m3["student_ms"])
    assert m3["budget_ms"] == pytest.approx(5 * m3["student_ms"]) and m3["loop_status"] == "full"
    assert m3["loop_iterations"] == 1 and m3["removed_blocks"] == []
    assert m3["measured_paired_with"] == "the student in fp32" and m3["measured_readings"] == 5
    masks3 = json.loads((tmp_path / "pr3" / "masks.json").read_text())
    assert masks3["budget"]["readings"] == 5  # what compare and the engine read it with, at least
    # an fp32 table is refused by an int8 target (measured under another fingerprint)
    code = prune.main([*p, "--teachers", str(tmp_path / "t"), "--student", str(tmp_path / "t" / "a.pt"), "--table",
                       str(w / "prof" / "table.json"), "--out-dir", str(tmp_path / "pr2"), "--metrics",
                       str(tmp_path / "m" / "prune2.json"), "--plots-dir", str(tmp_path / "p2"),
                       "--resume-dir", str(tmp_path / "resume2")])
    assert code == 2


@pytest.mark.parametrize("bound", [1.0, 0.0])
def test_precision_auto_keeps_the_fastest_candidate_within_the_accuracy_bound(world: dict, tmp_path: Path,  # noqa: F811
                                                                             bound: float) -> None:
    """engine.precision auto on ONNX Runtime's CPU provider: fp32 and int8 built, read on the
    validation split, timed together; with every candidate within the bound the faster is kept,
    and with an int8 model that lost its accuracy (logits rolled by one class) and a bound of 0,
    fp32. Only the kept engine's file is left."""
    import json
    from unittest import mock

    import stages.engine as se

    real = se.ort_logits

    def rolled(sess, x):  # noqa: ANN001, ANN202
        out = real(sess, x)
        return out.roll(1, dims=1) if bound == 0.0 and "int8" in str(getattr(sess, "_model_path", "")) else out

    with mock.patch.object(se, "ort_logits", rolled):
        code, _ = _engine_int8(world, tmp_path, precision="auto", calibration_images=64, max_accuracy_drop=bound)
    m = json.loads((tmp_path / "em.json").read_text())
    c = m["precision_choice"]
    assert set(c["candidates"]) == {"fp32", "int8"}
    assert all(0.0 <= r["val_acc"] <= 1.0 for r in c["candidates"].values())
    if bound == 1.0:  # both pass the checks: both timed together, the faster kept
        assert all(r["eligible"] and "ms" in r for r in c["candidates"].values())
        assert code == 0 and c["chosen"] == min(c["candidates"], key=lambda p: c["candidates"][p]["ms"])
    else:  # the int8 model lost accuracy on the validation split: not eligible, fp32 kept
        assert c["candidates"]["int8"]["val_acc"] < c["fp32_onnx_val_acc"] and not c["candidates"]["int8"]["eligible"]
        assert code == 0 and c["chosen"] == "fp32"
    assert m["precision"] == c["chosen"]
    engine_file = "model.int8.onnx" if c["chosen"] == "int8" else "model.opt.onnx"
    assert m["engine_file"] == engine_file
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == sorted(["engine.json", engine_file])


def test_precision_candidates_follow_the_backend_and_the_target() -> None:
    from pipeline.config import EngineConfig, TargetConfig
    from stages.engine import precision_candidates

    e = EngineConfig(precision="auto")
    cpu = TargetConfig(backend="onnxruntime", device="cpu")
    assert precision_candidates("onnxruntime", cpu, e) == ("fp32", "int8")
    assert precision_candidates("torch", cpu, e) == ("fp32",)
    native_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    half = ("fp32", "fp16", "bf16") if native_bf16 else ("fp32", "fp16")
    assert precision_candidates("torch", TargetConfig(backend="torch", device="cuda", precision="fp16"), e) == half
    gpu = TargetConfig(backend="torch", device="cuda")
    assert precision_candidates("tensorrt", gpu, e) == ("fp32", "fp16", "int8")
    assert precision_candidates("tensorrt", gpu, EngineConfig(precision="auto", int8_activations="uint8")) == (
        "fp32", "fp16")  # TensorRT's Q/DQ activations are symmetric int8
    assert precision_candidates("onnxruntime", TargetConfig(backend="onnxruntime", device="cpu", precision="int8"),
                                e) == ("int8",)


def test_bf16_is_refused_on_a_gpu_that_only_emulates_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # a Turing GPU (7.5): torch reports bf16 "supported" by emulation; auto does not try it and an explicit
    # bf16 engine is a DeployError naming the GPU, before anything is built
    from argparse import Namespace

    import stages.engine as se
    from pipeline.config import EngineConfig, TargetConfig
    from pipeline.deploy import DeployError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    gpu = TargetConfig(backend="torch", device="cuda")
    assert se.precision_candidates("torch", gpu, EngineConfig(precision="auto")) == ("fp32", "fp16")
    with pytest.raises(DeployError, match=r"engine.precision bf16 .*Tesla T4 \(compute capability 7.5\)"):
        se._torch(Namespace(model="unused.pt"), EngineConfig(backend="torch", precision="bf16"), gpu,
                  None, None, None, None, None)


class _Outlier(torch.nn.Module):
    """A head whose every output channel has one weight 1e4 times its others, on an input channel
    that is always zero: quantized per output channel, the others round to zero and the head
    answers nothing, unless it stays in float (its input and output ranges are ordinary)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(2, 4, 1)
        self.head = torch.nn.Conv2d(4, 3, 1)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.a.weight.copy_(torch.randn(4, 2, 1, 1, generator=g))
            self.a.weight[0].zero_()
            self.a.bias.copy_(torch.tensor([-1.0, 0.0, 0.0, 0.0]))  # channel 0: relu(-1) = 0 always
            self.head.weight.copy_(torch.randn(3, 4, 1, 1, generator=g))
            self.head.weight[:, 0] = 1e4
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.a(x))).mean((2, 3))


def test_the_most_sensitive_layer_stays_in_float_when_int8_loses_accuracy(tmp_path: Path) -> None:
    from pipeline.quantize import int8_within_bound, quantizable_nodes

    model = _Outlier().eval()
    x = torch.randn(256, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    y = model(x).argmax(1)  # the fp32 model is right on every image
    export_onnx(model, (2, 4, 4), tmp_path / "m.onnx", check=False)
    nodes = quantizable_nodes(tmp_path / "m.onnx")
    assert len(nodes) == 2
    rec = quantize_int8(tmp_path / "m.onnx", tmp_path / "all.onnx", x[:64], "int8")
    all_int8 = ort_logits(ort_session(tmp_path / "all.onnx", "cpu", 1), x).argmax(1)
    assert rec["float_nodes"] == [] and (all_int8 == y).double().mean() < 0.9  # int8 everywhere loses
    rec = int8_within_bound(tmp_path / "m.onnx", tmp_path / "mixed.onnx", x[:64], "int8", (x, y), max_drop=0.01)
    fb = rec["float_fallback"]
    head = next(n for n in nodes if "head" in n)
    assert rec["float_nodes"] == [head] and fb["sensitivity"][0]["node"] == head  # the head's input is the outlier
    assert fb["val_acc_fp32"] == 1.0 and fb["val_acc"] >= 0.99 and fb["val_acc_all_int8"] < 0.9
    mixed = ort_logits(ort_session(tmp_path / "mixed.onnx", "cpu", 1), x).argmax(1)
    assert (mixed == y).double().mean() >= 0.99 and qdq_nodes(tmp_path / "mixed.onnx") > 0  # the rest stays int8
    # within the bound at once: nothing is measured, nothing left in float
    rec = int8_within_bound(tmp_path / "m.onnx", tmp_path / "loose.onnx", x[:64], "int8", (x, y), max_drop=1.0)
    assert rec["float_nodes"] == [] and rec["float_fallback"]["sensitivity"] is None
