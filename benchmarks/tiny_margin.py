"""How far above the chance-level guard every network of the tiny preset lands, over seeds.

The tiny preset (presets/tiny.yaml) is what `make test` runs end to end through DVC. Each network
it trains (teachers, student, pruned network, compare's baselines) must clear
``pipeline.train.check_above_chance`` or the stage exits 2. A test that sits at the guard's edge is
decided by the CPU's floating-point kernels, not by the code: this script runs the preset with
every training seed shifted, and records each network's test accuracy next to the guard's limit.

    python -m benchmarks.tiny_margin --seeds 0 1 2 3 4 --out benchmarks/results/tiny_margin

Writes ``runs.json`` (every network, every seed) and ``table.md`` (the smallest margin per network).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

from benchmarks._runner import REPO, machine, write_results
from pipeline.preset import resolve


def seeded(params: dict[str, Any], shift: int) -> dict[str, Any]:
    """The preset's params with every training seed moved by ``shift`` (the split seed is kept)."""
    for i, t in enumerate(params["teachers"].values()):
        t["seed"] = shift * 10 + i
    for section in ("search", "student", "prune", "compare"):
        params[section]["seed"] = shift
    return params


def guard_limit(num_classes: int, samples: int) -> float:
    chance = 1.0 / num_classes
    return chance + max(0.02, 3 * math.sqrt(chance * (1 - chance) / max(1, samples)))


def accuracies(work: Path) -> dict[str, float]:
    """Test accuracy of every network the guard checks, by name."""
    m = work / "metrics"
    out = {f"teacher {p.stem}": json.loads(p.read_text())["test_acc"] for p in sorted((m / "teachers").glob("*.json"))}
    out["student"] = json.loads((m / "student.json").read_text())["test_acc"]
    out["pruned"] = json.loads((m / "prune.json").read_text())["test_acc"]
    compare = json.loads((m / "compare.json").read_text())
    for name in ("uniform", "l1", "unpruned"):
        if isinstance(compare.get(name), dict) and "test_acc" in compare[name]:
            out[f"compare {name}"] = compare[name]["test_acc"]
    return out


def run_seed(shift: int, workdir: Path) -> dict[str, Any]:
    params = seeded(resolve("tiny"), shift)
    workdir.mkdir(parents=True, exist_ok=True)
    pfile = workdir / "params.in.yaml"
    import yaml

    pfile.write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.run([sys.executable, "-m", "stages", "--params", str(pfile), "--workdir", str(workdir)],
                          cwd=REPO, capture_output=True, text=True, check=False)
    meta = json.loads((workdir / "artifacts" / "prepare" / "meta.json").read_text())
    n_test = meta.get("split_sizes", {}).get("test") or meta.get("test_size")
    row: dict[str, Any] = {"seed": shift, "exit": proc.returncode, "num_classes": meta["num_classes"],
                           "test_images": n_test}
    if proc.returncode != 0:
        row["error"] = proc.stderr[-2000:]
        return row
    row["limit"] = guard_limit(meta["num_classes"], n_test)
    row["acc"] = accuracies(workdir)
    return row


def table(rows: list[dict[str, Any]], where: str) -> str:
    ok = [r for r in rows if r["exit"] == 0]
    names = sorted({n for r in ok for n in r["acc"]})
    lines = [f"Tiny preset, {len(rows)} seeds ({len(ok)} completed), {where}. Guard limit "
             f"{ok[0]['limit']:.2%} on {ok[0]['test_images']} test images." if ok else "no run completed",
             "", "| network | test acc mean ± std | min | min - limit |", "|---|---|---|---|"]
    for n in names:
        a = [r["acc"][n] for r in ok if n in r["acc"]]
        sd = statistics.stdev(a) if len(a) > 1 else 0.0
        lines.append(f"| {n} | {statistics.mean(a):.2%} ± {sd:.2%} | {min(a):.2%} | "
                     f"{min(a) - ok[0]['limit']:+.2%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "tiny_margin")
    args = p.parse_args(argv)
    where = f"{machine()}, {date.today().isoformat()}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in args.seeds:
            row = run_seed(s, Path(tmp) / f"seed{s}")
            print(json.dumps(row), flush=True)
            rows.append(row)
    command = "python -m benchmarks.tiny_margin --seeds " + " ".join(map(str, args.seeds))
    write_results(args.out, "runs.json", {"command": command, "machine": machine(), "date": date.today().isoformat(),
                                          "runs": rows}, table(rows, where))
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
