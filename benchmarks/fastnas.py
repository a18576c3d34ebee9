"""TensorRT Model Optimizer's FastNAS against ours, from the same trained model, at equal measured latency.

    pip install --target /tmp/modelopt --no-deps -r benchmarks/requirements-fastnas.txt
    PYTHONPATH=/tmp/modelopt python -m benchmarks.fastnas --out benchmarks/results/fastnas \\
        [--work /tmp/slimdeploy_trained_model --budgets 0.5 0.3 --seeds 0 1 2]

nvidia-modelopt is not a dependency of the project (the pins in benchmarks/requirements-fastnas.txt
are what this script was run with; ``--no-deps`` keeps the project's own pins untouched). It reads
what ``python -m benchmarks.trained_model`` left in ``--work``: the upstream (the folder, the model
trained outside the pipeline, its latency table) and, per budget and seed, the prune stage's run
(its ``Budget`` and ours' network).

1. FastNAS as its documentation sets it up for a trained vision model: ``mtp.prune(model,
   "fastnas", {"flops": "<p>%"}, dummy_input, config)``, the score the accuracy on ``val/`` (the
   split every other method selects on), BatchNorm statistics re-estimated on training batches,
   its default channel ratios (5% steps) with ``channel_divisor`` the latency table's measured
   step (as Torch-Pruning's ``round_to``). FastNAS constrains FLOPs or parameters, not latency:
   one search per FLOPs percentage in ``--flops``, all sharing one sensitivity map (its checkpoint).
2. Every subnet measured in a pair with the trained model (``pipeline.compare.paired_measure``,
   compare's protocol: ``compare.timing_passes`` windows over ``compare.timing_span_s``, the median
   of ``compare.timing_readings`` readings). Per budget and seed, the largest subnet that measures at
   most the band's top of that run's ``Budget`` is taken, as compare matches every baseline.
3. Trained with compare's ``FineTune``: the same distillation from the unpruned model, optimizer,
   ``prune.epochs`` and seed as every method of the trained_model benchmark; test accuracy on
   ``test/``, which no stage trains or selects on.
4. Judged with ours (that run's prune-stage network), each in a pair with the trained model, by the
   budget's rule (``pipeline.compare.judge``).

Writes ``rows.json`` and ``table.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from benchmarks._runner import REPO, machine, write_results
from benchmarks.latency_model import check_overrides, set_key
from benchmarks.trained_model import DEFAULT_WORK, pct_mean_std, runs_dir


def _modelopt() -> Any:
    try:
        import modelopt  # noqa: F401
        import modelopt.torch.prune as mtp
    except ImportError as err:
        raise SystemExit(f"error: needs nvidia-modelopt ({err}); install it as this script's docstring says: "
                         "pip install --target /tmp/modelopt --no-deps -r benchmarks/requirements-fastnas.txt, "
                         "then PYTHONPATH=/tmp/modelopt") from err
    return mtp


def search_subnets(student: nn.Module, data: Any, step: int, flops: list[float], ckpt: Path,
                   calib_batches: int, batch_size: int) -> list[dict[str, Any]]:
    """One FastNAS subnet per FLOPs percentage (the sensitivity map computed once, in ``ckpt``)."""
    mtp = _modelopt()
    from pipeline.data import normalize
    from pipeline.flops import count_params
    from pipeline.train import test_accuracy

    mean, std = data.norm()
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data.train), generator=gen)[:calib_batches * batch_size]
    calib = [normalize(data.train.take(order[i:i + batch_size]), mean, std)
             for i in range(0, len(order), batch_size)]
    cpu = torch.device("cpu")

    def score(model: nn.Module) -> float:
        return test_accuracy(model, data, cpu, split=data.val)

    rules = {kind: {"*": {"channel_divisor": step}} for kind in ("nn.Conv2d",)}
    rules.update({kind: {"*": {"feature_divisor": step}} for kind in ("nn.BatchNorm2d", "nn.Linear")})
    example = torch.zeros(1, data.channels, *data.meta["image_size"])
    out = []
    for pct in flops:
        t0 = time.perf_counter()
        model = copy.deepcopy(student).eval()
        subnet, _state = mtp.prune(model, [("fastnas", rules)], {"flops": f"{100 * pct:g}%"}, example,
                                   {"data_loader": calib, "collect_func": lambda b: b, "score_func": score,
                                    "checkpoint": str(ckpt), "verbose": False})
        subnet = subnet.eval()
        widths = {n: m.out_channels for n, m in subnet.named_modules() if isinstance(m, nn.Conv2d)}
        out.append({"flops": pct, "model": subnet, "widths": widths, "params": count_params(subnet),
                    "val_acc": score(subnet), "seconds": time.perf_counter() - t0})
        print(f"FastNAS flops <= {100 * pct:g}%: {count_params(subnet)} parameters, val acc "
              f"{out[-1]['val_acc']:.4f} ({out[-1]['seconds']:.0f} s)", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "fastnas")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.3])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--flops", type=float, nargs="+",
                   default=[0.12, 0.16, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7],
                   help="FLOPs constraints, fractions of the model's")
    p.add_argument("--runs", type=Path, default=None,
                   help="the trained_model benchmark's runs (default: those of --work and --set, as it names them)")
    p.add_argument("--set", dest="sets", nargs="+", default=[], metavar="KEY=VALUE",
                   help="params overrides, as the trained_model run of --runs had them (e.g. prune.optimizer.lr=0.01)")
    p.add_argument("--calib-batches", type=int, default=2, help="training batches re-estimating BatchNorm statistics")
    args = p.parse_args(argv)
    if problem := check_overrides(args.sets):
        p.error(problem)
    _modelopt()  # fail first when it is missing
    import modelopt

    from pipeline.checkpoint import load_model, load_student, load_teachers
    from pipeline.compare import FineTune, judge, paired_measure
    from pipeline.config import CompareConfig, DistillConfig, PruneConfig, TargetConfig, TrainConfig, parse_section
    from pipeline.data import load_prepared
    from pipeline.distill import kd_criterion, training_ensemble
    from pipeline.latency import LatencyTable, target_backend, timing_protocol
    from pipeline.prune import Budget, BudgetReading
    from pipeline.slim import channel_groups, masks_from_kept, prune_structure

    up = args.work / "upstream"
    params = yaml.safe_load((up / "params.yaml").read_text())
    for assignment in args.sets:
        set_key(params, assignment)
    target = parse_section(params, "target", TargetConfig)
    prune_cfg = parse_section(params, "prune", PruneConfig)
    cmp_cfg = parse_section(params, "compare", CompareConfig)
    kd = parse_section(params, "distill", DistillConfig)
    train_cfg = parse_section(params, "train", TrainConfig)
    a = up / "artifacts"
    data = load_prepared(a / "prepare")
    student, _ = load_student(a / "teachers" / "mine.pt", data.meta)
    step = int(LatencyTable.load(a / "profile" / "latency_table.json").meta["step"])
    shape = (data.channels, *data.meta["image_size"])
    example = torch.zeros(1, *shape)
    cpu = torch.device("cpu")
    from pipeline.train import test_accuracy
    unpruned_acc = test_accuracy(student, data, cpu)

    t0 = time.perf_counter()
    ckpt = args.work / "fastnas" / f"sensitivity_step{step}_calib{args.calib_batches}.pth"  # one map per setting
    subnets = search_subnets(student, data, step, sorted(args.flops), ckpt, args.calib_batches, train_cfg.batch_size)
    search_s = time.perf_counter() - t0
    backend = target_backend(target)
    verdict = timing_protocol(target, passes=cmp_cfg.timing_passes, min_span_s=cmp_cfg.timing_span_s)

    ratios = BudgetReading(backend, student, shape, 1.0, protocol=verdict, readings=cmp_cfg.timing_readings)
    for s, ratio in zip(subnets, paired_measure(ratios)([s["model"] for s in subnets])):
        s["ratio"] = ratio  # measured / the trained model's latency
    teachers = load_teachers(a / "teachers", ["mine"], data.meta)
    ensemble = training_ensemble(list(teachers.values()), data.train, *data.norm(), train_cfg.augment, cpu,
                                 train_cfg.batch_size)
    criterion = kd_criterion(ensemble, kd.temperature, kd.alpha, kd.mode, kd.average)
    rows = []
    for b in args.budgets:
        for seed in args.seeds:
            run = (args.runs or runs_dir(args.work, args.sets)) / f"budget{b:g}_seed{seed}"
            masks = run / "artifacts" / "prune" / "masks.json"
            if not masks.is_file():
                print(f"skipping budget {b:g} seed {seed}: no prune stage run in {run} (run benchmarks.trained_model)")
                continue
            pruned = json.loads(masks.read_text())
            budget = Budget.from_masks(pruned)
            top = budget.bounds_ms()[1] / budget.student_ms  # the band's top as a fraction of the model
            fitting = [s for s in subnets if s["ratio"] <= top]
            chosen = max(fitting, key=lambda s: s["flops"]) if fitting else min(subnets, key=lambda s: s["flops"])
            net = copy.deepcopy(chosen["model"])
            fine_tune = FineTune(data, train_cfg, prune_cfg.optimizer, prune_cfg.epochs, seed, cpu, criterion)
            before, after = fine_tune(net, f"fastnas flops {100 * chosen['flops']:g}%")
            masked, _ = load_model(run / "artifacts" / "prune" / "model.pt")
            ours = prune_structure(masked, example, masks_from_kept(channel_groups(masked, example), pruned["kept"]))
            reading = BudgetReading.of(backend, student, shape, budget, verdict, cmp_cfg.timing_readings)
            verdicts = judge({"ours": ours, "fastnas": net}, budget, reading)
            prune_m = json.loads((run / "metrics" / "prune.json").read_text())
            rows.append({"budget": b, "seed": seed, "flops": chosen["flops"], "fitted": bool(fitting),
                         "params": chosen["params"], "test_acc_before_finetune": before, "test_acc": after,
                         "ours_test_acc": prune_m["test_acc"], "verdicts": verdicts, "widths": chosen["widths"]})
            print(f"budget {b:g} seed {seed}: FastNAS flops {100 * chosen['flops']:g}% -> {after:.4f} "
                  f"({verdicts['fastnas']['measured_over_budget']:.3f} of the budget); ours {prune_m['test_acc']:.4f} "
                  f"({verdicts['ours']['measured_over_budget']:.3f})", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    meta = {"machine": machine(), "date": date.today().isoformat(), "commit": commit, "modelopt": modelopt.__version__,
            "step": step, "search_seconds": search_s, "calib_batches": args.calib_batches, "work": str(args.work), "overrides": args.sets, "unpruned_test_acc": unpruned_acc,
            "command": "python -m benchmarks.fastnas " + " ".join(argv if argv is not None else sys.argv[1:])}
    subnet_rows = [{k: v for k, v in s.items() if k != "model"} for s in subnets]
    write_results(args.out, "rows.json", {"meta": meta, "subnets": subnet_rows, "rows": rows}, table(meta, subnet_rows, rows))
    print(table(meta, subnet_rows, rows))
    return 0


def table(meta: dict[str, Any], subnets: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    lines = [f"TensorRT Model Optimizer FastNAS (nvidia-modelopt {meta['modelopt']}) against ours from the same trained "
             f"model (benchmarks/trained_model.py's upstream; every network measured in a pair with the model), {meta['machine']}, {meta['date']}, commit {meta['commit']}",
             f"`{meta['command']}`", "",
             f"Subnets (one search per FLOPs constraint, channel_divisor {meta['step']}, BatchNorm re-estimated on "
             f"{meta['calib_batches']} training batches; one sensitivity map, {meta['search_seconds']:.0f} s for all): measured / the model's latency (median of paired readings)",
             "", "| FLOPs constraint | parameters | val accuracy before training (%) | measured / model |", "|---|---|---|---|"]
    for s in subnets:
        lines.append(f"| {100 * s['flops']:g}% | {s['params']:,} | {100 * s['val_acc']:.2f} | {s['ratio']:.3f} |")
    lines += ["", f"The trained model, unpruned: {100 * meta['unpruned_test_acc']:.2f}% on test/.", "",
              "| budget | FastNAS test acc, mean ± std (%) | ours test acc (%) | ours - FastNAS per seed (points) | "
              "FastNAS measured / budget per seed | ours measured / budget (read just after) | FLOPs chosen |",
              "|---|---|---|---|---|---|---|"]
    for b in sorted({r["budget"] for r in rows}, reverse=True):
        rs = [r for r in rows if r["budget"] == b]
        diff = ", ".join(f"{100 * (r['ours_test_acc'] - r['test_acc']):+.2f}" for r in rs)
        lines.append(f"| {b:g} | {pct_mean_std([r['test_acc'] for r in rs])} | "
                     f"{pct_mean_std([r['ours_test_acc'] for r in rs])} | {diff} | "
                     + ", ".join(f"{r['verdicts']['fastnas']['measured_over_budget']:.3f}" for r in rs) + " | "
                     + ", ".join(f"{r['verdicts']['ours']['measured_over_budget']:.3f}" for r in rs) + " | "
                     + ", ".join(f"{100 * r['flops']:g}%" + ("" if r["fitted"] else " (none fitted)") for r in rs) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
