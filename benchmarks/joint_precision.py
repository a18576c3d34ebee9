"""Pruning and precision under one budget: ours pruned in int8 (joint) against the same model pruned
in fp32 and against INT8 alone, at budgets that are fractions of the model's fp32 latency.

    python -m benchmarks.joint_precision --work /tmp/slimdeploy_trained_model \\
        --fp32-runs /tmp/slimdeploy_trained_model/runs_at_9eaae79 --out benchmarks/results/joint_precision \\
        [--budgets 0.3 0.5 --seeds 0 1 2]

    python -m stages --preset cifar10-cpu --workdir /tmp/c10 --until profile      # about 35 min
    python -m benchmarks.joint_precision --upstream /tmp/c10 --work /tmp/c10_joint --holdout-per-class 1000 \\
        --model "the CIFAR-10 CPU preset's student" --out benchmarks/results/joint_precision/cifar10-cpu

``--upstream`` (default ``WORK/upstream``, benchmarks/trained_model.py's): a work directory with
``artifacts/{prepare,teachers,student,profile}`` whose ``student/model.pt`` is the model to compress
and whose ``params.yaml`` made them (``python -m stages ... --until profile`` gives one). The first
form is that benchmark's setting: a torchvision resnet18 trained outside the pipeline on CIFAR-10
JPEGs at 32 px, its held-out ``test/`` split never trained or selected on. ``--fp32-runs`` (default
``WORK/runs_fp32``): the prune runs with ``target.precision: fp32`` (``budget<B>_seed<S>/``, as
benchmarks/prune_protocol.py lays them out), the pruned-fp32 column; a run that is missing is made
here with the upstream's params (ours only, no baselines).

1. ``WORK/upstream_int8/``: the same prepared data and model, profiled with ``target.precision: int8``
   (every table unit and calibration sub-network measured as its Q/DQ model, U8S8).
2. For every budget and seed, the real ``prune`` stage with ``target.precision: int8`` and
   ``prune.budget_reference: fp32`` (the fraction is of the fp32 model; the closed loop reads every
   candidate paired with it), with the fp32 run's prune settings and seed, except the closed loop's
   protocol: ``loop_timing: verdict`` (compare's, as the judgement reads), each measurement the median
   of at least ``prune.reference_readings`` readings. One int8 network's ratio to the fp32 model moved
   ±14-17% between single readings of ``target.timing`` on a shared Xeon, ±10-11% of compare's protocol
   (docs/history.md, section 49). The fp32 runs read in one precision and keep their protocol.
3. One judgement per (budget, seed), all in this process, one after the other: the fp32 model, the
   pruned-fp32 network, the model's Q/DQ model (INT8 alone) and the joint network's Q/DQ model, each
   read paired with the fp32 model (``compare.timing_passes`` windows over ``compare.timing_span_s``,
   the median of as many readings as the joint run's budget asks (``budget.readings``), at least
   ``compare.timing_readings`` and ``--judge-readings``; ONNX Runtime, CPU, the target's threads and
   batch); the budget is the fraction times the fp32 model's latency. Test accuracy of each in the
   precision it is deployed in (Q/DQ models run by ONNX Runtime, calibrated on
   ``engine.calibration_images`` training images as the engine stage does), and with
   ``--holdout-per-class N`` also on up to N images per class the upstream's prepare stage left out
   (benchmarks/prune_protocol.py's ``make_holdout``: ``holdout_acc``).

Writes ``rows.json`` and ``table.md`` (mean ± std over seeds) into ``--out``; each pair's judgement is
kept in its int8 run (``judge.json``), so a re-run with more budgets or seeds reads the finished ones.
``--reread``: every pair already judged has its three latencies read once more (compare's protocol),
kept beside the first judgement: on a shared machine the int8 / fp32 ratio moves with the machine's
state, and one judgement is one moment. ``--unpruned-reference B ...``: at those budgets the student
is also trained as long as the pruned networks (compare's ``unpruned`` method, run in the int8 run)
and scored in int8: the reference a budget near the student's own latency is judged against.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from benchmarks._runner import command_line, machine, run_stage, write_params, write_results
from benchmarks.prune_protocol import make_holdout, run_pair
from pipeline.io import file_sha256

MODEL = "the trained resnet18 (32 px)"  # the first form's model
COLUMNS = (("fp32_pruned", "pruned in fp32"), ("int8_only", "INT8 alone (unpruned)"), ("joint", "ours: pruned in int8 (joint)"))
COLUMN_KEYS = tuple(k for k, _ in COLUMNS)


def upstream_int8(src: Path, work: Path, params: dict[str, Any]) -> Path:
    """``work/upstream_int8``: the fp32 upstream ``src``'s data and model, profiled in int8."""
    up = work / "upstream_int8"
    table = up / "artifacts" / "profile" / "latency_table.json"
    if table.is_file():
        return up
    (up / "artifacts").mkdir(parents=True, exist_ok=True)
    for name in ("prepare", "teachers", "student"):
        if not (up / "artifacts" / name).exists():
            os.symlink((src / "artifacts" / name).resolve(), up / "artifacts" / name)
    pfile = write_params(up, params)
    a = up / "artifacts"
    run_stage("profile", "--data", str(a / "prepare"), "--arch", str(a / "student" / "model.arch.json"),
              "--out", str(table), "--metrics", str(up / "metrics" / "profile.json"),
              "--plots-dir", str(up / "plots" / "profile"), params=pfile)
    return up


