"""How far one paired reading of a small pruned network strays: the case for the median of readings.

    python -m benchmarks.paired_readings --out benchmarks/results/paired_readings \\
        [--work /tmp/slimdeploy_trained_model --run budget0.5_seed0 --repeats 6]

Reads one prune-stage run of ``benchmarks/trained_model.py`` (the trained resnet18 and ours, the
network the closed loop decided). Each repeat measures ours against the trained model, as the
prune stage's closed loop and compare do (``Backend.measure_readings``, the target's backend):

* ``loop``: one reading with ``target.timing`` (the closed loop's protocol), paired with the model;
* ``loop, median of 3``: the median ratio of three such readings (``prune.loop_readings: 3``);
* ``verdict``: one reading with compare's protocol (``compare.timing_passes`` over
  ``compare.timing_span_s``), paired;
* ``joint``: one reading of compare's protocol in a joint run with four other networks of about
  ours' size (uniform width scaling of the model), as compare's final verdict measures.

Writes every ratio (ours / the model) and, per way, the median and range over repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks._runner import REPO, machine, write_results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "paired_readings")
    p.add_argument("--work", type=Path, default=Path("/tmp/slimdeploy_trained_model"))
    p.add_argument("--run", default="budget0.5_seed0")
    p.add_argument("--repeats", type=int, default=6)
    args = p.parse_args(argv)
    import pipeline.compare as pc
    from pipeline.checkpoint import load_model, load_student
    from pipeline.config import CompareConfig, TargetConfig, parse_section
    from pipeline.data import load_prepared
    from pipeline.latency import LatencyTable, median_paired, target_backend, timing_protocol
    from pipeline.slim import channel_groups, masks_from_kept, prune_structure

    up, run = args.work / "upstream", args.work / "runs" / args.run
    params = yaml.safe_load((run / "params.yaml").read_text())
    target = parse_section(params, "target", TargetConfig)
    cmp_cfg = parse_section(params, "compare", CompareConfig)
    data = load_prepared(up / "artifacts" / "prepare")
    model, _ = load_student(up / "artifacts" / "teachers" / "mine.pt", data.meta)
    shape = (data.channels, *data.meta["image_size"])
    example = torch.zeros(1, *shape)
    pruned = json.loads((run / "artifacts" / "prune" / "masks.json").read_text())
    masked, _ = load_model(run / "artifacts" / "prune" / "model.pt")
    ours = prune_structure(masked, example, masks_from_kept(channel_groups(masked, example), pruned["kept"]))
    table = LatencyTable.load(up / "artifacts" / "profile" / "latency_table.json")
    space = pc.baseline_space(model, example, table.step, float(table.meta["min_fraction"]), None)
    size = sum(t.numel() for t in ours.parameters())
    others = sorted(pc.sweep("uniform", space), key=lambda c: abs(sum(t.numel() for t in c.model.parameters()) - size))[:4]
    backend = target_backend(target)
    loop = timing_protocol(target)
    verdict = timing_protocol(target, passes=cmp_cfg.timing_passes, min_span_s=cmp_cfg.timing_span_s)
    ways: dict[str, list[float]] = {"loop": [], "loop, median of 3": [], "verdict": [], "joint": []}
    for rep in range(args.repeats):
        reads = backend.measure_readings([ours, model], shape, loop, readings=3)
        ways["loop"].append(reads[0][0].ms / reads[0][1].ms)
        ways["loop, median of 3"].append(median_paired(1.0, reads, 0, 1))
        t = backend.measure_many([ours, model], shape, verdict)
        ways["verdict"].append(t[0].ms / t[1].ms)
        t = backend.measure_many([model, ours, *(c.model for c in others)], shape, verdict)
        ways["joint"].append(t[1].ms / t[0].ms)
        print(rep, {k: round(v[-1], 4) for k, v in ways.items()}, flush=True)
    summary = {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "ratios": v} for k, v in ways.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    meta = {"machine": machine(), "date": date.today().isoformat(), "commit": commit, "run": args.run,
            "prune_stage_ratio": pruned["measured_ms"] / pruned["student_ms"], "loop_protocol": vars(loop),
            "verdict_protocol": vars(verdict),
            "command": "python -m benchmarks.paired_readings " + " ".join(argv if argv is not None else sys.argv[1:])}
    text = table_md(meta, summary)
    write_results(args.out, "rows.json", {"meta": meta, "summary": summary}, text)
    print(text)
    return 0


def table_md(meta: dict[str, Any], summary: dict[str, Any]) -> str:
    lines = [f"Ours / the trained model, one network pair measured {len(next(iter(summary.values()))['ratios'])} times "
             f"each way ({meta['run']} of benchmarks/trained_model.py; the prune stage's own reading: "
             f"{meta['prune_stage_ratio']:.3f}), {meta['machine']}, {meta['date']}, commit {meta['commit']}",
             f"`{meta['command']}`", "", "| way | median | min | max | (max - min) / median |", "|---|---|---|---|---|"]
    for k, s in summary.items():
        lines.append(f"| {k} | {s['median']:.3f} | {s['min']:.3f} | {s['max']:.3f} | "
                     f"{(s['max'] - s['min']) / s['median']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
