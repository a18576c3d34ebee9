"""What ``target.precision: auto`` chooses on this machine, run after run: the real precision stage
(``python -m stages.precision``, as ``dvc repro`` runs it) on trained networks, several times.

    python -m benchmarks.precision_auto --out benchmarks/results/precision_auto --runs 3 \\
        --case resnet18-32px /tmp/slimdeploy_trained_model/upstream artifacts/teachers/mine.pt \\
        --case digits-student <a make run workdir> artifacts/student/model.pt

Each ``--case NAME WORKDIR MODEL``: the work directory's params.yaml with ``target.precision: auto`` and
``engine.precision: auto``, its ``artifacts/prepare`` and the checkpoint ``MODEL`` (relative to it).
The trained-model benchmark (``benchmarks/trained_model.py``) makes the resnet18's work directory.
Writes ``rows.json`` and ``table.md``: per case, the precision each run chose, the int8 / fp32 latency
ratio (the median of the stage's paired readings; median and range over runs), both validation
accuracies and the stage's wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections import Counter
from datetime import date
from pathlib import Path
from typing import Any

import yaml

from benchmarks._runner import machine, run_stage, write_params, write_results


def run_case(name: str, work: Path, model: str, runs: int) -> dict[str, Any]:
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["target"] = {**params.get("target", {}), "precision": "auto"}
    params["engine"] = {**params.get("engine", {}), "precision": "auto"}
    out: dict[str, Any] = {"case": name, "work": str(work), "model": model, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        pfile = write_params(Path(tmp), params)
        for i in range(runs):
            m = Path(tmp) / f"m{i}.json"
            wall = run_stage("precision", "--data", str(work / "artifacts" / "prepare"), "--student",
                             str(work / model), "--out", str(Path(tmp) / f"p{i}.json"), "--metrics", str(m),
                             params=pfile)
            out["runs"].append({**json.loads(m.read_text()), "seconds": wall})
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| case | runs | chosen | int8 / fp32 latency, median (range) | fp32 val acc % | int8 val acc % | "
             "s per run |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        rs = r["runs"]
        ratios = [x["int8_over_fp32"] for x in rs]
        chosen = ", ".join(f"{p} {n}" for p, n in Counter(x["precision"] for x in rs).items())
        lines.append(f"| {r['case']} | {len(rs)} | {chosen} | {statistics.median(ratios):.3f} "
                     f"({min(ratios):.3f}-{max(ratios):.3f}) | {100 * rs[0]['fp32_val_acc']:.2f} | "
                     f"{100 * rs[0]['int8_val_acc']:.2f} | {statistics.median(x['seconds'] for x in rs):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", nargs=3, action="append", required=True, metavar=("NAME", "WORKDIR", "MODEL"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/precision_auto"))
    args = ap.parse_args(argv)
    rows = [run_case(name, Path(work), model, args.runs) for name, work, model in args.case]
    cmd = "python -m benchmarks.precision_auto --runs {} {} --out {}".format(
        args.runs, " ".join(f"--case {n} {w} {m}" for n, w, m in args.case), args.out)
    meta = {"command": cmd, "machine": machine(), "date": date.today().isoformat()}
    write_results(args.out, "rows.json", {"meta": meta, "rows": rows}, table(rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