def int8_params(fp32_run: Path) -> dict[str, Any]:
    """The fp32 run's params with the target, the engine and the loop's protocol set for int8."""
    p = yaml.safe_load((fp32_run / "params.yaml").read_text())
    p["target"]["precision"] = "int8"
    p["target"]["int8_activations"] = "uint8"
    p["engine"].update(precision="int8")
    p["prune"].update(budget_reference="fp32", progress=False)
    p = loop_as_ran(p)
    p["prune"]["loop_timing"] = "verdict"  # a reading across precisions: module docstring, step 2
    return p


def loop_as_ran(p: dict[str, Any]) -> dict[str, Any]:
    """``p`` with the closed loop's protocol written out: params from before ``prune.loop_timing`` /
    ``loop_readings`` existed ran with ``target`` and 3 readings (so an fp32 run made here from such an
    upstream and its int8 partner read alike)."""
    p["prune"].setdefault("loop_timing", "target")
    p["prune"].setdefault("loop_readings", 3)
    p["compare"]["methods"] = []
    return p


def _setting(fp32_run: Path, joint_run: Path) -> tuple[dict[str, Any], Any, tuple[int, ...], dict[str, torch.nn.Module]]:
    """The int8 run's params, prepared data and input shape, and the networks judged: the two pruned
    ones (``_networks``) and the model itself (``int8_only``, deployed as its Q/DQ model)."""
    from pipeline.checkpoint import load_model
    from pipeline.data import load_prepared

    params = yaml.safe_load((joint_run / "params.yaml").read_text())
    data = load_prepared(joint_run / "artifacts" / "prepare")
    shape = (data.channels, *data.meta["image_size"])
    model, _ = load_model(joint_run / "artifacts" / "student" / "model.pt")
    return params, data, shape, {**_networks(fp32_run, joint_run, shape), "int8_only": model.eval()}


def _networks(fp32_run: Path, joint_run: Path, shape: tuple[int, ...]) -> dict[str, torch.nn.Module]:
    from pipeline.checkpoint import load_model
    from pipeline.slim import channel_groups, masks_from_kept, prune_structure

    out = {}
    for name, run in (("fp32_pruned", fp32_run), ("joint", joint_run)):
        masked, _ = load_model(run / "artifacts" / "prune" / "model.pt")
        kept = json.loads((run / "artifacts" / "prune" / "masks.json").read_text())["kept"]
        example = torch.zeros(1, *shape)
        out[name] = prune_structure(masked, example, masks_from_kept(channel_groups(masked, example), kept)).eval()
    return out


