"""Accuracy against measured latency at several budgets, ours against uniform scaling and
Torch-Pruning L1 at the same measured latency, through DVC experiments.

Queues one experiment per budget (``dvc exp run --queue -S prune.latency_budget=B``), runs the
queue (``dvc exp run --run-all --jobs 1``: the machine is timed on), then reads every experiment's metrics from
``dvc exp show --json``: prune (ours), compare (baselines cut from the same student to our
measured latency and fine-tuned for as many epochs), student. Writes a Markdown table and a
Pareto plot. Run from the repository root after ``dvc repro`` (the upstream stages are cached,
so each experiment re-runs prune, slim and compare only):

    python -m benchmarks.prune_budgets --budgets 0.3 0.5 0.7 --out benchmarks/results/prune_budgets

A budget the smallest allowed network cannot meet fails its experiment with the prune stage's
error; the table says so rather than leaving it out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks._runner import REPO, machine


def _dvc(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["dvc", *args], cwd=REPO, env=env, capture_output=True, text=True, check=check)


def _metrics(exp: dict[str, Any]) -> dict[str, Any]:
    files = (exp.get("data") or {}).get("metrics") or {}
    return {Path(k).stem: (v.get("data") or {}) for k, v in files.items()}


def _params(exp: dict[str, Any]) -> dict[str, Any]:
    return ((exp.get("data") or {}).get("params") or {}).get("params.yaml", {}).get("data", {})


def collect(budgets: list[float]) -> list[dict[str, Any]]:
    shown = json.loads(_dvc("exp", "show", "--json").stdout)
    rows: list[dict[str, Any]] = []
    for commit in shown:
        for exp in [*(e for x in commit.get("experiments") or [] for e in x.get("revs") or [])]:
            params = _params(exp)
            budget = (params.get("prune") or {}).get("latency_budget")
            if budget not in budgets:
                continue
            m = _metrics(exp)
            rows.append({"name": exp.get("name") or exp.get("rev"), "budget": budget,
                         "status": (exp.get("data") or {}).get("status") or "", "prune": m.get("prune", {}),
                         "compare": m.get("compare", {}), "student": m.get("student", {})})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--out", default="benchmarks/results/prune_budgets", help="directory for table.md, pareto.png")
    p.add_argument("--collect-only", action="store_true", help="only read experiments already run")
    args = p.parse_args()
    if not args.collect_only:
        for b in args.budgets:
            _dvc("exp", "run", "--queue", "-S", f"prune.latency_budget={b}")
        # one job at a time: the experiments measure latency, a parallel run would disturb them
        run = _dvc("exp", "run", "--run-all", "--jobs", "1", check=False)
        print(run.stdout[-4000:], run.stderr[-4000:])
    rows = collect(args.budgets)
    out = REPO / args.out
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"Machine: {machine()}", "",
             "| budget | budget ms | ours: measured ms (/ budget) | ours acc | predicted / measured | loop | "
             "uniform: ms, acc | L1: ms, acc | ours - uniform | ours - L1 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    points = []
    for r in sorted(rows, key=lambda r: r["budget"]):
        pr, cp = r["prune"], r["compare"]
        if not pr.get("measured_ms"):
            lines.append(f"| {r['budget']} | - | failed: {r['status']} (see the prune stage's error) | | | | | | | |")
            continue
        u, l1 = cp.get("uniform", {}), cp.get("l1", {})
        ours_ms = cp.get("ours", {}).get("measured_ms", pr["measured_ms"])
        lines.append(
            f"| {r['budget']} | {pr['budget_ms']:.4f} | {pr['measured_ms']:.4f} ({pr['measured_over_budget']:.3f}) | "
            f"{100 * pr['test_acc']:.2f} (student {100 * pr['test_acc_student']:.2f}) | "
            f"{pr['predicted_over_measured']:.3f} | {pr['loop_status']}, {pr['loop_iterations']} it | "
            f"{u.get('measured_ms', float('nan')):.4f}, {100 * u.get('test_acc', float('nan')):.2f} | "
            f"{l1.get('measured_ms', float('nan')):.4f}, {100 * l1.get('test_acc', float('nan')):.2f} | "
            f"{100 * cp.get('ours_minus_uniform', float('nan')):+.2f} | {100 * cp.get('ours_minus_l1', float('nan')):+.2f} |")
        points.append({"method": "ours (SCP + latency budget)", "latency_ms": ours_ms, "accuracy": pr["test_acc"]})
        if u:
            points.append({"method": "uniform width scaling", "latency_ms": u["measured_ms"], "accuracy": u["test_acc"]})
        if l1:
            points.append({"method": "Torch-Pruning L1", "latency_ms": l1["measured_ms"], "accuracy": l1["test_acc"]})
        if cp.get("student"):
            points.append({"method": "student", "latency_ms": cp["student"]["measured_ms"],
                           "accuracy": cp["student"]["test_acc"]})
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "rows.json").write_text(json.dumps(rows, indent=1, default=str))
    if points:
        from pipeline.plots import pareto_png

        pareto_png(points, out / "pareto.png", f"accuracy vs measured latency ({machine()})")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
