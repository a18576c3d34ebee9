"""Presets: merging, validation, and the `dvc exp run -S` overrides, applied by DVC's own code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.errors import ConfigError
from pipeline.preset import absolute_root, available, load_yaml, merge, overrides, resolve
from tests.conftest import REPO

BASE = REPO / "params.yaml"


def test_merge_is_key_by_key_but_replaces_teachers_whole() -> None:
    base = {"train": {"batch_size": 64, "amp": True}, "teachers": {"a": {"arch": "x"}, "b": {"arch": "y"}}}
    out = merge(base, {"train": {"batch_size": 128}, "teachers": {"c": {"arch": "z"}}})
    assert out == {"train": {"batch_size": 128, "amp": True}, "teachers": {"c": {"arch": "z"}}}
    assert base["train"]["batch_size"] == 64  # inputs untouched


def test_relative_data_root_becomes_absolute_against_the_repository() -> None:
    params = {"prepare": {"source": "imagefolder", "root": "data/x.tar.gz"}}
    assert absolute_root(params)["prepare"]["root"] == str((REPO / "data/x.tar.gz").resolve())
    digits = {"prepare": {"source": "digits", "root": "data"}}
    assert absolute_root(digits) == digits


@pytest.mark.parametrize("name", ["cifar10", "cifar10-cpu"])
def test_shipped_presets_validate_and_say_what_they_change(name: str) -> None:
    params = resolve(name)
    assert params["prepare"]["source"] == "imagefolder" and Path(params["prepare"]["root"]).is_absolute()
    assert [t["arch"] for t in params["teachers"].values()] == ["resnet56", "resnet32", "mobilenetv2"]
    assert params["prune"]["latency_budget"] == 0.5
    assert name in available()


def test_unknown_preset_and_bad_values_are_refused_with_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown preset 'nope'; available: cifar10"):
        resolve("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prune: {latency_budget: -1}\n")
    with pytest.raises(ConfigError, match="prune.latency_budget"):
        resolve(str(bad))


def test_overrides_applied_by_dvc_give_exactly_the_merged_params(tmp_path: Path) -> None:
    from dvc.utils.hydra import apply_overrides

    base = load_yaml(BASE)
    for name in available():
        target = resolve(name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(base, sort_keys=False))
        apply_overrides(path, overrides(base, target))
        assert load_yaml(path) == target, name


def test_overrides_add_drop_and_quote() -> None:
    base = {"a": {"x": 1, "s": "plain"}, "t": {"old": {"k": 1}}}
    target = {"a": {"x": 2, "s": "two words", "n": None}, "t": {"new": {"k": 1}}}
    out = overrides(base, target)
    assert "a.x=2" in out and "a.s='two words'" in out and "++a.n=null" in out
    assert "++t.new={k:1}" in out and "~t.old" in out


def test_exp_dry_run_prints_the_dvc_command() -> None:
    proc = subprocess.run([sys.executable, "-m", "pipeline.preset", "exp", "cifar10-cpu", "--dry-run", "--", "--temp"],
                          cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("dvc exp run -S prepare.source=imagefolder")
    assert "teachers.t0.arch=resnet56" in proc.stdout and proc.stdout.strip().endswith("--temp")
    bad = subprocess.run([sys.executable, "-m", "pipeline.preset", "show", "nope"], cwd=REPO, capture_output=True,
                         text=True, check=False)
    assert bad.returncode == 2 and "unknown preset" in bad.stderr