def judge(fp32_run: Path, joint_run: Path, budget: float, holdout: Path | None = None, readings: int = 1
          ) -> dict[str, Any]:
    """Every network's test (and ``holdout``) accuracy as deployed and its latency paired with the
    fp32 model."""
    from pipeline.config import EngineConfig, TargetConfig, parse_section
    from pipeline.data import Normalized, load_split
    from pipeline.quantize import calibration_images, int8_accuracies
    from pipeline.train import test_accuracy

    params, data, shape, nets = _setting(fp32_run, joint_run)
    target = parse_section(params, "target", TargetConfig)
    engine = parse_section(params, "engine", EngineConfig)
    model = nets["int8_only"]
    calib = calibration_images(data, engine.calibration_images)
    splits = {"test_acc": data.test}
    if holdout is not None:
        splits["holdout_acc"] = load_split(holdout, data.meta)
    test = {k: (Normalized(v, *data.norm()), v.y) for k, v in splits.items()}

    def fp32_accuracies(net: torch.nn.Module) -> dict[str, float]:
        return {k: test_accuracy(net, data, cpu, split=v) for k, v in splits.items()}

    cpu = torch.device("cpu")
    rows: dict[str, Any] = {"model_fp32": fp32_accuracies(model)}
    rows["model_fp32"]["ms"], latency = latencies(fp32_run, joint_run, budget, loop_protocol=True, readings=readings)
    for name in COLUMN_KEYS:
        net = nets[name]
        acc = (fp32_accuracies(net) if name == "fp32_pruned" else
               int8_accuracies(net, shape, calib, target.int8_activations, test, target.threads))
        rows[name] = {**acc, **latency[name]}
    rows["joint"].update({f"{k}_fp32": v for k, v in fp32_accuracies(nets["joint"]).items()})
    return rows


def latencies(fp32_run: Path, joint_run: Path, budget: float, loop_protocol: bool = False, readings: int = 1
              ) -> tuple[float, dict[str, dict[str, Any]]]:
    """The fp32 model's ms and, for the pruned-fp32 network, the model's Q/DQ model (INT8 alone) and
    the joint network's Q/DQ model, the latency read paired with the fp32 model with compare's
    verdict protocol (and, ``loop_protocol``, with ``target.timing``), over the budget: the median of
    ``judge_readings`` readings (the run's budget's, ``compare.timing_readings`` or ``readings``)."""
    from pipeline.config import CompareConfig, TargetConfig, parse_section
    from pipeline.latency import median_paired, target_backend, timing_protocol

    params, _, shape, nets = _setting(fp32_run, joint_run)
    target = parse_section(params, "target", TargetConfig)
    cmp = parse_section(params, "compare", CompareConfig)
    n = judge_readings(joint_run, cmp.timing_readings, readings)
    model = nets["int8_only"]
    int8 = target_backend(target)  # ONNX Runtime, CPU, int8 with target.int8_activations
    fp32 = int8.at_precision("fp32")
    protocol = timing_protocol(target, passes=cmp.timing_passes, min_span_s=cmp.timing_span_s)
    loop = timing_protocol(target)  # the prune runs' closed loop read with target.timing
    ref = fp32.measure_readings([model], shape, protocol, n)
    model_ms = statistics.median(r[0].ms for r in ref)
    out: dict[str, dict[str, Any]] = {}
    for name in COLUMN_KEYS:
        call = (fp32 if name == "fp32_pruned" else int8).prepare(nets[name], shape)
        reads = fp32.measure_readings([model], shape, protocol, n, extra=[call])
        ms = median_paired(model_ms, reads, 1, 0)
        out[name] = {"ms": ms, "over_budget": ms / (budget * model_ms), "readings": n,
                     "readings_over_budget": [r[1].ms / r[0].ms / budget for r in reads]}
        if loop_protocol:
            loop_reads = fp32.measure_readings([model], shape, loop, n, extra=[call])
            out[name]["over_budget_loop_protocol"] = median_paired(1.0, loop_reads, 1, 0) / budget
    return model_ms, out


def judge_readings(joint_run: Path, timing_readings: int, at_least: int = 1) -> int:
    """Readings per judged latency: the joint run's budget's (``Budget.readings``: more than one
    when it reads across precisions), ``compare.timing_readings`` or ``at_least``, the most."""
    from pipeline.prune import Budget

    masks = json.loads((joint_run / "artifacts" / "prune" / "masks.json").read_text())
    return Budget.from_masks(masks).reading_count(max(timing_readings, at_least))


