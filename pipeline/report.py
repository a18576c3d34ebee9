"""Print a short results table from the pipeline's metrics files.

Usage: ``python -m pipeline.report [--metrics-dir metrics]`` (``make run`` calls it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pipeline.io import read_json


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def rows(metrics_dir: Path) -> list[tuple[str, str, str, str, str]]:
    """(model, arch, params, test accuracy, seconds per epoch) rows for what exists."""
    out = []
    for f in sorted((metrics_dir / "teachers").glob("*.json")):
        m: dict[str, Any] = read_json(f)
        out.append((f"teacher {m['name']}", m["arch"], f"{m['params']:,}", _pct(m["test_acc"]),
                    f"{m['epoch_seconds_median']:.2f}"))
    ens = metrics_dir / "ensemble.json"
    if ens.is_file():
        e = read_json(ens)
        out.append(("ensemble (mean softmax)", "-", "-", _pct(e["ensemble_acc"]), "-"))
        out.append(("oracle (any teacher right)", "-", "-", _pct(e["oracle_acc"]), "-"))
    stu = metrics_dir / "student.json"
    if stu.is_file():
        m = read_json(stu)
        out.append((f"student (searched, {m['distill']['mode']} KD)", "cifar_resnet", f"{m['params']:,}",
                    _pct(m["test_acc"]), f"{m['epoch_seconds_median']:.2f}"))
    pr = metrics_dir / "prune.json"
    if pr.is_file():
        m = read_json(pr)
        out.append((f"pruned to {m['budget_ms']:.3f} ms, measured {m['measured_ms']:.3f} ms", "cifar_resnet",
                    f"{m['params']:,}", _pct(m["test_acc"]), "-"))
    cmp_ = metrics_dir / "compare.json"
    if cmp_.is_file():
        m = read_json(cmp_)
        for method, label in (("ours", "pruned (ours), compare's joint run"), ("uniform", "uniform scaling"),
                              ("l1", "Torch-Pruning L1"), ("unpruned", "student trained as long")):
            if method in m and "measured_ms" in m[method]:
                r = m[method]
                where = (f", {r['measured_over_budget']:.3f} of budget, {r['budget_status']}"
                         if "budget_status" in r else "")
                out.append((f"{label}, measured {r['measured_ms']:.3f} ms{where}", "-", f"{r['params']:,}",
                            _pct(r["test_acc"]), "-"))
    return out


def budget_notes(metrics_dir: Path) -> list[str]:
    """What the table cannot say by itself: which compared networks were not at the budget in
    compare's final joint measurement (``pipeline.prune.Budget``: over it, or below its band), so
    that their accuracy is not a comparison at equal latency."""
    path = metrics_dir / "compare.json"
    if not path.is_file():
        return []
    m = read_json(path)
    out = []
    for method in ("ours", "uniform", "l1"):
        status = m.get(method, {}).get("budget_status")
        if status == "over":
            out.append(f"NOTE: {method} read over the budget in compare's joint run ({m[method]['budget_verdict']}): "
                       "its accuracy is not a comparison at equal latency.")
        elif status == "below_band":
            out.append(f"NOTE: {method} read below the budget's band in compare's joint run: it meets the budget "
                       "with latency to spare, so it is compared at a lower latency than the others.")
    return out


def format_table(table: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, table)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--metrics-dir", default="metrics", type=Path)
    args = p.parse_args(argv)
    table = rows(args.metrics_dir)
    if not table:
        print(f"no metrics under {args.metrics_dir}; run `dvc repro` first", file=sys.stderr)
        return 1
    print(format_table(table, ("model", "arch", "params", "test acc", "s/epoch")))
    for note in budget_notes(args.metrics_dir):
        print(note)
    pr = args.metrics_dir / "prune.json"
    prec = args.metrics_dir / "precision.json"
    m = read_json(prec) if prec.is_file() else {}
    if m.get("requested") == "auto":
        print(f"\nprecision {m['precision']} (target.precision auto): {m['why']}")
    prof = args.metrics_dir / "profile.json"
    if prof.is_file():
        m = read_json(prof)
        pr_ = m["predictor"]
        print(f"\nlatency on {m['backend']} / {m['device']['name']} (batch {m['batch_size']}): full {m['arch']} "
              f"{m['full_latency_ms']:.3f} ms; channel step {m['multiple']} ({m['step']['source']}); predictor "
              f"held-out MAPE {100 * pr_['heldout_mape']:.1f}% (max {100 * pr_['heldout_max_ape']:.1f}%, "
              f"{100 * pr_['heldout_within_10pct']:.0f}% within 10%, Spearman {pr_['heldout_spearman']:.3f}) on "
              f"{pr_['heldout_samples']} sub-networks")
        for warning in m.get("warnings", []):
            print(f"WARNING: {warning}")
    slim = args.metrics_dir / "slim.json"
    if slim.is_file():
        m = read_json(slim)
        print(f"slim: latency {m['latency_before_ms']:.3f} -> {m['latency_after_ms']:.3f} ms, max |slim - masked| "
              f"{m['max_abs_diff_vs_masked']:.1e}")
    if pr.is_file():
        m = read_json(pr)
        print(f"prune ({m.get('method', 'scp')}): budget {m['budget_ms']:.4f} ms, measured {m['measured_ms']:.4f} ms ({m['measured_over_budget']:.3f} "
              f"of budget, {m['loop_status']}), predicted {m['predicted_ms']:.4f} ms; closed loop "
              f"{m['loop_iterations']} iteration(s); {len(m.get('removed_blocks', []))} of "
              f"{m.get('removable_blocks', 0)} removable blocks removed; smallest reachable network "
              f"{m['smallest_network_ms'] / m['student_ms']:.3f} of the student")
    prep = args.metrics_dir / "prepare.json"
    if prep.is_file():
        m = read_json(prep)
        print(f"\ndata: {m['source']}, {m['num_classes']} classes, train/val/test = "
              f"{m['train_images']}/{m['val_images']}/{m['test_images']}")
    return 0


if __name__ == "__main__":
    from pipeline.cli import run_main  # exit quietly when the output pipe closes (`| head -1`)

    sys.exit(run_main(main))
