"""Every command-line front end leaves quietly when the reader of its output goes away
(`... | head -1`): no traceback, no "Exception ignored" at exit, status 141 as for SIGPIPE."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from pipeline.cli import EXIT_BROKEN_PIPE
from tests.conftest import REPO


def _closed_pipe(*args: str, cwd: Path = REPO) -> tuple[int, str]:
    """Run ``python -m <args>`` with its stdout a pipe whose reading end is already closed: the first
    write fails with EPIPE, as in `| head -1` once head has exited. Returns (exit status, stderr)."""
    read, write = os.pipe()
    os.close(read)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        proc = subprocess.run([sys.executable, "-m", *args], stdout=write, stderr=subprocess.PIPE, text=True,
                              cwd=cwd, env=env, timeout=300)
    finally:
        os.close(write)
    return proc.returncode, proc.stderr


def _assert_quiet(code: int, err: str) -> None:
    assert code == EXIT_BROKEN_PIPE, f"exit {code}; stderr:\n{err}"
    assert "Traceback" not in err and "Exception ignored" not in err and "BrokenPipe" not in err, err


def test_preset_list(tmp_path: Path) -> None:
    _assert_quiet(*_closed_pipe("pipeline.preset", "list"))


def test_stages_list(tmp_path: Path) -> None:
    _assert_quiet(*_closed_pipe("stages", "--preset", "tiny", "--workdir", str(tmp_path / "w"), "--list"))


def test_report(tmp_path: Path) -> None:
    (tmp_path / "teachers").mkdir()
    (tmp_path / "teachers" / "a.json").write_text(json.dumps(
        {"name": "a", "arch": "resnet_tiny", "params": 1000, "test_acc": 0.9, "epoch_seconds_median": 0.1}))
    _assert_quiet(*_closed_pipe("pipeline.report", "--metrics-dir", str(tmp_path)))


def test_predict(tmp_path: Path) -> None:
    from tests.test_images import make_bundle

    bundle = make_bundle(tmp_path)
    images = []
    for i in range(3):
        images.append(str(tmp_path / f"{i}.png"))
        Image.new("L", (8, 8), 40 * i).save(images[-1])
    _assert_quiet(*_closed_pipe("pipeline.predict", "--bundle", str(bundle), *images))


def test_an_open_pipe_is_unaffected(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pipeline.preset", "list"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and "tiny" in proc.stdout
