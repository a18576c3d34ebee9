"""`kill -9` in the middle of a training stage, then the same command again: the stage resumes and
ends with what an uninterrupted run gives, byte for byte where it should be (checkpoints are
written deterministically, so DVC sees identical content as unchanged)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.io import file_sha256
from tests.conftest import REPO
from tests.test_stages import run_prepare, run_profile, run_teacher, write_params


def _spawn(module: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", f"stages.{module}", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _run(module: str, *args: str) -> str:
    proc = _spawn(module, *args)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return err


def _kill_when(proc: subprocess.Popen, path: Path, timeout: float = 300) -> None:
    """SIGKILL ``proc`` as soon as ``path`` exists (the resume state of a finished epoch)."""
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the stage ended (exit {proc.returncode}) before it could be interrupted: {proc.stderr.read()}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"{path} never appeared")
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_teacher_killed_and_rerun_writes_the_identical_checkpoint(tmp_path: Path, digits_dir: Path) -> None:
    params = write_params(tmp_path, train={"num_threads": 1},
                          teachers={"a": {"arch": "resnet_tiny", "seed": 0, "epochs": 6}})

    def args(out: str) -> list[str]:
        return ["--params", str(params), "--name", "a", "--data", str(digits_dir), "--out", str(tmp_path / out / "a.pt"),
                "--metrics", str(tmp_path / out / "m.json"), "--plots", str(tmp_path / out / "h.csv"),
                "--resume-dir", str(tmp_path / out / "resume")]

    _run("train_teacher", *args("whole"))
    proc = _spawn("train_teacher", *args("cut"))
    _kill_when(proc, tmp_path / "cut" / "resume" / "train_teacher" / "a.pt")
    assert not (tmp_path / "cut" / "a.pt").exists()  # nothing that looks finished
    _run("train_teacher", *args("cut"))
    assert file_sha256(tmp_path / "cut" / "a.pt") == file_sha256(tmp_path / "whole" / "a.pt")
    whole, cut = (json.loads((tmp_path / d / "m.json").read_text()) for d in ("whole", "cut"))
    assert cut["test_acc"] == whole["test_acc"] and cut["best_epoch"] == whole["best_epoch"]
    assert not (tmp_path / "cut" / "resume" / "train_teacher" / "a.pt").exists()  # cleaned after success


def _prune_world(tmp_path: Path, **prune: object) -> Callable[[str], list[str]]:
    params = write_params(tmp_path, train={"num_threads": 1},
                          prune={"method": "scp", "epochs": 6, "settle_fraction": 0.5, "progress": False,
                                 "band": [0.05, 1.0], **prune})
    assert run_prepare(tmp_path, params) == 0
    assert run_teacher(tmp_path, params, "a") == 0 and run_teacher(tmp_path, params, "b") == 0
    assert run_profile(tmp_path, params, tmp_path / "prep") == 0

    def args(out: str) -> list[str]:
        return ["--params", str(params), "--data", str(tmp_path / "prep"), "--teachers", str(tmp_path / "t"),
                "--student", str(tmp_path / "t" / "a.pt"), "--table", str(tmp_path / "prof" / "table.json"),
                "--out-dir", str(tmp_path / out / "pr"), "--metrics", str(tmp_path / out / "m.json"),
                "--plots-dir", str(tmp_path / out / "p"), "--resume-dir", str(tmp_path / out / "resume")]

    return args


@pytest.mark.parametrize(("method", "phase"), [("scp", "prune"), ("scp", "settle"), ("taylor", "settle")])
def test_prune_killed_and_rerun_resumes_and_ends_where_an_uninterrupted_run_ends(tmp_path: Path, method: str,
                                                                                  phase: str) -> None:
    # a budget far above the tiny network: the multiplier, calibration and closed loop still run and
    # resume, but no decision depends on a latency measurement's noise, so the results must be equal
    # (10 ms: at 1 ms a loaded machine once read the unpruned tiny network inside the band's [0.9, 0.95])
    args = _prune_world(tmp_path, latency_budget=10.0, budget_unit="ms", method=method)
    _run("prune", *args("whole"))
    proc = _spawn("prune", *args("cut"))
    _kill_when(proc, tmp_path / "cut" / "resume" / "prune" / f"{phase}.pt")
    assert not (tmp_path / "cut" / "pr" / "masks.json").exists()
    err = _run("prune", *args("cut"))
    assert f"resuming {phase}" in err  # the training state was used, not ignored as another configuration's
    if phase == "settle":  # the closed loop is not run (and measured) again
        assert "widths the interrupted run's closed loop decided" in err
    whole, cut = (json.loads((tmp_path / d / "m.json").read_text()) for d in ("whole", "cut"))
    assert cut["widths"] == whole["widths"] and cut["test_acc"] == whole["test_acc"]
    assert cut["final_lambda"] == whole["final_lambda"] and cut["loop_status"] == whole["loop_status"]
    masks = [json.loads((tmp_path / d / "pr" / "masks.json").read_text())["kept"] for d in ("whole", "cut")]
    assert masks[0] == masks[1]
    assert file_sha256(tmp_path / "cut" / "pr" / "model.pt") == file_sha256(tmp_path / "whole" / "pr" / "model.pt")
    assert not (tmp_path / "cut" / "resume" / "prune").exists()  # every state file cleaned after success


def test_prune_with_a_measured_budget_resumes_with_the_interrupted_runs_measurement(tmp_path: Path) -> None:
    # The default unit: the budget is a fraction of the student's latency measured in the stage. The
    # budget is part of the training state's fingerprint, so a re-run that measured again would
    # ignore the state as another configuration's (it did, before the reference was kept).
    args = _prune_world(tmp_path, latency_budget=1.0, budget_unit="fraction")
    proc = _spawn("prune", *args("cut"))
    _kill_when(proc, tmp_path / "cut" / "resume" / "prune" / "prune.pt")
    ref = json.loads((tmp_path / "cut" / "resume" / "prune" / "reference.json").read_text())
    err = _run("prune", *args("cut"))
    assert "reference latencies the interrupted run measured" in err and "resuming prune" in err
    assert "belongs to a different configuration" not in err
    m = json.loads((tmp_path / "cut" / "m.json").read_text())
    assert m["student_ms"] == ref["student_ms"] and m["budget_ms"] == ref["student_ms"]
