"""Pruning a trained model: ours against the peers a user would pick, at equal measured latency.

    python -m benchmarks.trained_model --out benchmarks/results/trained_model \\
        [--size 32 --per-class 200 --test-per-class 300 --budgets 0.5 0.3 --seeds 0 1 2]

1. The README's setting (benchmarks/your_model.py): CIFAR-10 JPEGs (../shared/data/cifar10-jpeg) as
   disjoint ``train/<class>/``, ``val/<class>/`` and ``test/<class>/`` folders at ``--size`` px, and
   torchvision's ``resnet18`` trained *outside the pipeline* on ``train/`` only (plain torch),
   given as a plain ``state_dict``.
2. The upstream, through the stage entry points: ``prepare`` (the folder's own val/ and test/),
   ``train_teacher`` taking the weights as they are (``epochs: 0``), ``profile`` of that network.
   ``test/`` is the held-out set: no stage trains on it or selects by it (best epochs, the closed
   loop's costs and the baselines' choices use val/, which the outside training did not see).
3. For every budget (a fraction of the trained model's measured latency) and seed, the real
   ``prune`` and ``compare`` stages (benchmarks/prune_protocol.py's ``run_pair``): ours
   (``prune.method: taylor``, the default), and under compare's protocol from the same trained
   model, with the same distillation from it and the same ``prune.epochs`` of training:
   uniform width scaling, Torch-Pruning group L2 norm (``tp_norm``) and group Taylor
   (``tp_taylor``), both global with ``round_to`` the latency table's channel step. Every network
   is judged by compare's verdict: read in pairs with the unpruned model, the median of the readings. The seed's soft-mask
   method (``prune.method: scp``) runs as ours with that one key changed (its latency: the prune
   stage's own reading).

``--variant KEY=VALUE ...`` runs ours once more with those params changed (judged by compare alone)
and compares it per seed with the same peers, which are not re-run.

Writes ``rows.json`` and ``table.md`` (mean ± std over seeds of test accuracy; measured latency /
budget; ours minus the best peer at the budget, per seed, mean ± std) into ``--out``; the stage
runs stay in ``--work`` (re-running skips the finished pairs). Needs the CIFAR-10 archive.
TensorRT Model Optimizer's FastNAS runs from these runs in ``benchmarks/fastnas.py`` (not a project dependency).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

import yaml

from benchmarks._runner import REPO, machine, run_stage, write_params, write_results
from benchmarks.latency_model import check_overrides, set_key
from benchmarks.prune_protocol import judged, run_pair
from benchmarks.your_model import ARCHIVE, make_folder, train_outside

PEERS = ("uniform", "tp_norm", "tp_taylor")
LABELS = {"ours": "ours (taylor)", "scp": "ours with prune.method scp", "uniform": "uniform width scaling",
          "tp_norm": "Torch-Pruning group L2 norm", "tp_taylor": "Torch-Pruning group Taylor",
          "fastnas": "TensorRT Model Optimizer FastNAS (benchmarks/fastnas.py)"}


def upstream(work: Path, size: int, per_class: int, val_per_class: int, test_per_class: int, epochs: int,
             prune_epochs: int) -> Path:
    """The folder, the outside-trained model and the upstream stages (prepare, import, profile)."""
    up = work / "upstream"
    if (up / "artifacts" / "profile" / "latency_table.json").is_file():
        return up
    data = work / "data"
    if not (data / "val").is_dir():
        classes = make_folder(data, per_class, test_per_class + val_per_class, size, seed=0)
        for cls in classes:  # the first val_per_class of each test/ class become val/: a split of its own
            (data / "val" / cls).mkdir(parents=True)
            for f in sorted((data / "test" / cls).iterdir())[:val_per_class]:
                f.rename(data / "val" / cls / f.name)
    classes = sorted(p.name for p in (data / "train").iterdir())
    weights = work / "weights" / "mine.pt"
    if not weights.is_file():
        outside = train_outside(data, classes, epochs, 0, weights)
        (work / "outside.json").write_text(json.dumps(outside, indent=1))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"].update(source="imagefolder", root=str(data), image_size=size)
    params["teachers"] = {"mine": {"arch": "torchvision:resnet18", "weights": str(weights), "epochs": 0}}
    params["compress"] = {"model": "artifacts/teachers/mine"}
    params["distill"]["mode"] = "ensemble"  # from the unpruned model itself, the usual recipe
    params["train"]["progress"] = False
    params["prune"].update(epochs=prune_epochs, progress=False)
    params["compare"]["methods"] = list(PEERS)
    pfile = write_params(up, params)
    a = up / "artifacts"
    run_stage("prepare", "--out", str(a / "prepare"), "--metrics", str(up / "metrics" / "prepare.json"), params=pfile)
    run_stage("train_teacher", "--name", "mine", "--data", str(a / "prepare"), "--out", str(a / "teachers" / "mine.pt"),
              "--metrics", str(up / "metrics" / "mine.json"), "--plots", str(up / "plots" / "mine.csv"),
              "--weights-dir", str(weights.parent), "--resume-dir", str(up / ".resume"), params=pfile)
    (a / "student").mkdir(parents=True, exist_ok=True)  # prune_protocol's runs read the model to prune here
    for suffix in (".pt", ".arch.json"):
        link = a / "student" / f"model{suffix}"
        if not link.exists():
            os.symlink(a / "teachers" / f"mine{suffix}", link)
    run_stage("profile", "--data", str(a / "prepare"), "--arch", str(a / "teachers" / "mine.arch.json"),
              "--out", str(a / "profile" / "latency_table.json"), "--metrics", str(up / "metrics" / "profile.json"),
              "--plots-dir", str(up / "plots" / "profile"), params=pfile)
    return up


def pct_mean_std(xs: list[float]) -> str:
    """Fractions as percent: one value as it is, several as mean ± sample std, none as '-'."""
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{100 * xs[0]:.2f}"
    return f"{100 * statistics.mean(xs):.2f} ± {100 * statistics.stdev(xs):.2f}"


def method_cell(rs: list[dict[str, Any]], method: str) -> dict[str, Any]:
    """A method's test accuracies, measured / budget and ``Budget`` status, per run of ``rs`` it ran in
    (compare's verdict; ours' accuracy from the prune stage)."""
    cell: dict[str, Any] = {"test_acc": [], "over_budget": [], "status": []}
    for r in rs:
        if (j := judged(r, method)) is not None:
            cell["test_acc"].append(r["prune"]["test_acc"] if method == "ours" else r["compare"][method]["test_acc"])
            cell["over_budget"].append(j[1])
            cell["status"].append(j[2])
    return cell


def summarise(rows: list[dict[str, Any]], scp: list[dict[str, Any]],
              fastnas: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Per budget: each method's test accuracies and measured / budget per seed, and ours minus the
    best peer that met the budget (compare's verdict: not over it), per seed. ``fastnas``: the rows
    of benchmarks/fastnas.py from the same runs; FastNAS then counts as a peer in the seeds it ran
    (judged by its own verdict, read in a pair with the model)."""
    out: dict[str, Any] = {}
    for b in sorted({r["budget"] for r in rows}, reverse=True):
        rs = [r for r in rows if r["budget"] == b and "failed" not in r]
        cell: dict[str, Any] = {"seeds": [r["seed"] for r in rs],
                                "failed": [r for r in rows if r["budget"] == b and "failed" in r]}
        for m in ("ours", *PEERS):
            cell[m] = method_cell(rs, m)
        s = [r for r in scp if r["budget"] == b and "failed" not in r]
        cell["scp"] = {"test_acc": [r["prune"]["test_acc"] for r in s],
                       "over_budget": [r["prune"]["measured_over_budget"] for r in s],
                       "status": [r["prune"].get("budget_status", "prune stage") for r in s]}
        fn = {f["seed"]: f for f in fastnas or [] if f["budget"] == b}
        ran = [fn[r["seed"]] for r in rs if r["seed"] in fn]
        cell["fastnas"] = {"seeds": [f["seed"] for f in ran], "test_acc": [f["test_acc"] for f in ran],
                           "over_budget": [f["verdicts"]["fastnas"]["measured_over_budget"] for f in ran],
                           "status": [f["verdicts"]["fastnas"]["budget_status"] for f in ran]}
        diffs, best, best_acc = [], [], {}
        for r in rs:
            ours = judged(r, "ours")
            peers = {m: r["compare"][m]["test_acc"] for m in PEERS if (j := judged(r, m)) and j[2] != "over"}
            if (f := fn.get(r["seed"])) and f["verdicts"]["fastnas"]["budget_status"] != "over":
                peers["fastnas"] = f["test_acc"]
            if not peers:
                continue
            m = max(peers, key=peers.__getitem__)
            best_acc[r["seed"]] = peers[m]  # whether or not ours met the budget: a variant of ours compares with it
            if ours is not None and ours[2] != "over":
                diffs.append(r["prune"]["test_acc"] - peers[m])
                best.append(m)
        cell["ours_minus_best_peer"] = diffs
        cell["best_peer"] = best
        cell["best_peer_test_acc"] = best_acc  # seed -> the best peer's accuracy
        cell["unpruned_test_acc"] = rs[0]["compare"]["student"]["test_acc"] if rs else None
        out[f"{b:g}"] = cell
    return out


