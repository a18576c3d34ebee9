"""Training under torchrun: two CPU ranks (Gloo) train one teacher through the real entry point."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.checkpoint import load_model
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_torchrun_two_ranks(tmp_path: Path, digits_dir: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"].update(progress=False, batch_size=64)
    params["teachers"] = {"a": {"arch": "resnet_tiny", "seed": 0, "epochs": 3, "optimizer": {"lr": 0.2}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "stages.train_teacher",
           "--params", str(tmp_path / "params.yaml"), "--name", "a", "--data", str(digits_dir),
           "--out", str(tmp_path / "a.pt"), "--metrics", str(tmp_path / "a.json"),
           "--plots", str(tmp_path / "a.csv"), "--resume-dir", str(tmp_path / "resume")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "a.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["val_acc"] > 0.5  # learned (chance 0.1) with gradients averaged over ranks
    model, ckpt = load_model(tmp_path / "a.pt")  # rank 0 wrote an ordinary, unwrapped checkpoint
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])
