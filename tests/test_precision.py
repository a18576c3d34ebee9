"""target.precision auto: the rule, the stage, and every later stage reading the choice."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest

from pipeline.errors import ConfigError
from pipeline.io import file_sha256
from pipeline.precision import Evidence, decide


def _ev(fp32: float, int8: float, ratios: tuple[float, ...], bound: float = 0.01) -> Evidence:
    return Evidence(fp32, int8, ratios, bound)


def test_int8_is_kept_only_within_the_bound_and_faster() -> None:
    assert decide(_ev(0.90, 0.895, (0.4, 0.5, 0.45)))[0] == "int8"
    assert decide(_ev(0.90, 0.90, (0.4, 0.5, 0.45), bound=0.0))[0] == "int8"  # no loss at a bound of 0
    precision, why = decide(_ev(0.90, 0.88, (0.4, 0.5, 0.45)))
    assert precision == "fp32" and "-2.00 points" in why and "engine.max_accuracy_drop" in why
    assert "+0.50 points" in decide(_ev(0.90, 0.905, (0.5,)))[1]  # int8 may score higher
    precision, why = decide(_ev(0.90, 0.90, (1.3, 0.9, 1.1)))  # the median reading decides, not the best
    assert precision == "fp32" and "1.100 of fp32" in why
    precision, why = decide(_ev(0.90, 0.80, (1.3, 1.2, 1.1)))
    assert precision == "fp32" and "more than the 1.00 below" in why and "not faster" in why


def _run(tmp: Path, params: Path, data: Path, student: Path) -> tuple[int, dict, dict]:
    from stages import precision

    out, metrics = tmp / "pc" / "precision.json", tmp / "m" / "precision.json"
    code = precision.main(["--params", str(params), "--data", str(data), "--student", str(student),
                           "--out", str(out), "--metrics", str(metrics)])
    return code, *(json.loads(f.read_text()) if f.is_file() else {} for f in (out, metrics))


def test_a_fixed_precision_is_written_through_without_the_model(tmp_path: Path, digits_dir: Path) -> None:
    from tests.test_stages import write_params

    params = write_params(tmp_path)
    code, out, m = _run(tmp_path, params, digits_dir, tmp_path / "no_such_model.pt")
    assert code == 0 and out == {"requested": "fp32", "precision": "fp32"} and m["why"] == "target.precision"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from tests.test_bad_inputs import _params
    from tests.test_stages import run_prepare, run_teacher

    w = tmp_path_factory.mktemp("precision")
    params = _params(w, target={"precision": "auto"}, engine={"precision": "auto", "calibration_images": 64})
    assert run_prepare(w, params) == 0 and run_teacher(w, params, "a") == 0
    return {"dir": w, "params": params, "data": w / "prep", "student": w / "t" / "a.pt"}


def test_auto_chooses_by_the_measured_evidence(trained: dict, tmp_path: Path) -> None:
    # the real measurement: whichever it chooses, the choice is the rule's on the evidence it recorded
    code, out, m = _run(tmp_path, trained["params"], trained["data"], trained["student"])
    assert code == 0 and out["requested"] == "auto" and out["precision"] in ("fp32", "int8")
    ev = _ev(m["fp32_val_acc"], m["int8_val_acc"], (m["int8_over_fp32"],), m["max_accuracy_drop"])
    assert decide(ev)[0] == out["precision"] == m["precision"]
    assert m["readings"] == 5 and m["int8_over_fp32_range"][0] <= m["int8_over_fp32"] <= m["int8_over_fp32_range"][1]
    assert 0.0 < m["int8_val_acc"] <= 1.0


@pytest.mark.parametrize(("ratios", "expected"), [((0.5, 0.6, 0.4), "int8"), ((1.2, 1.1, 1.3), "fp32")])
def test_auto_follows_the_target_s_ratio(trained: dict, tmp_path: Path, ratios: tuple, expected: str) -> None:
    # the same trained network on a target where int8 is faster, and on one where it is slower (a CPU without VNNI)
    with mock.patch("pipeline.precision.measure_ratios", return_value=ratios):
        code, out, m = _run(tmp_path, trained["params"], trained["data"], trained["student"])
    assert code == 0 and m["int8_drop"] <= m["max_accuracy_drop"]  # the tiny teacher loses nothing in int8
    assert out["precision"] == expected


def test_deployed_target_resolves_auto_and_refuses_a_foreign_choice(tmp_path: Path) -> None:
    # what profile, prune, slim, compare, engine and handoff call (the DVC test runs them on a real choice)
    from stages._common import deployed_target

    params = {"target": {"precision": "auto"}, "engine": {"precision": "auto"}}
    choice = tmp_path / "precision.json"
    measured = {"backend": "onnxruntime", "device": "cpu", "batch_size": 1, "threads": 1, "int8_activations": "uint8"}
    choice.write_text(json.dumps({"requested": "auto", "precision": "int8", "target": measured, "model_sha256": "0"}))
    assert deployed_target(params, choice).precision == "int8"
    with pytest.raises(ConfigError, match="pass --precision"):
        deployed_target(params, None)
    assert deployed_target({"target": {"precision": "fp32"}}, None).precision == "fp32"  # benchmarks call stages so
    with pytest.raises(ConfigError, match="run the precision stage again"):
        deployed_target({"target": {"precision": "fp32"}}, choice)
    choice.write_text(json.dumps({"requested": "auto", "precision": "fp16", "target": measured,
                                  "model_sha256": "0"}))  # edited by hand
    with pytest.raises(ConfigError, match="chose precision 'fp16'.*allowed: fp32, int8"):
        deployed_target(params, choice)
    # an auto choice measured under other target settings, or on another model, is refused
    model, other = tmp_path / "model.pt", tmp_path / "other.pt"
    model.write_bytes(b"the model")
    other.write_bytes(b"another model")
    for lacks in ("target", "model_sha256"):  # an auto choice that does not say what it was measured on
        bare = {"requested": "auto", "precision": "int8", "target": measured, "model_sha256": file_sha256(model)}
        bare.pop(lacks)
        choice.write_text(json.dumps(bare))
        with pytest.raises(ConfigError, match=f"auto choice without {lacks}.*precision stage again"):
            deployed_target(params, choice, model)
    choice.write_text(json.dumps({"requested": "auto", "precision": "int8", "target": measured,
                                  "model_sha256": file_sha256(model)}))
    assert deployed_target(params, choice, model).precision == "int8"
    with pytest.raises(ConfigError, match=r"target.threads 1 \(the params say 4\).*precision stage again"):
        deployed_target({**params, "target": {"precision": "auto", "threads": 4}}, choice, model)
    with pytest.raises(ConfigError, match="chosen on another model than .*other.pt"):
        deployed_target(params, choice, other)