def pct(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{100 * xs[0]:.2f}"
    return f"{100 * statistics.mean(xs):.2f} ± {100 * statistics.stdev(xs):.2f}" if xs else "-"


def table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    key = "holdout_acc" if "holdout_images" in meta and rows else "test_acc"
    where = (f"the holdout ({meta['holdout_images']:,} images the prepare stage left out)" if key == "holdout_acc"
             else "the test split")
    lines = [f"# Pruning and precision under one budget ({meta['date']}, {meta['machine']})", "",
             f"`{meta['command']}`", "",
             f"Budget: a fraction of {meta.get('model', 'the model')}'s fp32 latency (ONNX Runtime, CPU, "
             "1 thread, batch 1), every network read paired with the fp32 model in one process; accuracy on "
             f"{where} in the precision each network is deployed in. Mean ± std over seeds; "
             "`/budget`: measured latency over the budget (median over seeds, range), read with compare's verdict "
             "protocol (in brackets: with `target.timing`, the protocol the prune runs' closed loop read with; "
             "`read again`: every pair read once more after all were judged, `--reread`).", "",
             "| budget | seeds | fp32 model | " + " | ".join(f"{label} acc | /budget" for _, label in COLUMNS)
             + " | unpruned, trained as long (int8) acc | joint - pruned fp32 (per seed) |",
             "|" + "---|" * (3 + 2 * len(COLUMNS) + 2)]
    for b in sorted({r["budget"] for r in rows}, reverse=True):
        rs = [r for r in rows if r["budget"] == b]
        cells = [f"{b:g}", ", ".join(str(r["seed"]) for r in rs), pct([r["judge"]["model_fp32"][key] for r in rs])]
        for col, _ in COLUMNS:
            over = [r["judge"][col]["over_budget"] for r in rs]
            looped = [r["judge"][col].get("over_budget_loop_protocol") for r in rs]
            tail = f" [{statistics.median(looped):.3f}]" if None not in looped else ""
            again = [x[col]["over_budget"] for r in rs for x in r.get("rereads", [])]
            tail += f"; read again {statistics.median(again):.3f} ({min(again):.3f}-{max(again):.3f})" if again else ""
            cells += [pct([r["judge"][col][key] for r in rs]),
                      f"{statistics.median(over):.3f} ({min(over):.3f}-{max(over):.3f}){tail}"]
        trained = [r["unpruned_trained"].get(f"{key}_int8") for r in rs if "unpruned_trained" in r]
        cells.append(pct(trained) if trained and None not in trained else "-")
        diffs = [r["judge"]["joint"][key] - r["judge"]["fp32_pruned"][key] for r in rs]
        cells.append(f"{pct(diffs)} ({', '.join(f'{100 * d:+.2f}' for d in diffs)})")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Prune stage in int8 (per run): " + "; ".join(
        f"{r['budget']:g}/seed {r['seed']}: {r['prune']['loop_status']}, {r['prune']['measured_over_budget']:.3f} of "
        f"the budget, int8 model {r['prune']['student_ms']:.3f} ms, fp32 {r['prune']['student_fp32_ms']:.3f} ms"
        for r in rows)]
    return "\n".join(lines)