def add_variant(summary: dict[str, Any], variant: list[dict[str, Any]], label: str) -> None:
    """Ours run again with one setting changed (``variant``: pairs whose compare judged ours alone), per
    budget: its test accuracies, verdicts, and its difference from the best peer of the same seed in
    the summary (the peers are not re-run: same weights, same seed)."""
    for b, cell in summary.items():
        best = cell["best_peer_test_acc"]
        vs = [v for v in variant if f"{v['budget']:g}" == b and "failed" not in v]
        c = method_cell(vs, "ours")
        c["minus_best_peer"] = [acc - best[v["seed"]] for v, acc, status in zip(vs, c["test_acc"], c["status"])
                                if v["seed"] in best and status != "over"]
        cell["variant"] = {"label": label, "seeds": [v["seed"] for v in vs], **c}


def _method_row(b: str, label: str, c: dict[str, Any]) -> str:
    land = ", ".join(f"{x:.3f}" for x in c["over_budget"])
    bad = c["status"].count("over")
    return f"| {b} | {label} | {pct_mean_std(c['test_acc'])} | {land or '-'} | {f'in {bad} seed(s)' if bad else 'no'} |"


def table(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    o = meta["outside"]
    lines = [f"Pruning a trained model ({o['arch']} trained outside the pipeline, {o['epochs']} epochs on "
             f"{o['train_images']} CIFAR-10 JPEGs at {meta['size']} px; held-out test/: {o['test_images']} images no "
             f"stage trains or selects on), {meta['machine']}, {meta['date']}, commit {meta['commit']}",
             f"`{meta['command']}`", "",
             "| budget (of the model's measured latency) | method | test accuracy, mean ± std over seeds (%) | "
             "measured / budget per seed | over the budget |",
             "|---|---|---|---|---|"]
    for b, cell in summary.items():
        unp = cell["unpruned_test_acc"]
        lines.append(f"| {b} | the trained model, unpruned | {pct_mean_std([unp] if unp is not None else [])} | - | - |")
        if u := meta.get("unpruned_trained"):
            lines.append(f"| {b} | the trained model, unpruned, fine-tuned as every method (seeds "
                         f"{', '.join(map(str, u['seeds']))}) | {pct_mean_std(u['test_acc'])} | - | - |")
        for m in ("ours", "scp", *PEERS, "fastnas"):
            if m != "fastnas" or cell[m]["test_acc"]:
                lines.append(_method_row(b, LABELS[m], cell[m]))
        lines.append(f"| {b} | **ours - best peer at the budget** (points, per seed) | "
                     f"{pct_mean_std(cell['ours_minus_best_peer'])} | {', '.join(f'{100 * d:+.2f}' for d in cell['ours_minus_best_peer'])} | "
                     f"best peer: {', '.join(cell['best_peer'])} |")
        if v := cell.get("variant"):
            lines.append(_method_row(b, f"{v['label']} (seeds {', '.join(map(str, v['seeds']))})", v))
            lines.append(f"| {b} | **{v['label']} - best peer of the same seed** (points) | {pct_mean_std(v['minus_best_peer'])} | "
                         f"{', '.join(f'{100 * d:+.2f}' for d in v['minus_best_peer'])} | |")
    lines += ["", "Measured / budget: compare's verdict (every network read in a pair with the unpruned model, "
              "the median of `compare.timing_readings` such readings); scp: the prune stage's own reading."
              + (" scp not run (`--skip-scp`)." if meta.get("scp_skipped") else "") + (f" {meta['scp_from']}." if meta.get("scp_from") else ""),
              "TensorRT Model Optimizer's FastNAS: " + meta["fastnas"]]
    if meta.get("overrides"):
        lines.append(f"Params changed for every method (ours, the peers, scp, FastNAS): {', '.join(meta['overrides'])}.")
    return "\n".join(lines)


FASTNAS_NOTE = ("measured by benchmarks/fastnas.py from the same trained model and these runs' budgets "
                "(benchmarks/results/fastnas/table.md): nvidia-modelopt is not a project dependency.")


DEFAULT_WORK = Path("/tmp/slimdeploy_trained_model")


def runs_dir(work: Path, sets: list[str]) -> Path:
    """Where the pairs of one setting live: ``WORK/runs``, or ``WORK/runs_<KEY=VALUE>...`` with ``--set``."""
    return work / ("runs" + "".join(f"_{a}" for a in sets).replace("/", "_"))


def unpruned_reference(up: Path, runs: Path, params: dict[str, Any], budget: float,
                       seeds: list[int]) -> list[dict[str, Any]]:
    """Compare's ``unpruned`` method for each seed: the whole trained model fine-tuned as every method
    is (same distillation, optimizer and epochs). Each pair is run in ``RUNS_unpruned`` on a copy of the
    finished prune outputs of ``runs``' pair, so the prune stage is not run again."""
    out = []
    p = json.loads(json.dumps(params))
    p["compare"]["methods"] = ["unpruned"]
    dest = runs.with_name(f"{runs.name}_unpruned")
    for seed in seeds:
        src, dst = (d / f"budget{budget:g}_seed{seed}" for d in (runs, dest))
        if not (src / "metrics" / "prune.json").is_file():
            raise SystemExit(f"--unpruned-reference: {src} has no finished prune run")
        if not (dst / "metrics" / "prune.json").is_file():
            for rel in ("params.yaml", "metrics/prune.json", "artifacts/prune/masks.json", "artifacts/prune/model.pt"):
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / rel, dst / rel)
        out.append(run_pair(up, dest, p, budget, seed, baselines=True))
    return out


