"""The whole pipeline on CIFAR-10 from a preset, timed per stage, then the results tables.

    python -m benchmarks.cifar10_pipeline --preset cifar10-cpu                 # dvc exp run, in this repo
    python -m benchmarks.cifar10_pipeline --preset cifar10-cpu --no-dvc --workdir runs/c10
    python -m benchmarks.cifar10_pipeline --report-only [--metrics-dir metrics] [--log FILE]

With DVC (default) it runs ``python -m pipeline.preset exp PRESET`` in the workspace, so the results
are an experiment (``dvc exp show``) and the workspace holds its outputs afterwards; a stage's time
is from its ``Running stage`` line to the next one (DVC's own bookkeeping included). Without DVC it
runs ``python -m stages --preset PRESET`` and takes the runner's per-stage times. Either way the
log is kept (``--log``), and the tables below are printed from the metrics files in markdown:
teachers, ensemble and oracle, the searched student, the pruned model against its budget, the
baselines at the same measured latency, epoch times and time per stage.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

from benchmarks._runner import REPO, machine

_STAGE = re.compile(r"Running stage '([^']+)'")


def run_logged(cmd: list[str], log_path: Path, cwd: Path,
               redraws: bool = True) -> tuple[int, list[tuple[float, str]], float]:
    """Run ``cmd`` with its output streamed to the terminal and to ``log_path``, each line
    prefixed with the seconds since start; returns (exit code, stage starts, total seconds).
    ``redraws=False`` keeps only the last state of a progress bar's redraws (``\r``) in the log.

    The log is written outside the repository while ``cmd`` runs and copied to ``log_path`` when
    it ends: when ``dvc exp run`` applied the finished experiment to the workspace, the tracked
    log came back as it stood when the experiment began, its first line (docs/history.md,
    section 24)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    starts: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        part = Path(tmp) / log_path.name
        with part.open("w") as log, subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                                     stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                now = time.perf_counter() - t0
                text = line if redraws else line.rstrip("\n").split("\r")[-1] + "\n"
                log.write(f"{now:9.1f} {text}")
                log.flush()
                sys.stdout.write(line)
                m = _STAGE.search(line)
                if m:
                    starts.append((now, m.group(1)))
        shutil.copyfile(part, log_path)
    return proc.returncode, starts, time.perf_counter() - t0


