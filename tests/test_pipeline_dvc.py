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

from pipeline.preset import resolve
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
    """The tiny preset (presets/tiny.yaml: every network learns far above the chance guard), with
    teacher b's seed and a predictor warning threshold no table can meet (the pipeline must
    complete with the predictor flagged, not fail)."""
    params = resolve("tiny")
    params["teachers"]["b"]["seed"] = seed_b
    params["profile"]["warn_mape"] = 1e-9
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def test_dvc_repro_tiny_preset(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _copy_repo(repo)
    _tiny_params(repo / "params.yaml")
    _sh(["git", "init", "-q"], repo)
    assert "analytics = false" in (repo / ".dvc" / "config").read_text()

    out = _sh(["dvc", "repro"], repo)
    for stage in ("prepare", "train_teacher@a", "train_teacher@b", "ensemble", "search", "train_student",
                  "precision", "profile", "prune", "slim", "compare", "export", "engine", "handoff"):
        assert f"Running stage '{stage}'" in out
    ens = json.loads((repo / "metrics" / "ensemble.json").read_text())
    # the oracle (some teacher right) bounds every member from above, not the ensemble: averaged logits
    # can be right where every member is wrong
    assert set(ens["members"]) == {"a", "b"} and ens["oracle_acc"] >= ens["best_member_acc"]
    assert ens["oracle_acc"] + ens["none_right"] == pytest.approx(1.0) and ens["all_right"] <= min(ens["members"].values())
    for name in ("prepare.json", "teachers/a.json", "teachers/b.json", "search.json", "student.json",
                 "profile.json", "prune.json", "slim.json", "compare.json", "export.json", "engine.json"):
        assert (repo / "metrics" / name).is_file()

    bundle = repo / "artifacts" / "handoff"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {"model.onnx", "model.opt.onnx", "README.md", "pareto.png", "widths.png"} <= set(manifest["files"])
    assert manifest["engine"]["backend"] == "onnxruntime" and manifest["git_revision"]
    models, n_test = manifest["accuracy"]["models"], manifest["accuracy"]["test_images"]
    assert {"student", "pruned (ours)", "uniform scaling", "Torch-Pruning L1"} <= {m["method"] for m in models}
    compare = json.loads((repo / "metrics" / "compare.json").read_text())
    by_method = {m["method"]: m for m in models}
    # the bundle reports what the stages measured, not numbers of its own
    assert by_method["pruned (ours)"]["accuracy"] == pytest.approx(compare["ours"]["test_acc"])
    assert by_method["student"]["accuracy"] == pytest.approx(compare["student"]["test_acc"])
    assert by_method["uniform scaling"]["accuracy"] == pytest.approx(compare["uniform"]["test_acc"])
    for m in models:  # the Pareto plot's error bars: at most a coin's standard error on n_test images
        assert (0 < m["accuracy_err"] if 0 < m["accuracy"] < 1 else True) and m["accuracy_err"] <= 0.5 / n_test**0.5
        lo, hi = m["latency_err"]
        assert lo == 0.0 and 0.0 <= hi < m["latency_ms"]
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
    assert set(ran) <= {"ensemble", "search", "train_student", "train_teacher@b", "precision", "profile", "prune",
                        "slim", "compare", "export", "engine", "handoff"}


def _ran(out: str) -> set[str]:
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}


def test_compress_a_trained_model_given_as_a_weights_file(tmp_path: Path) -> None:
    """The compress-only path (README, "Your own model and images"): a network trained outside the
    pipeline, given as a weights file and taken as it is (a teacher entry with `epochs: 0`),
    compressed with self-distillation by `make run`'s `dvc repro handoff ensemble`; the search
    and the student never run, a second repro runs nothing, and new weights re-run from the stage
    that reads them, without re-profiling (the architecture did not change)."""
    import torch

    repo = tmp_path / "repo"
    _copy_repo(repo)
    _sh(["git", "init", "-q"], repo)
    _tiny_params(repo / "params.yaml")
    _sh(["dvc", "repro", "train_teacher@a"], repo)  # "trained outside": a network and its weights file
    ckpt = torch.load(repo / "artifacts" / "teachers" / "a.pt", map_location="cpu", weights_only=True)
    torch.save(ckpt["state_dict"], repo / "weights" / "own.pt")  # a plain state_dict, as users have them

    params = resolve("tiny")
    params["teachers"] = {"own": {"arch": "resnet_tiny", "arch_config": {}, "weights": "weights/own.pt", "seed": 0,
                                  "epochs": 0}}
    params["compress"] = {"model": "artifacts/teachers/own"}
    params["distill"] = {**params.get("distill", {}), "mode": "ensemble"}  # from the unpruned model itself
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _sh(["dvc", "repro", "handoff", "ensemble"], repo)
    assert {"train_teacher@own", "ensemble", "profile", "prune", "slim", "compare", "export", "engine",
            "handoff"} <= _ran(out)
    assert not {"search", "train_student"} & _ran(out) and not (repo / "artifacts" / "search").exists()
    manifest = json.loads((repo / "artifacts" / "handoff" / "manifest.json").read_text())
    own = json.loads((repo / "metrics" / "teachers" / "own.json").read_text())
    assert manifest["compressed_from"]["model"] == "artifacts/teachers/own"
    assert manifest["compressed_from"]["test_acc"] == pytest.approx(own["test_acc"])
    assert own["epochs"] == 0 and own["weights"]["source"].endswith("own.pt")
    methods = {m["method"] for m in manifest["accuracy"]["models"]}
    assert "input model (own)" in methods and "pruned (ours)" in methods
    prune = json.loads((repo / "metrics" / "prune.json").read_text())
    assert prune["test_acc_student"] == pytest.approx(own["test_acc"])  # pruned from the given network

    assert _ran(_sh(["dvc", "repro", "handoff", "ensemble"], repo)) == set()
    state = torch.load(repo / "weights" / "own.pt", weights_only=True)
    torch.save({k: v * 1.001 if v.is_floating_point() else v for k, v in state.items()}, repo / "weights" / "own.pt")
    rerun = _ran(_sh(["dvc", "repro", "handoff", "ensemble"], repo))
    assert {"train_teacher@own", "prune", "handoff"} <= rerun and not {"prepare", "profile", "search"} & rerun


