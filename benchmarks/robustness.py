"""Failure handling through real DVC, on a repository where the default pipeline has run.

What a user sees when training goes wrong or a bundle is tampered with, measured with the real
commands (``dvc repro``, ``dvc status``, ``python -m pipeline.predict``), not with test doubles:

1. ``determinism``: ``dvc repro -f`` of teacher t0 with unchanged params writes a byte-identical
   checkpoint, and ``dvc status`` stays clean for every later stage.
2. ``diverged``: teacher t1 with ``optimizer.lr: 10.0``: the stage's exit code, its last message,
   whether a checkpoint was left, what ``dvc status`` says; then the lr restored and ``dvc repro``
   again: the teacher's sha256 against the original.
3. ``killed_teacher``: ``dvc repro -f`` of teacher t0 killed with SIGKILL after its first
   finished epoch, then ``dvc repro``: sha256 against the original, and ``dvc status``.
4. ``killed_prune``: the same for the prune stage (its multiplier, calibration and closed loop
   carry state): measured latency, widths and accuracy against the uninterrupted run.
5. ``bundle``: ``pipeline.predict`` on copies of ``artifacts/handoff`` with the class list
   reversed, one class short, and model.onnx swapped for another network with its sha256
   rewritten: exit code and message of each.

Run from the root of a repository after ``make run`` (it edits params.yaml and restores it):

    python -m benchmarks.robustness --out benchmarks/results/robustness

It re-runs teacher training four times and the prune stage twice (about 6 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import yaml

from benchmarks._runner import machine
from pipeline.io import file_sha256


def sh(*cmd: str, check: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(list(cmd), capture_output=True, text=True, env=env, check=False)
    if check and proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def stage_error(proc: subprocess.CompletedProcess) -> str:
    """The stage's own error message (not DVC's summary after it)."""
    lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if "slimdeploy" in ln and "ERROR" in ln]
    return lines[-1] if lines else (proc.stderr.strip().splitlines() or [""])[-1]


def dvc_clean() -> tuple[bool, str]:
    out = sh("dvc", "status").stdout.strip()
    return "up to date" in out, out


def kill_after(cmd: list[str], marker: Path, timeout: float = 600) -> int:
    """Start ``cmd``, SIGKILL its process group once ``marker`` exists; returns the exit code."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    marker.unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    end = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise SystemExit(f"{' '.join(cmd)} ended (exit {proc.returncode}) before {marker} appeared")
        if time.monotonic() > end:
            os.killpg(proc.pid, signal.SIGKILL)
            raise SystemExit(f"{marker} never appeared")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


def determinism() -> dict[str, Any]:
    before = file_sha256("artifacts/teachers/t0.pt")
    proc = sh("dvc", "repro", "-f", "-s", "train_teacher@t0", check=True)
    clean, status = dvc_clean()
    return {"sha256_before": before, "sha256_after": file_sha256("artifacts/teachers/t0.pt"),
            "identical": before == file_sha256("artifacts/teachers/t0.pt"), "dvc_status_clean": clean,
            "dvc_status": status, "ran": "Running stage 'train_teacher@t0'" in proc.stdout}


def diverged(params_text: str) -> dict[str, Any]:
    original = file_sha256("artifacts/teachers/t1.pt")
    params = yaml.safe_load(params_text)
    params["teachers"]["t1"]["optimizer"]["lr"] = 10.0
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        bad = sh("dvc", "repro", "-s", "train_teacher@t1")
        left = Path("artifacts/teachers/t1.pt").exists() or Path("metrics/teachers/t1.json").exists()
        status = sh("dvc", "status", "train_teacher@t1").stdout.strip()
    finally:
        Path("params.yaml").write_text(params_text)
    good = sh("dvc", "repro", "-s", "train_teacher@t1")
    return {"stage_exited_2": "exited with 2" in bad.stderr + bad.stdout, "message": stage_error(bad), "dvc_exit": bad.returncode, "outputs_left": left, "dvc_status": status,
            "restored_exit": good.returncode,
            "restored_from_run_cache": "run-cache" in good.stdout,
            "restored_identical": Path("artifacts/teachers/t1.pt").is_file() and file_sha256("artifacts/teachers/t1.pt") == original}


def killed_teacher() -> dict[str, Any]:
    original = file_sha256("artifacts/teachers/t0.pt")
    code = kill_after(["dvc", "repro", "-f", "-s", "train_teacher@t0"], Path(".resume/train_teacher/t0.pt"))
    # without the run-cache, so the stage really runs and resumes (by default DVC would restore the
    # checkpoint it cached before, which says nothing about resuming)
    rerun = sh("dvc", "repro", "--no-run-cache")
    clean, status = dvc_clean()
    return {"killed_exit": code, "rerun_exit": rerun.returncode, "resumed_from_state": "resum" in rerun.stderr + rerun.stdout,
            "ran": [ln.split("'")[1] for ln in rerun.stdout.splitlines() if ln.startswith("Running stage")],
            "identical": file_sha256("artifacts/teachers/t0.pt") == original, "dvc_status_clean": clean,
            "dvc_status": status, "resume_left": Path(".resume/train_teacher/t0.pt").exists()}


