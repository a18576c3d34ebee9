"""`make run` in fresh clones of this repository, timed per stage.

    python -m benchmarks.fresh_clone --clones 3 --out benchmarks/results/fresh_clone

Each clone is `git clone` of the committed HEAD into a new temporary directory (uncommitted changes
are not in it), then `make install` (timed on its own) and `make run`, logged line by line with
``benchmarks.cifar10_pipeline.run_logged``: a stage's time runs from its `Running stage` line to the
next one (DVC's bookkeeping included), the last one to the end of `dvc repro`. Recorded per clone: exit code, install and run
seconds, per-stage seconds, the headline metrics (teachers, student, pruned network, baselines,
engine) and a digest of the pruned network's kept channels, so runs can be compared for
sameness. Writes ``runs.json`` and ``table.md``; clones are removed unless ``--keep``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

from benchmarks._runner import REPO, machine, write_results
from benchmarks.cifar10_pipeline import run_logged, stage_times_from_log


def headline(clone: Path) -> dict[str, Any]:
    """The figures a reader compares between runs, from the clone's metrics files."""
    m = clone / "metrics"

    def read(name: str) -> dict[str, Any]:
        path = m / name
        return json.loads(path.read_text()) if path.is_file() else {}

    prune, compare, engine = read("prune.json"), read("compare.json"), read("engine.json")
    masks = clone / "artifacts" / "prune" / "masks.json"
    kept = json.loads(masks.read_text()).get("kept", {}) if masks.is_file() else {}
    return {
        "teachers": {p.stem: json.loads(p.read_text()).get("test_acc") for p in sorted((m / "teachers").glob("*.json"))},
        "student": read("student.json").get("test_acc"),
        "pruned": prune.get("test_acc"), "prune_measured_over_budget": prune.get("measured_over_budget"),
        "removed_blocks": prune.get("removed_blocks"), "widths": prune.get("widths"),
        "kept_digest": hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:12],
        "compare": {k: compare[k].get("test_acc") for k in ("uniform", "l1", "unpruned") if isinstance(compare.get(k), dict)},
        "engine_over_budget": (engine.get("latency", {}).get("ms", 0) / engine["budget_ms"]) if engine.get("budget_ms") else None,
        "step": read("profile.json").get("multiple"),
    }


def one_clone(i: int, out_dir: Path, keep: bool) -> dict[str, Any]:
    clone = Path(tempfile.mkdtemp(prefix=f"slimdeploy-clone{i}-"))
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True,
                            check=True).stdout.strip()
    code_i, _, install_s = run_logged(["make", "install"], out_dir / f"clone{i}_install.log", clone, redraws=False)
    log = out_dir / f"clone{i}_run.log"
    code, _, run_s = run_logged(["make", "run"], log, clone, redraws=False) if code_i == 0 else (code_i, [], 0.0)
    # the stages of `dvc repro`: the last one ends where `make run` moves on to the report
    stages = {t["stage"]: t["seconds"] for t in stage_times_from_log(log, until="rm -rf .resume")} if code_i == 0 else {}
    row = {"clone": i, "commit": commit, "exit": code, "install_s": round(install_s, 1), "run_s": round(run_s, 1),
           "stages_s": stages, **({"metrics": headline(clone)} if code == 0 else {})}
    if not keep:
        shutil.rmtree(clone, ignore_errors=True)
    else:
        row["path"] = str(clone)
    return row


def table(rows: list[dict[str, Any]], where: str) -> str:
    ok = [r for r in rows if r["exit"] == 0]
    out = [f"`make run` in {len(rows)} fresh clones ({len(ok)} exit 0), commit {rows[0]['commit']}, {where}.", "",
           "| clone | exit | install s | make run s | student | pruned | uniform | L1 | unpruned | prune ms/budget | "
           "engine ms/budget | kept digest |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        h = r.get("metrics", {})
        c = h.get("compare", {})

        def pct(x: Any) -> str:
            return f"{100 * x:.2f}" if isinstance(x, (int, float)) else "-"

        def ratio(x: Any) -> str:
            return f"{x:.3f}" if isinstance(x, (int, float)) else "-"

        out.append(f"| {r['clone']} | {r['exit']} | {r['install_s']} | {r['run_s']} | {pct(h.get('student'))} | "
                   f"{pct(h.get('pruned'))} | {pct(c.get('uniform'))} | {pct(c.get('l1'))} | {pct(c.get('unpruned'))} | "
                   f"{ratio(h.get('prune_measured_over_budget'))} | {ratio(h.get('engine_over_budget'))} | "
                   f"{h.get('kept_digest', '-')} |")
    stages = list(dict.fromkeys(s for r in ok for s in r["stages_s"]))
    if ok:
        out += ["", "Seconds per stage, median (range) over the clones that completed:", "",
                "| stage | seconds |", "|---|---|"]
        for s in stages:
            xs = [r["stages_s"][s] for r in ok if s in r["stages_s"]]
            out.append(f"| {s} | {statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f}) |")
        totals = [r["run_s"] for r in ok]
        out.append(f"| **make run, total** | **{statistics.median(totals):.1f} ({min(totals):.1f}-{max(totals):.1f})** |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clones", type=int, default=3)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "fresh_clone")
    p.add_argument("--keep", action="store_true", help="keep the clones (their paths go into runs.json)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(1, args.clones + 1):  # one after another: never two pipelines on the same cores
        rows.append(one_clone(i, args.out, args.keep))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "stages_s"}), flush=True)
    where = f"{machine()}, {date.today().isoformat()}"
    write_results(args.out, "runs.json", {"command": f"python -m benchmarks.fresh_clone --clones {args.clones}",
                                          "machine": machine(), "date": date.today().isoformat(), "runs": rows},
                  table(rows, where))
    print(table(rows, where))
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