def test_target_precision_auto_end_to_end(tmp_path: Path) -> None:
    """target.precision auto through real DVC: the precision stage chooses on the trained student,
    and the latency table and the engine are measured in its choice; a
    change of engine.calibration_images re-runs the choice but, when it stays the same, nothing that
    measures."""
    repo = tmp_path / "repo"
    _copy_repo(repo)
    _sh(["git", "init", "-q"], repo)
    params = resolve("tiny")
    params["target"] = {**params.get("target", {}), "precision": "auto"}
    params["engine"] = {**params.get("engine", {}), "precision": "auto", "calibration_images": 64}
    params["compare"] = {**params.get("compare", {}), "methods": []}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _sh(["dvc", "repro", "handoff"], repo)
    assert {"precision", "profile", "prune", "engine", "handoff"} <= _ran(out)
    choice = json.loads((repo / "artifacts" / "precision" / "precision.json").read_text())
    why = json.loads((repo / "metrics" / "precision.json").read_text())
    assert choice["requested"] == "auto" and choice["precision"] == why["precision"] in ("fp32", "int8")
    assert why["readings"] == 5 and "int8_val_acc" in why
    table = json.loads((repo / "artifacts" / "profile" / "latency_table.json").read_text())
    assert table["fingerprint"]["precision"] == choice["precision"]
    engine = json.loads((repo / "metrics" / "engine.json").read_text())
    assert engine["precision"] == choice["precision"]  # the engine deploys what was chosen, not a choice of its own

    report = _sh([sys.executable, "-m", "pipeline.report"], repo)
    assert f"precision {choice['precision']} (target.precision auto): {why['why']}" in report

    params["engine"]["calibration_images"] = 65
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rerun = _ran(_sh(["dvc", "repro", "handoff"], repo))
    assert "precision" in rerun
    if json.loads((repo / "artifacts" / "precision" / "precision.json").read_text()) == choice:
        assert not {"profile", "prune", "slim"} & rerun


def test_images_streamed_from_a_folder_end_to_end(tmp_path: Path) -> None:
    """prepare.storage files (README, "Your own model and images"): an image folder of varied sizes
    read from disk in DataLoader workers, trained with random resized crops; every stage runs, the
    bundle's pipeline.predict applied to the raw test files gives the ONNX model's logits of the
    evaluation view the pipeline measured, and a changed image re-runs prepare."""
    import numpy as np

    from pipeline.data import load_prepared, normalize
    from pipeline.predict import predict
    from pipeline.runtimes import ort_logits, ort_session
    from tests.test_streaming import colour_folder

    repo = tmp_path / "repo"
    _copy_repo(repo)
    _sh(["git", "init", "-q"], repo)
    colour_folder(repo / "imgs", per_class=40, test=10)
    params = resolve("tiny")
    for t in params["teachers"].values():
        t["epochs"] = 6  # a few batches an epoch: 84 training images
    params["prepare"] = {"source": "imagefolder", "root": "imgs", "storage": "files", "image_size": 16}
    params["train"] = {**params["train"], "batch_size": 16, "augment": "random_resized_crop",
                       "crop_scale": [0.5, 1.0], "workers": 2}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _sh(["dvc", "repro", "handoff", "ensemble"], repo)
    assert {"prepare", "search", "train_student", "prune", "export", "engine", "handoff"} <= _ran(out)
    meta = json.loads((repo / "artifacts" / "prepare" / "meta.json").read_text())
    assert meta["storage"] == "files" and meta["split_sizes"]["test"] == 30
    manifest = json.loads((repo / "artifacts" / "handoff" / "manifest.json").read_text())
    assert manifest["preprocessing"]["shorter_side"] == 18 and manifest["preprocessing"]["resize"] == [16, 16]

    cwd = os.getcwd()
    os.chdir(repo)  # the prepared data names its image folder relative to the repository
    try:
        data = load_prepared("artifacts/prepare")
        files = [repo / "imgs" / f for f in np.load("artifacts/prepare/test.npz")["files"]]
        got = predict("artifacts/handoff", files)
        sess = ort_session(Path("artifacts/handoff") / manifest["model"]["onnx"], "cpu", threads=1)
        want = ort_logits(sess, normalize(data.test.take(), *data.norm())).argmax(1)
    finally:
        os.chdir(cwd)
    assert [r["index"] for r in got] == want.tolist()
    engine = json.loads((repo / "metrics" / "engine.json").read_text())
    assert engine["test_acc"] > 0.6  # colours: far above chance (1/3) through every stage
    # the verdict read on the budget's scale: the network measured with the one it was pruned from
    assert engine["verdict_on"] == "paired with the student" and engine["paired_ms"] > 0
    assert engine["within_budget"] == (engine["budget_status"] != "over")

    assert _ran(_sh(["dvc", "repro", "handoff", "ensemble"], repo)) == set()
    colour_folder(repo / "imgs", per_class=40, test=10, seed=1)  # new pixels, same names
    assert "prepare" in _ran(_sh(["dvc", "repro", "prepare"], repo))
