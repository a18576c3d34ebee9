"""Failure handling through real DVC, on a repository where the default pipeline has run.

What a user sees when training goes wrong or a bundle is tampered with, measured with the real
commands (``dvc repro``, ``dvc status``, ``python -m pipeline.predict``), not with test doubles:

1. ``determinism``: ``dvc repro -f`` of teacher t0 with unchanged params writes a byte-identical
   checkpoint, and ``dvc status`` stays clean for every later stage.
2. ``diverged``: teacher t1 with ``optimizer.lr: 10.0``: the stage's exit code, its last message,
   whether a checkpoint was left, what ``dvc status`` says; then the lr restored and ``dvc repro``
   again: the teacher's sha256 against the original.
3. ``killed_teacher``: a teacher config DVC has not run (t0 with seed 7): ``dvc repro`` killed
   with SIGKILL after its first finished epoch, ``dvc repro`` again (does it resume?), then a
   forced uninterrupted run: the two checkpoints' sha256; then the original params back and
   ``dvc repro``: ``dvc status`` clean.
4. ``killed_prune``: the same for the prune stage with ``prune.seed: 1`` (its multiplier,
   calibration and closed loop carry state): measured latency, widths, accuracy, checkpoint.
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
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import yaml

from benchmarks._runner import machine
from pipeline.io import file_sha256


def _env() -> dict[str, str]:
    """DVC without analytics, this interpreter's environment first on PATH (for the stages DVC runs)."""
    return {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def sh(*cmd: str, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, env=_env(), check=False)
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
    marker.unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), start_new_session=True)
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


def _killed(params_text: str, edit: Callable[[dict], None], stage: str, marker: str, read: Callable[[], Any]) -> dict[str, Any]:
    """A config DVC has never run (``edit`` of the params): its first ``dvc repro`` is killed with
    SIGKILL once the stage has written its resume state, then ``dvc repro`` again (it must resume),
    then a forced uninterrupted run of the same config for comparison; then the original params
    back and ``dvc repro``, which restores the original outputs from DVC's cache: ``dvc status``
    must be clean. (Killing ``dvc repro -f`` of an unchanged stage proves nothing: DVC keeps the
    previous, still valid, output and the re-run has nothing to do.)"""
    params = yaml.safe_load(params_text)
    edit(params)
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        # --no-run-cache: a config this repository ran before (an earlier run of this script) is
        # not restored from DVC's run-cache, it runs
        code = kill_after(["dvc", "repro", "--no-run-cache", "-s", stage], Path(marker))
        rerun = sh("dvc", "repro", "--no-run-cache", "-s", stage)
        resumed = read()
        resume_left = Path(marker).exists()
        sh("dvc", "repro", "-f", "--no-run-cache", "-s", stage, check=True)
        whole = read()
    finally:
        Path("params.yaml").write_text(params_text)
    back = sh("dvc", "repro")
    clean, status = dvc_clean()
    return {"killed_exit": code, "rerun_exit": rerun.returncode, "resumed_from_state": "resuming" in rerun.stderr + rerun.stdout,
            "resume_left": resume_left, "resumed": resumed, "uninterrupted": whole,
            "equal": resumed == whole if not isinstance(whole, dict) else {k: resumed.get(k) == v for k, v in whole.items()},
            "restored_exit": back.returncode, "dvc_status_clean": clean, "dvc_status": status}


def killed_teacher(params_text: str) -> dict[str, Any]:
    return _killed(params_text, lambda p: p["teachers"]["t0"].update(seed=7), "train_teacher@t0",
                   ".resume/train_teacher/t0.pt", lambda: file_sha256("artifacts/teachers/t0.pt"))


def killed_prune(params_text: str) -> dict[str, Any]:
    keys = ("measured_ms", "measured_over_budget", "test_acc", "widths", "loop_status", "final_lambda")

    def read() -> dict[str, Any]:
        m = json.loads(Path("metrics/prune.json").read_text())
        return {k: m.get(k) for k in keys} | {"model_sha256": file_sha256("artifacts/prune/model.pt")}

    return _killed(params_text, lambda p: p["prune"].update(seed=1), "prune", ".resume/prune/prune.pt", read)


def bundle(tmp: Path) -> dict[str, Any]:
    from PIL import Image

    from pipeline.checkpoint import load_model
    from pipeline.data import load_prepared
    from pipeline.deploy import model_card
    from pipeline.runtimes import export_onnx

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
            if step in ("diverged", "killed_teacher", "killed_prune"):
                results[step] = globals()[step](params_text)
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
