"""Ours against uniform width scaling and Torch-Pruning L1 under the fair protocol
(pipeline/compare.py), over budgets and seeds: mean +- std of test accuracy at equal measured
latency, and where each method landed in the budget; with ``unpruned`` among ``compare.methods``
also the student trained as many more epochs the same way (the ceiling at equal training).

For every (budget, seed) it runs the real `prune` and `compare` stage entry points (as `dvc repro`
runs them) on the same upstream artifacts (prepared data, teachers, student, latency table), in a
directory of its own, with `prune.latency_budget`, `prune.seed` and `compare.seed` set. Prepare the
upstream once, e.g. for the CIFAR-10 CPU preset (about 35 minutes on 2 cores):

    python -m stages --preset cifar10-cpu --workdir runs/c10 --until profile
    python -m benchmarks.prune_protocol --upstream runs/c10 --preset cifar10-cpu --budgets 0.3 0.5 0.7 --seeds 0 1 2 \\
        --out benchmarks/results/prune_protocol/cifar10-cpu

With DVC the same sweep is `dvc exp run --queue -S prune.latency_budget=B -S prune.seed=S
-S compare.seed=S` per pair, then `dvc exp run --run-all` (benchmarks/prune_budgets.py does that
for budgets). `--set key=value` changes params for every run (ablations); `--only-ours` skips the
baselines. A budget out of reach is reported as such, not left out. Re-running skips the pairs whose
metrics exist, and the prune stage of a pair whose output is there for the same prune, distill,
train, target and teachers params (to re-run only the baselines, delete their `compare.json`).
`--holdout-per-class N` also scores every network (ours, the baselines, the unpruned reference and
the student) on up to N images per class of the source that the upstream's prepare stage left out
(`OUT/holdout.npz`, checked disjoint from the prepared splits; compare's `holdout_acc`): the CIFAR-10
CPU preset tests on 1,000 images, whose standard error (about 1.6 points) hides the differences the
protocol is after. Its table follows the main one.
Writes `table.md`, `rows.json`, and the Pareto plot `pareto.png` (mean accuracy against mean
measured latency per method and budget, error bars one standard deviation over the seeds; its
points in `pareto.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks._runner import machine, run_stage, write_params, write_results
from benchmarks.latency_model import check_overrides, set_key
from pipeline.prune import Budget


def _link(upstream: Path, work: Path) -> None:
    (work / "artifacts").mkdir(parents=True, exist_ok=True)
    for name in ("prepare", "teachers", "student", "profile"):
        dst = work / "artifacts" / name
        if not dst.exists():
            os.symlink((upstream / "artifacts" / name).resolve(), dst)


def make_holdout(upstream: Path, path: Path, per_class: int) -> Path:
    """``path``: up to ``per_class`` images per class of the upstream's source that its prepare stage
    left out (``pipeline.data.holdout_split``), written once. The upstream's own prepare params are
    used, and the splits they give are checked against the prepared data's hashes first, so the
    holdout cannot overlap the images any network trained, validated or was tested on."""
    from pipeline.config import PrepareConfig, parse_section
    from pipeline.data import holdout_split, load_source, prepare_splits
    from pipeline.errors import DataError
    from pipeline.io import atomic_path

    if path.is_file():
        return path
    cfg = parse_section(yaml.safe_load((upstream / "params.yaml").read_text()), "prepare", PrepareConfig)
    raw = load_source(cfg, whole=True)  # the holdout draws from the images outside the pool
    _, meta = prepare_splits(raw, cfg)
    want = json.loads((upstream / "artifacts" / "prepare" / "meta.json").read_text())["split_hashes"]
    if meta["split_hashes"] != want:
        raise DataError(f"{upstream}: its params.yaml's prepare section no longer gives the prepared splits "
                        f"(hashes differ), so a holdout drawn from it could overlap them")
    x, y = holdout_split(raw, cfg, per_class)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, x=x, y=y)
    print(f"holdout: {len(y)} images the prepare stage of {upstream} left out -> {path}", flush=True)
    return path


def run_pair(upstream: Path, out: Path, params: dict[str, Any], budget: float, seed: int, baselines: bool,
             holdout: Path | None = None) -> dict:
    work = out / f"budget{budget:g}_seed{seed}"
    done = work / "metrics" / ("compare.json" if baselines else "prune.json")
    if done.is_file():
        return _collect(work, baselines)
    _link(upstream, work)
    p = json.loads(json.dumps(params))
    p["prune"].update(latency_budget=budget, seed=seed, progress=False)
    p["compare"].update(seed=seed, methods=p["compare"]["methods"] if baselines else [])
    reuse = pruned_alike(work, p)  # before params.yaml is overwritten
    pfile = write_params(work, p)
    a = work / "artifacts"
    common = ["--data", str(a / "prepare"), "--teachers", str(a / "teachers")]
    try:
        if not reuse:
            run_stage("prune", *common, "--student", str(a / "student" / "model.pt"), "--table",
                      str(a / "profile" / "latency_table.json"), "--out-dir", str(a / "prune"), "--metrics",
                      str(work / "metrics" / "prune.json"), "--plots-dir", str(work / "plots" / "prune"),
                      "--resume-dir", str(work / ".resume"), params=pfile)
        if baselines:
            run_stage("compare", *common, "--student", str(a / "student" / "model.pt"), "--table",
                      str(a / "profile" / "latency_table.json"), "--pruned", str(a / "prune" / "masks.json"),
                      "--model", str(a / "prune" / "model.pt"), "--metrics", str(work / "metrics" / "compare.json"),
                      *(["--holdout", str(holdout.resolve())] if holdout else []), params=pfile)
    except subprocess.CalledProcessError as err:
        return {"budget": budget, "seed": seed, "failed": f"stage exited {err.returncode}"}
    return _collect(work, baselines)


def pruned_alike(work: Path, params: dict[str, Any]) -> bool:
    """True when ``work`` holds a finished prune stage run with the sections the prune stage reads
    as ``params`` has them (defaults filled in, so a run by an older revision whose params.yaml
    lacks a newer key counts): the baselines can be re-run against it without training ours again
    (after a change to the baselines' side of the protocol)."""
    from pipeline.config import DistillConfig, PruneConfig, TargetConfig, TrainConfig, parse_section, parse_teachers

    if not all(f.is_file() for f in (work / "metrics" / "prune.json", work / "params.yaml",
                                     work / "artifacts" / "prune" / "masks.json", work / "artifacts" / "prune" / "model.pt")):
        return False
    old = yaml.safe_load((work / "params.yaml").read_text())
    for key, kind in (("prune", PruneConfig), ("distill", DistillConfig), ("train", TrainConfig),
                      ("target", TargetConfig)):
        if parse_section(old, key, kind).model_dump(exclude={"progress"}) != \
                parse_section(params, key, kind).model_dump(exclude={"progress"}):
            return False
    return {n: t.model_dump() for n, t in parse_teachers(old).items()} == \
        {n: t.model_dump() for n, t in parse_teachers(params).items()}


def _collect(work: Path, baselines: bool) -> dict:
    pr = json.loads((work / "metrics" / "prune.json").read_text())
    row = {"budget": pr["budget"], "seed": json.loads(json.dumps(yaml.safe_load((work / "params.yaml").read_text())))
           ["prune"]["seed"], "prune": pr}
    if baselines:
        row["compare"] = json.loads((work / "metrics" / "compare.json").read_text())
    return row


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{100 * statistics.mean(xs):.1f} ± {100 * statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{100 * xs[0]:.1f}"


def row_budget(row: dict) -> Budget:
    """The budget a (budget, seed) run was judged by: compare's record of it, else the prune stage's
    metrics (every revision wrote its target, band, noise and student latency there)."""
    c = row.get("compare", {}).get("protocol", {})
    if "budget" in c:
        return Budget.from_dict(c["budget"])
    pr = row["prune"]
    return Budget(pr["budget_ms"], tuple(pr["band"]), pr["noise"], pr["budget_unit"], pr["budget"], pr["student_ms"])


def judged(row: dict, method: str) -> tuple[float, float, str] | None:
    """(measured ms, measured / budget, ``Budget`` status) of ``method`` in a run: the compare
    stage's final joint measurement for every method, ours included (the prune stage's own reading
    only for a run without compare); None when the method did not run."""
    entry = row.get("compare", {}).get(method)
    if method == "ours" and (entry is None or "measured_ms" not in entry):
        entry = row["prune"]  # no compare run, or one by a revision that did not measure ours at the end
    if entry is None:
        return None
    budget, ms = row_budget(row), entry["measured_ms"]
    return ms, ms / budget.target_ms, entry.get("budget_status") or budget.status(ms)


def _marks(statuses: list[str]) -> str:
    """What a cell's seeds that were not at the budget are: over it, or below its band."""
    over, below = statuses.count("over"), statuses.count("below_band")
    out = [f"{what} in {n} seed{'s' if n > 1 else ''}"
           for what, n in (("over budget", over), ("below band", below)) if n]
    return f" ({'; '.join(out)})" if out else ""


def _cell(rs: list[dict], method: str) -> tuple[str, list[float]]:
    """A method's mean ± std cell over the runs ``rs``, marked with its seeds not at the budget, and
    its measured / budget per seed."""
    acc, land, status = [], [], []
    for r in rs:
        j = judged(r, method)
        if j is None:
            continue
        land.append(j[1])
        status.append(j[2])
        acc.append(r["prune"]["test_acc"] if method == "ours" else r["compare"][method]["test_acc"])
    return mean_std(acc) + _marks(status), land


def _versus(rs: list[dict]) -> str:
    """Ours minus the better baseline that met the budget (one over it is no equal-latency rival),
    mean ± std over the seeds where ours met it too."""
    diffs, ours_over = [], 0
    for r in rs:
        ours = judged(r, "ours")
        rivals = [r["compare"][m]["test_acc"] for m in ("uniform", "l1") if (j := judged(r, m)) is not None
                  and j[2] != "over"]
        ours_over += ours is not None and ours[2] == "over"
        if rivals and ours is not None and ours[2] != "over":
            diffs.append(r["prune"]["test_acc"] - max(rivals))
    if diffs or not any(m in r.get("compare", {}) for r in rs for m in ("uniform", "l1")):
        return mean_std(diffs)
    return "ours over budget" if ours_over == len(rs) else "no baseline under budget"


def table(rows: list[dict], baselines: bool) -> str:
    """Per budget: every method's test accuracy over the seeds, each judged by the ``Budget`` rule on
    the compare stage's final joint measurement (cells say in how many seeds a method was over the
    budget or below its band); ours minus the best baseline that met the budget, over the seeds
    where ours met it too."""
    lines = ["| budget | seeds | student | student trained as long (unpruned) | ours | uniform | Torch-Pruning L1 | "
             "ours - best baseline under budget | measured / budget: ours; uniform; L1 (mean) | "
             "ours: epochs searching + training |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for b in sorted({r["budget"] for r in rows}):
        rs = [r for r in rows if r["budget"] == b and "failed" not in r]
        failed = [r for r in rows if r["budget"] == b and "failed" in r]
        if not rs:
            lines.append(f"| {b:g} | {len(failed)} failed: {failed[0]['failed']} | | | | | | | | |")
            continue
        cells, land = {}, {}
        for m in ("ours", "uniform", "l1"):
            cells[m], land[m] = _cell(rs, m) if m == "ours" or baselines else ("-", [])
        unpruned = [r["compare"]["unpruned"]["test_acc"] for r in rs if baselines and "unpruned" in r.get("compare", {})]
        p0 = rs[0]["prune"]
        student = mean_std([r["prune"]["test_acc_student"] for r in rs])
        lines.append(
            f"| {b:g} | {', '.join(str(r['seed']) for r in rs)}{f' ({len(failed)} failed)' if failed else ''} | "
            f"{student} | {mean_std(unpruned)} | **{cells['ours']}** | {cells['uniform']} | {cells['l1']} | "
            f"{_versus(rs) if baselines else '-'} | "
            f"{'; '.join(f'{statistics.mean(v):.3f}' if v else '-' for v in land.values())} | "
            f"{p0['soft_epochs']} + {p0['settle_epochs']} |")
    return "\n".join(lines)


def holdout_table(rows: list[dict]) -> str:
    """Test accuracy on the holdout (compare's ``holdout_acc``) per budget and method, mean ± std
    over the seeds (marked, as in ``table``, with the seeds a pruned network was not at the budget),
    and ours minus each rival paired per seed, for the rows scored on it."""
    scored = [r for r in rows if "holdout" in r.get("compare", {})]
    n = scored[0]["compare"]["holdout"]["images"]
    rivals = ("uniform", "l1", "unpruned")
    lines = [f"Holdout: {n:,} images of the source the prepare stage left out (`--holdout-per-class`)\n",
             "| budget | seeds | student | ours | uniform | Torch-Pruning L1 | unpruned, as long | "
             "ours - uniform, paired | ours - L1, paired | ours - unpruned, paired |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for b in sorted({r["budget"] for r in scored}):
        runs = [r for r in scored if r["budget"] == b]
        rs = [r["compare"] for r in runs]
        cells = [mean_std([c[m]["holdout_acc"] for c in rs if m in c])
                 + (_marks([j[2] for r in runs if (j := judged(r, m))]) if m in ("ours", "uniform", "l1") else "")
                 for m in ("student", "ours", *rivals)]
        diffs = [mean_std([c["ours"]["holdout_acc"] - c[m]["holdout_acc"] for c in rs if m in c]) for m in rivals]
        seeds = ", ".join(str(r["seed"]) for r in scored if r["budget"] == b)
        lines.append(f"| {b:g} | {seeds} | " + " | ".join(cells + diffs) + " |")
    return "\n".join(lines)


def _sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def pareto_points(rows: list[dict], key: str = "test_acc") -> list[dict]:
    """Per budget and method: mean test accuracy and mean measured latency over the seeds, each with
    its standard deviation as the error bar, and ``not_at_budget``: the seeds the ``Budget`` rule put
    over the budget or below its band. With baselines, every method's latency and status are the
    compare stage's final measurement (all final networks and the student in one interleaved run),
    ours included. The student is one network: one point, over every run. ``key="holdout_acc"``:
    the accuracy on the holdout instead (every row must have been scored on it)."""
    series: dict[tuple[str, float | None], list[tuple[float, float, str]]] = {}
    held = key != "test_acc"
    for r in sorted((r for r in rows if "failed" not in r), key=lambda r: r["budget"]):
        pr, c = r["prune"], r.get("compare", {})
        series.setdefault(("student", None), []).append(
            (pr["student_ms"], c["student"][key] if held else pr["test_acc_student"], "student"))
        for m, label in (("ours", "ours"), ("uniform", "uniform width scaling"), ("l1", "Torch-Pruning L1"),
                         ("unpruned", "student trained as long")):
            j = judged(r, m)
            if j is not None:
                acc = pr["test_acc"] if m == "ours" and not held else c[m][key]
                series.setdefault((label, r["budget"]), []).append((j[0], acc, j[2]))
    student = series.pop(("student", None), None)
    if student:
        series[("student", None)] = student
    points = []
    for (method, b), v in series.items():
        ms, acc = [x[0] for x in v], [x[1] for x in v]
        points.append({"method": method, "budget": b, "seeds": len(v), "latency_ms": statistics.mean(ms),
                       "latency_err": _sd(ms), "accuracy": statistics.mean(acc), "accuracy_err": _sd(acc),
                       "not_at_budget": sum(x[2] in ("over", "below_band") for x in v)})
    return points


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upstream", type=Path, required=True, help="work directory with artifacts/{prepare,teachers,"
                   "student,profile} and its params.yaml (python -m stages ... --until profile)")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--preset", default=None, help="take the params from this preset on today's params.yaml "
                   "(default: the upstream's params.yaml)")
    p.add_argument("--params", type=Path, default=None, help="params file for every run (default: the upstream's "
                   "params.yaml; an upstream built by an older revision needs today's)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="params overrides for every run")
    p.add_argument("--only-ours", action="store_true", help="skip the baselines (ablations)")
    p.add_argument("--holdout-per-class", type=int, default=0, metavar="N",
                   help="also score every network on up to N images per class of the source that the upstream's "
                   "prepare stage left out (OUT/holdout.npz; needs prepare.max_per_class and the baselines' "
                   "compare run: with --set 'compare.methods=[]' it scores ours alone)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if problem := check_overrides(args.set):
        p.error(problem)
    if args.preset:  # today's defaults and the preset (the upstream's own params may be older)
        from pipeline.preset import resolve

        params = resolve(args.preset)
    else:
        params = yaml.safe_load((args.params or args.upstream / "params.yaml").read_text())
    for a in args.set:
        set_key(params, a)
    if args.holdout_per_class and args.only_ours:
        p.error("--holdout-per-class needs the compare run (it scores the networks); drop --only-ours and set "
                "'compare.methods=[]' to score ours alone")
    holdout = make_holdout(args.upstream, args.out / "holdout.npz", args.holdout_per_class) \
        if args.holdout_per_class else None
    rows = []
    for b in args.budgets:
        for s in args.seeds:
            rows.append(run_pair(args.upstream, args.out, params, b, s, not args.only_ours, holdout))
            print(json.dumps({k: v for k, v in rows[-1].items() if k in ("budget", "seed", "failed")}), flush=True)
    text = (f"## Pruning protocol ({date.today()}), machine: {machine()}; upstream {args.upstream}; "
            f"overrides {args.set or 'none'}\n\n" + table(rows, not args.only_ours))
    if any("holdout" in r.get("compare", {}) for r in rows):
        text += "\n\n" + holdout_table(rows)
    print("\n" + text)
    write_results(args.out, "rows.json", rows, text)
    ran = [r for r in rows if "failed" not in r]
    held = bool(ran) and all("holdout" in r.get("compare", {}) for r in ran)
    points = pareto_points(rows, "holdout_acc" if held else "test_acc")
    if points:
        from pipeline.plots import pareto_png

        (args.out / "pareto.json").write_text(json.dumps(points, indent=1))
        what = f"holdout accuracy ({ran[0]['compare']['holdout']['images']:,} images)" if held else "accuracy"
        pareto_png(points, args.out / "pareto.png", f"{what} vs measured latency, {len(args.seeds)} seeds ({machine()})",
                   "points: mean over seeds; error bars: standard deviation over seeds (accuracy and measured latency)",
                   ylabel="holdout accuracy (%)" if held else "test accuracy (%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