def unpruned_reference(joint_run: Path, holdout: Path | None) -> dict[str, Any]:
    """The student trained as long as every pruned network (compare's ``unpruned`` method: the same
    distillation, epochs and seed, not cut to the budget), in int8 as the target deploys it: what
    pruning is judged against at a budget the student nearly meets. Kept in the int8 run's
    ``metrics/compare_unpruned.json``."""
    out = joint_run / "metrics" / "compare_unpruned.json"
    if not out.is_file():
        p = yaml.safe_load((joint_run / "params.yaml").read_text())
        p["compare"]["methods"] = ["unpruned"]
        pfile = joint_run / "params_unpruned.yaml"
        pfile.write_text(yaml.safe_dump(p, sort_keys=False))
        a = joint_run / "artifacts"
        run_stage("compare", "--data", str(a / "prepare"), "--teachers", str(a / "teachers"), "--student",
                  str(a / "student" / "model.pt"), "--table", str(a / "profile" / "latency_table.json"),
                  "--pruned", str(a / "prune" / "masks.json"), "--model", str(a / "prune" / "model.pt"),
                  "--metrics", str(out), *(["--holdout", str(holdout.resolve())] if holdout else []), params=pfile)
    u = json.loads(out.read_text())["unpruned"]
    return {k: u[k] for k in ("test_acc", "test_acc_int8", "holdout_acc", "holdout_acc_int8", "measured_over_budget",
                              "params") if k in u}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/slimdeploy_trained_model"))
    ap.add_argument("--upstream", type=Path, default=None, help="the fp32 upstream (default: WORK/upstream)")
    ap.add_argument("--fp32-runs", type=Path, default=None,
                    help="the prune runs in fp32 (default: WORK/runs_fp32; missing ones are made)")
    ap.add_argument("--holdout-per-class", type=int, default=0, metavar="N",
                    help="also score every network on up to N images per class the prepare stage left out")
    ap.add_argument("--model", default=MODEL, help="what the model is, for the table")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/joint_precision"))
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--reread", action="store_true",
                    help="read every judged pair's latencies once more (compare's protocol), kept beside the first "
                         "judgement in its judge.json: how far a reading moves with the machine's state")
    ap.add_argument("--judge-readings", type=int, default=1, metavar="N",
                    help="judge every latency as the median of at least N readings (more when the joint run's "
                         "budget asks for more); a pair judged with fewer is judged again")
    ap.add_argument("--unpruned-reference", type=float, nargs="*", default=[], metavar="BUDGET",
                    help="at these budgets, also train the unpruned student as long as the pruned networks "
                         "(compare's unpruned method, in the int8 run) and score it in int8: what pruning to a "
                         "budget near the student's own latency is judged against")
    args = ap.parse_args(argv)
    src = args.upstream or args.work / "upstream"
    fp32_runs = args.fp32_runs or args.work / "runs_fp32"
    holdout = make_holdout(src, args.work / "holdout.npz", args.holdout_per_class) if args.holdout_per_class else None
    if holdout is not None:  # read once, for every pair's record
        with np.load(holdout) as f:
            holdout_images = int(f["y"].size)
    up = None
    rows = []
    for b in args.budgets:  # every seed of a budget before the next budget
        for seed in args.seeds:
            fp32_run = fp32_runs / f"budget{b:g}_seed{seed}"
            if not (fp32_run / "metrics" / "prune.json").is_file():
                fp32 = run_pair(src, fp32_runs, loop_as_ran(yaml.safe_load((src / "params.yaml").read_text())), b,
                                seed, baselines=False)
                if "failed" in fp32:
                    rows.append({**fp32, "failed": f"fp32 prune: {fp32['failed']}"})
                    continue
            up = up or upstream_int8(src, args.work, int8_params(fp32_run))
            row = run_pair(up, args.work / "runs_int8", int8_params(fp32_run), b, seed, baselines=False)
            if "failed" in row:
                rows.append(row)
                continue
            joint_run = args.work / "runs_int8" / f"budget{b:g}_seed{seed}"
            judged = joint_run / "judge.json"  # a re-run with more budgets or seeds judges only the new pairs
            inputs = {"fp32_run": str(fp32_run.resolve()), "holdout": None if holdout is None else
                      {"path": str(holdout.resolve()), "sha256": file_sha256(holdout)},
                      "joint_model_sha256": file_sha256(joint_run / "artifacts" / "prune" / "model.pt")}
            if args.judge_readings > 1:  # absent from the judgements made before the option existed
                inputs["judge_readings"] = args.judge_readings
            cached = json.loads(judged.read_text()) if judged.is_file() else {}
            if cached.get("inputs") != inputs:
                cached = {"inputs": inputs, "judge": judge(fp32_run, joint_run, b, holdout, args.judge_readings)}
                judged.write_text(json.dumps(cached, indent=1))
            elif args.reread:
                model_ms, again = latencies(fp32_run, joint_run, b, readings=args.judge_readings)
                cached.setdefault("rereads", []).append({"at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                                         "model_fp32_ms": model_ms, **again})
                judged.write_text(json.dumps(cached, indent=1))
            row["judge"] = cached["judge"]
            row["rereads"] = cached.get("rereads", [])
            if b in args.unpruned_reference:
                row["unpruned_trained"] = unpruned_reference(joint_run, holdout)
            rows.append(row)
            meta = {"date": str(date.today()), "machine": machine(), "model": args.model,
                    "command": command_line("benchmarks.joint_precision", argv if argv is not None else sys.argv[1:])}
            if holdout is not None:
                meta["holdout_images"] = holdout_images
            write_results(args.out, "rows.json", {"meta": meta, "rows": rows},
                          table([r for r in rows if "judge" in r], meta))
            print(json.dumps({k: {kk: round(v, 4) for kk, v in d.items() if isinstance(v, float)}
                              for k, d in row["judge"].items()}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
