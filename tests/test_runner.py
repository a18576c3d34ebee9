"""`python -m stages`: dvc.yaml's stages without DVC, in order, with DVC's own commands."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pipeline.preset import resolve
from stages.__main__ import plan
from tests.conftest import REPO


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stages", *args], cwd=REPO, capture_output=True, text=True,
                          check=False)


def test_plan_is_what_dvc_would_run_in_dvc_yaml_order() -> None:
    from dvc.repo import Repo

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    ours = plan(params)
    with Repo(str(REPO)) as repo:
        theirs = {s.addressing: " ".join(s.cmd.split()) for s in repo.index.stages}
    assert dict(ours) == theirs
    order = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    assert [n.split("@")[0] for n, _ in ours] == [s for s in order for _ in (params["teachers"] if s == "train_teacher" else [0])]


def test_runner_runs_the_selected_stages_and_times_them(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(resolve("tiny")))
    work = tmp_path / "work"
    t0 = time.perf_counter()
    proc = _run("--params", str(params), "--workdir", str(work), "--until", "ensemble")
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    times = json.loads((work / "metrics" / "pipeline_times.json").read_text())
    assert [t["stage"] for t in times["stages"]] == ["prepare", "train_teacher@a", "train_teacher@b", "ensemble"]
    # each stage's own time (a process start at least), and together no more than the runner's wall time
    seconds = [t["seconds"] for t in times["stages"]]
    assert min(seconds) > 0.05 and sum(seconds) <= wall
    assert (work / "artifacts" / "teachers" / "b.pt").is_file() and (work / "metrics" / "ensemble.json").is_file()
    assert yaml.safe_load((work / "params.yaml").read_text())["teachers"].keys() == {"a", "b"}

    listed = _run("--workdir", str(work), "--list", "--from", "train_teacher", "--until", "search")
    assert listed.returncode == 0 and [line.split(":")[0] for line in listed.stdout.splitlines()] == [
        "train_teacher@a", "train_teacher@b", "ensemble", "search"]


def test_runner_stops_at_a_failing_stage_and_says_how_to_resume(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["prepare"].update(source="imagefolder", root=str(tmp_path / "missing"))
    params.write_text(yaml.safe_dump(data))
    proc = _run("--params", str(params), "--workdir", str(tmp_path / "w"))
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "stage prepare failed" in proc.stderr and "--from prepare" in proc.stderr
    assert not (tmp_path / "w" / "metrics" / "pipeline_times.json").exists()


def test_runner_refuses_bad_invocations(tmp_path: Path) -> None:
    into_repo = _run("--preset", "cifar10-cpu", "--workdir", str(REPO))
    assert into_repo.returncode == 2 and "would be overwritten" in into_repo.stderr
    nothing = _run("--workdir", str(tmp_path / "empty"))
    assert nothing.returncode == 2 and "give --preset NAME or --params FILE" in nothing.stderr
    unknown = _run("--preset", "cifar10-cpu", "--workdir", str(tmp_path / "x"), "--list", "--from", "nope")
    assert unknown.returncode == 2 and "no stage 'nope'" in unknown.stderr


def test_gpu_check_names_the_missing_data_before_it_starts(tmp_path: Path) -> None:
    from benchmarks.gpu_check import missing_data_of

    preset = tmp_path / "p.yaml"
    preset.write_text("prepare:\n  source: imagefolder\n  root: .cifar/none-such.tar.gz   # a comment\n")
    assert missing_data_of(preset) == [".cifar/none-such.tar.gz"]
    preset.write_text("prepare:\n  root: presets\n")  # exists, relative to the repository
    assert missing_data_of(preset) == []
    assert missing_data_of(tmp_path / "absent.yaml") == []  # unreadable: the pipeline step says what is wrong


def test_pipeline_benchmark_log_is_written_outside_the_workspace_until_the_run_ends(tmp_path: Path) -> None:
    # dvc exp run restores tracked files from its commit: a log written in place was cut short
    from benchmarks.cifar10_pipeline import run_logged, stage_times_from_log

    log = tmp_path / "results" / "run.log"
    code = "import os, sys; print(\"Running stage 'a':\"); print('exists', os.path.exists(sys.argv[1]))"
    rc, starts, total = run_logged([sys.executable, "-c", code, str(log)], log, tmp_path)
    assert rc == 0 and [name for _, name in starts] == ["a"] and total > 0
    lines = log.read_text().splitlines()
    assert len(lines) == 2 and lines[1].split()[1:] == ["exists", "False"]
    assert [t["stage"] for t in stage_times_from_log(log)] == ["a"]


def test_prune_protocol_reuses_a_prune_run_only_for_the_same_prune_side_params(tmp_path: Path) -> None:
    from benchmarks.prune_protocol import pruned_alike

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    work = tmp_path / "budget0.5_seed0"
    (work / "metrics").mkdir(parents=True)
    (work / "artifacts" / "prune").mkdir(parents=True)
    older = json.loads(json.dumps(params))
    del older["prune"]["taylor_normalize"]  # written by a revision without the key: its default
    older["compare"]["methods"] = ["l1"]  # the baselines' side may differ
    (work / "params.yaml").write_text(yaml.safe_dump(older))
    assert not pruned_alike(work, params)  # no prune output yet
    for f in ("metrics/prune.json", "artifacts/prune/masks.json", "artifacts/prune/model.pt"):
        (work / f).write_text("{}")
    assert pruned_alike(work, params)
    for section, key, value in (("prune", "epochs", 3), ("distill", "temperature", 2.0), ("train", "batch_size", 7)):
        changed = json.loads(json.dumps(params))
        changed[section][key] = value
        assert not pruned_alike(work, changed), (section, key)
    changed = json.loads(json.dumps(params))
    changed["teachers"].pop(next(iter(changed["teachers"])))
    assert not pruned_alike(work, changed)
