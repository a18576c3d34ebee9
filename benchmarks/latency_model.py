"""Repeatability and accuracy of the latency model: the `profile` stage run N times on one machine.

Each run is the real stage entry point (``python -m stages.profile``, as ``dvc repro`` runs it) on
the same prepared data and the same network, with the params given (default: the repository's
params.yaml). For every run: the channel step used and how it was decided, the step found by
each repeat of the probe, the number of table points, the time of each phase and of the stage,
and the predictor's error on its held-out random sub-networks (MAPE, max error, fraction within
+-10%, Spearman), before and after calibration. Then the medians with their range.

Run from the repository root after ``dvc repro`` (it reads ``artifacts/prepare`` and
``artifacts/search/arch.json``), or pass ``--data`` and ``--arch``:

    python -m benchmarks.latency_model --runs 5 --out benchmarks/results/latency_model
    python -m benchmarks.latency_model --runs 5 --set target.backend=torch target.device=cuda \
        target.precision=fp16 target.cuda_graph=true            # the torch-CUDA target on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

import yaml

from benchmarks._runner import REPO, machine, run_stage, write_params, write_results


def set_key(params: dict[str, Any], assignment: str, strict: bool = False) -> None:
    """``a.b.c=value`` (value parsed as YAML) into ``params``. ``strict``: the key must already be
    there (a misspelt key is a ``KeyError`` naming it, not a new key)."""
    key, eq, raw = assignment.partition("=")
    if strict and not eq:
        raise KeyError(f"{assignment!r}: expected KEY=VALUE, such as prune.optimizer.lr=0.01")
    node = params
    *path, last = key.split(".")
    for part in path:
        if strict and not isinstance(node.get(part), dict):
            raise KeyError(f"{key!r}: params have no section {part!r} there")
        node = node.setdefault(part, {})
    if strict and last not in node:
        raise KeyError(f"{key!r}: params have no key {last!r} there (keys: {', '.join(node)})")
    node[last] = yaml.safe_load(raw)


def check_overrides(assignments: list[str], flag: str = "--set") -> str | None:
    """The first problem of ``assignments`` (given with ``flag``) against the project's params.yaml (a
    key it does not have, no ``=``, a value that is not YAML), or None."""
    probe = yaml.safe_load((REPO / "params.yaml").read_text())
    for a in assignments:
        try:
            set_key(probe, a, strict=True)
        except (KeyError, yaml.YAMLError) as err:
            return f"{flag} {a}: {err.args[0] if isinstance(err, KeyError) else err}"
    return None


def summary(values: list[float], fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--params", type=Path, default=REPO / "params.yaml")
    p.add_argument("--data", type=Path, default=REPO / "artifacts" / "prepare")
    p.add_argument("--arch", type=Path, default=REPO / "artifacts" / "search" / "arch.json")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="params overrides, e.g. target.channel_step=8")
    p.add_argument("--out", type=Path, default=None, help="directory for runs.json and the Markdown table")
    args = p.parse_args()
    for path, what in ((args.data, "prepared data (dvc repro prepare)"), (args.arch, "arch.json (dvc repro search)")):
        if not path.exists():
            p.error(f"{path} does not exist: {what}")
    if problem := check_overrides(args.set):
        p.error(problem)
    params = yaml.safe_load(args.params.read_text())
    for a in args.set:
        set_key(params, a)
    params["profile"]["progress"] = False
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pfile = write_params(work, params)
        for i in range(args.runs):
            wall = run_stage("profile", "--data", str(args.data), "--arch", str(args.arch),
                             "--out", str(work / f"table{i}.json"), "--metrics", str(work / f"m{i}.json"),
                             "--plots-dir", str(work / f"plots{i}"), params=pfile)
            m = json.loads((work / f"m{i}.json").read_text())
            pr, st = m["predictor"], m["step"]
            rows.append({
                "run": i + 1, "step": st["step"], "source": st["source"], "detected": st["detected"],
                "repeat_steps": st["repeat_steps"], "probe_spread": st["probe_spread"], "tolerance": st["tolerance"],
                "points": m["measurements"], "seconds": m["seconds"], "stage_wall_s": wall,
                "mape": pr["heldout_mape"], "max_ape": pr["heldout_max_ape"], "within_10pct": pr["heldout_within_10pct"],
                "spearman": pr["heldout_spearman"], "samples": pr["heldout_samples"],
                "uncalibrated_mape": pr["uncalibrated_heldout_mape"], "scale": pr["scale"], "offset_ms": pr["offset_ms"],
                "full_ms": m["full_latency_ms"], "full_window_spread": m["noise"]["full_window_spread"],
                "backend": m["backend"], "device": m["device"],
            })
            print(f"run {i + 1}: step {st['step']} ({st['source']}, repeats {st['repeat_steps']}), "
                  f"MAPE {100 * pr['heldout_mape']:.2f}%, within 10% {100 * pr['heldout_within_10pct']:.0f}%, "
                  f"Spearman {pr['heldout_spearman']:.3f}, {wall:.1f} s", flush=True)
    dev = rows[0]["device"]
    lines = [
        f"## Latency model, {args.runs} runs of `profile` ({date.today()}); machine: {machine()}; target "
        f"{rows[0]['backend']} on {dev.get('name')}",
        "",
        "| run | step used (source) | steps of the 3 repeats | probe spread | table points | table s | stage s | "
        "held-out MAPE | max error | within +-10% | Spearman | MAPE before calibration |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['step']} ({r['source']}) | {', '.join(map(str, r['repeat_steps']))} | "
            f"{100 * r['probe_spread']:.1f}% | {r['points']} | {r['seconds']['table']:.1f} | {r['stage_wall_s']:.1f} | "
            f"{100 * r['mape']:.2f}% | {100 * r['max_ape']:.1f}% | {100 * r['within_10pct']:.0f}% | "
            f"{r['spearman']:.3f} | {100 * r['uncalibrated_mape']:.1f}% |")
    lines.append(
        f"| median (range) | {', '.join(sorted({str(r['step']) for r in rows}))} | | | | "
        f"{summary([r['seconds']['table'] for r in rows], '{:.1f}')} | {summary([r['stage_wall_s'] for r in rows], '{:.1f}')} | "
        f"{summary([100 * r['mape'] for r in rows], '{:.2f}')}% | {summary([100 * r['max_ape'] for r in rows], '{:.1f}')}% | "
        f"{summary([100 * r['within_10pct'] for r in rows], '{:.0f}')}% | {summary([r['spearman'] for r in rows])} | "
        f"{summary([100 * r['uncalibrated_mape'] for r in rows], '{:.1f}')}% |")
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        write_results(args.out, "runs.json", rows, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