def fastnas_rows(paths: list[Path], work: Path, sets: list[str]) -> list[dict[str, Any]]:
    """The rows of benchmarks/fastnas.py result files, each checked to come from the same ``--work``
    (the same trained model and runs) and the same ``--set`` overrides (the same fine-tuning)."""
    rows = []
    for path in paths:
        try:
            result = json.loads(path.read_text())
            meta, found = result["meta"], result["rows"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"--fastnas {path}: not a rows.json of benchmarks/fastnas.py ({err})") from err
        cmd = meta.get("command", "").split()
        ran_in = Path(meta.get("work") or (cmd[cmd.index("--work") + 1] if "--work" in cmd else DEFAULT_WORK))
        if ran_in.resolve() != work.resolve():
            raise ValueError(f"--fastnas {path}: it ran on --work {ran_in}, this run's is {work}")
        if meta.get("overrides", []) != sets:
            raise ValueError(f"--fastnas {path}: it ran with --set {meta.get('overrides', []) or 'none'}, "
                             f"this run has --set {sets or 'none'}: the same fine-tuning for every method")
        rows += found
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "trained_model")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--per-class", type=int, default=200)
    p.add_argument("--val-per-class", type=int, default=50)
    p.add_argument("--test-per-class", type=int, default=300)
    p.add_argument("--epochs", type=int, default=15, help="epochs of the outside training")
    p.add_argument("--prune-epochs", type=int, default=6, help="prune.epochs: every method's training")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.3])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budget-seeds", nargs="+", default=[], metavar="BUDGET:SEED,SEED",
                   help="other seeds for one budget (e.g. 0.5:0,1,2,3,4), in place of --seeds there")
    p.add_argument("--fastnas", type=Path, nargs="+", default=[],
                   help="rows.json files of benchmarks/fastnas.py from these runs: FastNAS counts as a peer where it ran")
    p.add_argument("--aim", type=float, default=None,
                   help="also run ours with prune.aim set to this (where in the band the allocation aims), judged by "
                        "compare alone (no peers re-run), compared per seed with the same peers")
    p.add_argument("--variant", nargs="+", default=[], metavar="KEY=VALUE",
                   help="also run ours with these params changed (on top of --set), judged by compare alone (no peers "
                        "re-run), compared per seed with the same peers; e.g. prune.taylor_labels=sampled")
    p.add_argument("--set", dest="sets", nargs="+", default=[], metavar="KEY=VALUE",
                   help="params overrides for every method's runs (ours, the peers, scp, the variant), e.g. "
                        "prune.optimizer.lr=0.01; the runs then go to WORK/runs_<overrides>")
    p.add_argument("--unpruned-reference", action="store_true",
                   help="also fine-tune the whole trained model as every method is (compare's unpruned method), once "
                        "per seed of the first budget, with ours' prune run of that pair reused: the reference none "
                        "of the pruned networks is held to, the model trained as long")
    p.add_argument("--skip-scp", action="store_true",
                   help="run ours and the peers only (a later run without it adds the scp rows to the finished pairs)")
    p.add_argument("--scp-from", type=Path, default=None,
                   help="take the scp rows from this earlier runs directory instead of running them (the table says so)")
    args = p.parse_args(argv)
    try:
        budget_seeds = {float(b): [int(x) for x in ss.split(",")]
                        for b, ss in (item.split(":") for item in args.budget_seeds)}
    except ValueError:
        p.error(f"--budget-seeds: expected BUDGET:SEED,SEED,... such as 0.5:0,1,2,3,4, got {args.budget_seeds}")
    if stray := sorted(set(budget_seeds) - set(args.budgets)):
        p.error(f"--budget-seeds: budget {', '.join(f'{b:g}' for b in stray)} is not in --budgets "
                f"({' '.join(f'{b:g}' for b in args.budgets)}); add it there")
    if args.aim is not None and args.variant:
        p.error("--aim and --variant: give one (--aim A is --variant prune.aim=A)")
    if problem := check_overrides(args.sets) or check_overrides(args.variant, "--variant"):
        p.error(problem)
    try:
        fastnas = fastnas_rows(args.fastnas, args.work, args.sets) if args.fastnas else None
    except ValueError as err:
        p.error(str(err))
    if not ARCHIVE.is_file():
        print(f"error: needs {ARCHIVE} (CIFAR-10 JPEGs)", file=sys.stderr)
        return 2
    up = upstream(args.work, args.size, args.per_class, args.val_per_class, args.test_per_class, args.epochs,
                  args.prune_epochs)
    params = yaml.safe_load((up / "params.yaml").read_text())
    for assignment in args.sets:
        set_key(params, assignment)
    runs = runs_dir(args.work, args.sets)  # each setting has its own runs
    scp_params = json.loads(json.dumps(params))
    scp_params["prune"]["method"] = "scp"
    variant = [f"prune.aim={args.aim:g}"] if args.aim is not None else args.variant
    variant_params = json.loads(json.dumps(params))
    for assignment in variant:
        set_key(variant_params, assignment)
    variant_params["compare"]["methods"] = []  # compare judges ours alone, with the budget's protocol
    # --aim keeps the folder name its earlier runs have
    variant_runs = runs.with_name(f"{runs.name}_aim{args.aim:g}" if args.aim is not None else
                                  runs_dir(args.work, [*args.sets, *variant]).name)
    varied = []
    rows, scp = [], []
    for b in args.budgets:
        for s in budget_seeds.get(b, args.seeds):
            rows.append(run_pair(up, runs, params, b, s, baselines=True))
            if variant:
                varied.append(run_pair(up, variant_runs, variant_params, b, s, baselines=True))
            if args.skip_scp:
                continue
            if args.scp_from is None:
                scp.append(run_pair(up, runs.with_name(f"{runs.name}_scp"), scp_params, b, s, baselines=False))
            elif (args.scp_from / f"budget{b:g}_seed{s}" / "metrics" / "prune.json").is_file():
                scp.append(run_pair(up, args.scp_from, scp_params, b, s, baselines=False))  # finished: read, not run
    unpruned = unpruned_reference(up, runs, params, args.budgets[0], budget_seeds.get(args.budgets[0], args.seeds)) \
        if args.unpruned_reference else []
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    meta = {"machine": machine(), "date": date.today().isoformat(), "commit": commit, "size": args.size,
            "outside": json.loads((args.work / "outside.json").read_text()), "fastnas": FASTNAS_NOTE if fastnas is None else (
                f"its rows (from {', '.join(map(str, args.fastnas))}, written by benchmarks/fastnas.py from these runs) are in the table and "
                "count as a peer in the seeds it ran"),
            "overrides": args.sets, "scp_skipped": args.skip_scp, "scp_from": None if args.scp_from is None else (
                f"scp rows read from {args.scp_from.name} (an earlier run of this benchmark, not re-run for time; its "
                "closed loop took one reading per measurement, prune.loop_readings 1)"),
            "command": "python -m benchmarks.trained_model " + " ".join(argv if argv is not None else sys.argv[1:])}
    if unpruned:  # the whole model fine-tuned as every method is
        meta["unpruned_trained"] = {"seeds": [u["seed"] for u in unpruned],
                                    "test_acc": [u["compare"]["unpruned"]["test_acc"] for u in unpruned]}
    summary = summarise(rows, scp, fastnas)
    if variant:
        add_variant(summary, varied, "ours, " + ", ".join(a.replace("=", " ") for a in variant))
    write_results(args.out, "rows.json", {"meta": meta, "summary": summary, "rows": rows, "scp": scp,
                                          **({"unpruned": unpruned} if unpruned else {})},
                  table(summary, meta))
    print(table(summary, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
