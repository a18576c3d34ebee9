"""End to end through real DVC on a tiny preset, in a temporary copy of the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _sh(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _copy_repo(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        generated = rel == "dvc.lock" or rel.split("/")[0] in ("metrics", "plots") or rel.endswith(".gitignore") and rel != ".gitignore"
        if (REPO / rel).is_file() and not generated:  # the copy starts from a clean state
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dst / rel)


def _tiny_params(path: Path, seed_b: int = 1) -> None:
    params = yaml.safe_load(path.read_text())
    params["prepare"]["image_size"] = 8
    params["train"].update(progress=False, batch_size=32)  # enough steps to learn in 1 epoch
    params["profile"].update(arch="student", staircase_channels=8, staircase_repeats=2, staircase_passes=1,
                             fit_samples=4, heldout_samples=4, max_points=3, progress=False,
                             warn_mape=1e-9)  # any error is "poor": the pipeline must still complete, flagged
    params["target"]["timing"] = {"passes": 2, "window_ms": 1.0, "span_s": 0.0}
    params["prune"].update(epochs=2, latency_budget=1.0, budget_unit="ms", band=[0.05, 1.0],
                           progress=False)  # far above the tiny student: mechanics, not the method
    params["engine"].update(timing_passes=4, timing_span_s=0.0, on_over_budget="warn")  # budget = the student's own latency
    params["compare"].update(timing_passes=4, timing_span_s=0.0)
    params["search"].update(epochs=1, batch_size=16, progress=False, budget_ratio=0.6)
    params["student"].update(epochs=1, optimizer={"warmup_epochs": 0})
    params["teachers"] = {
        "a": {"arch": "resnet_tiny", "seed": 0, "epochs": 1},
        "b": {"arch": "resnet_tiny", "seed": seed_b, "epochs": 1},
    }
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def test_dvc_repro_tiny_preset(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _copy_repo(repo)
    _tiny_params(repo / "params.yaml")
    _sh(["git", "init", "-q"], repo)
    assert "analytics = false" in (repo / ".dvc" / "config").read_text()

    out = _sh(["dvc", "repro"], repo)
    for stage in ("prepare", "train_teacher@a", "train_teacher@b", "ensemble", "search", "train_student",
                  "profile", "prune", "slim", "compare", "export", "engine", "handoff"):
        assert f"Running stage '{stage}'" in out
    ens = json.loads((repo / "metrics" / "ensemble.json").read_text())
    assert set(ens["members"]) == {"a", "b"} and ens["oracle_acc"] >= ens["ensemble_acc"]
    for name in ("prepare.json", "teachers/a.json", "teachers/b.json", "search.json", "student.json",
                 "profile.json", "prune.json", "slim.json", "compare.json", "export.json", "engine.json"):
        assert (repo / "metrics" / name).is_file()

    bundle = repo / "artifacts" / "handoff"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {"model.onnx", "model.opt.onnx", "README.md", "pareto.png", "widths.png"} <= set(manifest["files"])
    assert manifest["engine"]["backend"] == "onnxruntime" and manifest["git_revision"]
    models, n_test = manifest["accuracy"]["models"], manifest["accuracy"]["test_images"]
    assert {"student", "pruned (ours)", "uniform scaling", "Torch-Pruning L1"} <= {m["method"] for m in models}
    for m in models:  # the Pareto plot's error bars: an accuracy's standard error, the timing windows' spread
        assert m["accuracy_err"] == pytest.approx((m["accuracy"] * (1 - m["accuracy"]) / n_test) ** 0.5)
        assert m["latency_err"][0] == 0.0 and m["latency_err"][1] >= 0.0 and m["latency_ms"] > 0
    profile = json.loads((repo / "metrics" / "profile.json").read_text())
    assert profile["predictor"]["poor"] and "warn_mape" in profile["warnings"][0]
    assert manifest["latency_model"]["warnings"] == profile["warnings"]  # a poor predictor is flagged, not fatal
    report = _sh([sys.executable, "-m", "pipeline.report"], repo)  # what `make run` prints at the end
    assert "pruned to" in report and "Torch-Pruning L1" in report and "closed loop" in report
    assert "WARNING: latency predictor held-out MAPE" in report

    again = _sh(["dvc", "repro"], repo)
    assert "Running stage" not in again and "up to date" in again
    assert "up to date" in _sh(["dvc", "status"], repo)

    # Changing one teacher's seed re-runs that teacher and what consumes the whole ensemble
    # (ensemble, search, student, and the student's descendants: profile when the searched
    # architecture changed, prune, slim, compare), nothing else: not the other teacher or the data.
    _tiny_params(repo / "params.yaml", seed_b=5)
    status = _sh(["dvc", "status"], repo)
    assert "train_teacher@b" in status and "ensemble" in status
    assert "train_teacher@a" not in status and "prepare:" not in status
    rerun = _sh(["dvc", "repro"], repo)
    ran = sorted(line.split("'")[1] for line in rerun.splitlines() if line.startswith("Running stage"))
    assert {"ensemble", "search", "train_student", "train_teacher@b"} <= set(ran)
    assert not {"prepare", "train_teacher@a"} & set(ran)
    assert set(ran) <= {"ensemble", "search", "train_student", "train_teacher@b", "profile", "prune", "slim", "compare",
                        "export", "engine", "handoff"}
