"""Helpers for benchmark scripts: run stage entry points in a scratch directory with a generated
params file, exactly as ``dvc repro`` would (same modules, same arguments)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


def write_params(workdir: Path, params: dict[str, Any]) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_stage(module: str, *args: str, params: Path, launcher: list[str] | None = None) -> float:
    """Run ``python -m stages.<module>`` from the repo root; returns wall seconds; raises on failure."""
    cmd = [*(launcher or [sys.executable]), "-m", f"stages.{module}", "--params", str(params), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    return time.perf_counter() - t0


def command_line(module: str, argv: list[str]) -> str:
    """``python -m module argv...`` as a shell would take it back (what result files record)."""
    def quoted(a: str) -> str:
        if a and not any(c in a for c in " \t\n'\"$`\\*?[]{}()<>|&;!#~"):
            return a
        return f'"{a}"' if not any(c in a for c in '"$`\\!\n') else shlex.quote(a)

    return " ".join(["python", "-m", module, *map(quoted, argv)])


def machine() -> str:
    from pipeline.runtime import cpu_name

    return f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"


def write_results(out: Path, rows_name: str, rows: Any, text: str) -> None:
    """A benchmark's raw rows (JSON) and its Markdown table, side by side in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / rows_name).write_text(json.dumps(rows, indent=1))
    (out / "table.md").write_text(text + "\n")