def killed_prune() -> dict[str, Any]:
    keys = ("measured_ms", "measured_over_budget", "test_acc", "widths", "loop_status", "final_lambda")
    sh("dvc", "repro", "-f", "-s", "prune", check=True)  # the uninterrupted run, measured now (same conditions)
    whole = json.loads(Path("metrics/prune.json").read_text())
    code = kill_after(["dvc", "repro", "-f", "-s", "prune"], Path(".resume/prune/prune.pt"))
    rerun = sh("dvc", "repro", "--no-run-cache", "-s", "prune")
    cut = json.loads(Path("metrics/prune.json").read_text())
    sh("dvc", "repro", check=True)  # the stages after prune, for the new pruned network: the repository is left consistent
    return {"killed_exit": code, "rerun_exit": rerun.returncode, "resumed_from_state": "resum" in rerun.stderr + rerun.stdout,
            "resume_left": Path(".resume/prune/prune.pt").exists(),
            "uninterrupted": {k: whole.get(k) for k in keys}, "resumed": {k: cut.get(k) for k in keys},
            "equal": {k: whole.get(k) == cut.get(k) for k in keys}}


def bundle(tmp: Path) -> dict[str, Any]:
    from PIL import Image

    from pipeline.data import load_prepared
    from pipeline.deploy import export_onnx, model_card
    from pipeline.checkpoint import load_model

    data = load_prepared("artifacts/prepare")
    img = tmp / "digit.png"
    Image.fromarray(data.test.x[0, 0].numpy()).save(img)

    def predict(b: Path) -> dict[str, Any]:
        proc = sh(sys.executable, "-m", "pipeline.predict", "--bundle", str(b), str(img))
        return {"exit": proc.returncode, "message": (proc.stderr.strip().splitlines() or [proc.stdout.strip()])[-1]}

    def copy(name: str) -> Path:
        b = tmp / name
        shutil.copytree("artifacts/handoff", b)
        return b

    def edit(b: Path, **kv: Any) -> None:
        m = json.loads((b / "manifest.json").read_text())
        m.update(kv)
        (b / "manifest.json").write_text(json.dumps(m))

    out = {"intact": predict(copy("intact"))}
    classes = json.loads(Path("artifacts/handoff/manifest.json").read_text())["classes"]
    b = copy("reversed")
    edit(b, classes=list(reversed(classes)))
    out["reversed_classes"] = predict(b)
    b = copy("short")
    edit(b, classes=classes[:-1])
    out["one_class_short"] = predict(b)
    # another network of ours for the same classes (teacher t0), exported with the same model card
    # and its sha256 rewritten consistently: what hashes cannot catch
    b = copy("swapped")
    teacher = load_model("artifacts/teachers/t0.pt")[0].eval()
    export_onnx(teacher, (data.channels, *data.meta["image_size"]), b / "model.onnx", card=model_card(data.meta))
    m = json.loads((b / "manifest.json").read_text())
    m["files"]["model.onnx"] = file_sha256(b / "model.onnx")
    (b / "manifest.json").write_text(json.dumps(m))
    out["swapped_same_card_hash_rewritten"] = predict(b)
    b = copy("swapped_no_card")
    export_onnx(teacher, (data.channels, *data.meta["image_size"]), b / "model.onnx")
    m = json.loads((b / "manifest.json").read_text())
    m["files"]["model.onnx"] = file_sha256(b / "model.onnx")
    (b / "manifest.json").write_text(json.dumps(m))
    out["swapped_no_card_hash_rewritten"] = predict(b)
    b = copy("swapped_hash_kept")
    shutil.copyfile(tmp / "swapped" / "model.onnx", b / "model.onnx")
    out["swapped_hash_kept"] = predict(b)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/robustness"))
    p.add_argument("--only", nargs="*", default=None,
                   choices=["determinism", "diverged", "killed_teacher", "killed_prune", "bundle"])
    args = p.parse_args()
    if not Path("dvc.lock").is_file() or not Path("artifacts/handoff/manifest.json").is_file():
        print("run `make run` (or `dvc repro`) in this repository first: dvc.lock or artifacts/handoff is missing",
              file=sys.stderr)
        return 2
    params_text = Path("params.yaml").read_text()
    results: dict[str, Any] = {"date": date.today().isoformat(), "machine": machine()}
    steps = args.only or ["determinism", "diverged", "killed_teacher", "killed_prune", "bundle"]
    try:
        for step in steps:
            t0 = time.perf_counter()
            if step == "diverged":
                results[step] = diverged(params_text)
            elif step == "bundle":
                with tempfile.TemporaryDirectory() as tmp:
                    results[step] = bundle(Path(tmp))
            else:
                results[step] = globals()[step]()
            results[step]["seconds"] = round(time.perf_counter() - t0, 1)
            print(f"{step}: {json.dumps(results[step], default=str)[:600]}", flush=True)
    finally:
        Path("params.yaml").write_text(params_text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