def stage_times_from_log(log_path: Path, until: str | None = None) -> list[dict[str, Any]]:
    """Per-stage seconds from a log written by ``run_logged`` (start of one stage to the next; the
    last one ends at the log's last line, or at the first line containing ``until``)."""
    starts, end = [], 0.0
    for line in log_path.read_text().splitlines():
        stamp, _, rest = line.strip().partition(" ")
        try:
            end = float(stamp)
        except ValueError:
            continue
        if until is not None and until in rest:
            break
        m = _STAGE.search(rest)
        if m:
            starts.append((end, m.group(1)))
    bounds = [s for s, _ in starts[1:]] + [end]
    return [{"stage": name, "seconds": round(b - s, 1)} for (s, name), b in zip(starts, bounds)]


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def report(metrics: Path, times: list[dict[str, Any]]) -> str:
    out = []
    prep = _read(metrics / "prepare.json")
    if prep:
        out.append(f"Data: {prep['source']}, {prep['num_classes']} classes, train/val/test = "
                   f"{prep['train_images']}/{prep['val_images']}/{prep['test_images']}\n")
    out += ["| model | arch | params | test acc | epochs | s/epoch median (range) |", "|---|---|---|---|---|---|"]
    for f in sorted((metrics / "teachers").glob("*.json")):
        m = json.loads(f.read_text())
        out.append(f"| teacher {m['name']} | {m['arch']} | {m['params']:,} | {_pct(m['test_acc'])} | {m['epochs']} | "
                   f"{m['epoch_seconds_median']:.1f} ({m['epoch_seconds_min']:.1f}-{m['epoch_seconds_max']:.1f}) |")
    ens = _read(metrics / "ensemble.json")
    if ens:
        out.append(f"| ensemble (mean softmax) | - | - | {_pct(ens['ensemble_acc'])} | - | - |")
        out.append(f"| oracle (any teacher right) | - | - | {_pct(ens['oracle_acc'])} | - | - |")
    stu = _read(metrics / "student.json")
    if stu:
        out.append(f"| student (searched, {stu['distill']['mode']} KD) | cifar_resnet | {stu['params']:,} | "
                   f"{_pct(stu['test_acc'])} | {stu.get('epochs', '-')} | {stu['epoch_seconds_median']:.1f} |")
    pr = _read(metrics / "prune.json")
    if pr:
        out.append(f"| pruned (ours), budget {pr['budget_ms']:.3f} ms | cifar_resnet | {pr['params']:,} | "
                   f"{_pct(pr['test_acc'])} | - | - |")
    cmp_ = _read(metrics / "compare.json") or {}
    for key, label in (("uniform", "uniform width scaling"), ("l1", "Torch-Pruning L1 (global)"),
                       ("unpruned", "student trained as long (unpruned)")):
        if key in cmp_:
            out.append(f"| {label} | cifar_resnet | {cmp_[key]['params']:,} | {_pct(cmp_[key]['test_acc'])} | - | - |")
    if pr:
        out += ["", "| latency (target) | ms | of budget |", "|---|---|---|",
                f"| student, measured | {pr['student_ms']:.4f} | {pr['student_ms'] / pr['budget_ms']:.3f} |",
                f"| budget ({pr['budget']} {pr['budget_unit']}) | {pr['budget_ms']:.4f} | 1.000 |",
                f"| pruned, predicted by the table | {pr['predicted_ms']:.4f} | {pr['predicted_ms'] / pr['budget_ms']:.3f} |",
                f"| pruned, measured (prune stage) | {pr['measured_ms']:.4f} | {pr['measured_over_budget']:.3f} |"]
        for key, label in (("uniform", "uniform, measured"), ("l1", "Torch-Pruning L1, measured")):
            if key in cmp_:
                out.append(f"| {label} | {cmp_[key]['measured_ms']:.4f} | {cmp_[key]['measured_ms'] / pr['budget_ms']:.3f} |")
        eng = _read(metrics / "engine.json")
        if eng:
            lat = eng["latency"]
            out.append(f"| engine ({eng['backend']}) p50 (p90, p99) | {lat['p50_ms']:.4f} ({lat['p90_ms']:.4f}, "
                       f"{lat['p99_ms']:.4f}) | {eng['p50_over_budget']:.3f} |")
        out.append(f"\nClosed loop: {pr['loop_status']} after {pr['loop_iterations']} measurement(s).")
    if times:
        total = sum(t["seconds"] for t in times)
        out += ["", "| stage | seconds | share |", "|---|---|---|"]
        out += [f"| {t['stage']} | {t['seconds']:.1f} | {t['seconds'] / total:.1%} |" for t in times]
        out.append(f"| **total** | **{total:.1f}** ({total / 60:.1f} min) | |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cifar10-cpu")
    p.add_argument("--no-dvc", action="store_true", help="run the stage entry points with `python -m stages`")
    p.add_argument("--workdir", type=Path, default=None, help="--no-dvc: where the stages run")
    p.add_argument("--name", default=None, help="experiment name (default: the preset's name and today's date)")
    p.add_argument("--log", type=Path, default=None, help="log file (default benchmarks/results/cifar10_pipeline/<preset>.log)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="with DVC: an extra -S override on top of the preset (repeatable)")
    p.add_argument("--report-only", action="store_true", help="print the tables from existing metrics and log")
    p.add_argument("--metrics-dir", type=Path, default=None)
    args = p.parse_args()
    results = REPO / "benchmarks" / "results" / "cifar10_pipeline"
    log = args.log or results / f"{args.preset}.log"
    workdir = (args.workdir or REPO / "runs" / args.preset).resolve() if args.no_dvc else REPO
    metrics = args.metrics_dir or workdir / "metrics"
    if not args.report_only:
        if args.no_dvc:
            if args.sets:
                p.error("--set needs DVC; without it write the params with `python -m pipeline.preset write`")
            cmd = [sys.executable, "-m", "stages", "--preset", args.preset, "--workdir", str(workdir)]
        else:
            name = args.name or f"{args.preset}-{date.today():%Y%m%d}"
            cmd = [sys.executable, "-m", "pipeline.preset", "exp", args.preset, "--name", name]
            if args.sets:
                cmd += ["--", *[a for kv in args.sets for a in ("-S", kv)]]
        rc, _, total = run_logged(cmd, log, REPO)
        print(f"\nexit code {rc} after {total:.1f} s")
        if rc != 0:
            return rc
    if args.no_dvc and (metrics / "pipeline_times.json").is_file():
        times = json.loads((metrics / "pipeline_times.json").read_text())["stages"]
    else:
        times = stage_times_from_log(log) if log.is_file() else []
    print(f"\n## CIFAR-10 pipeline, preset {args.preset} ({date.today()}), machine: {machine()}\n")
    print(report(metrics, times))
    return 0


if __name__ == "__main__":
    sys.exit(main())
