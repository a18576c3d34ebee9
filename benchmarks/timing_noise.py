"""How far apart a timing protocol reads two identical networks, on a quiet machine and under
bursty load: the error of the latency verdicts compare makes (a baseline's match, the final joint
run).

A run directory's student is measured together with ``--copies`` identical copies of itself (the
true ratio is 1) and, when the directory has a prune stage's output, as many copies of our pruned
network, ``rounds``
times per protocol, every round one interleaved ``measure_many`` as compare calls it. Two
protocols: ``target.timing`` (what the profile stage and the prune stage's closed loop use) and
compare's verdict protocol (``compare.timing_passes`` windows over ``compare.timing_span_s``).
Two estimators of a ratio: the product's, the fastest window of each network divided by the
student's (``fastest``), and the median over passes of the two networks' window medians in the
same pass (``paired``).

The bursty load is ``--burst-procs`` processes (default: one per core), each alternating a sleep
and a busy spin of 0.05-1.5 s drawn at random, the pattern a shared machine's neighbours make.

    python -m benchmarks.timing_noise --run . --rounds 40 --out benchmarks/results/timing_noise  # after make run

About 5 minutes in all for 40 rounds on the CIFAR-10 CPU preset's student; nothing else should run
on the machine meanwhile (the quiet rows would not be quiet).
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import random
import statistics as st
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks._runner import machine


def _burst(seed: int) -> None:
    r = random.Random(seed)
    while True:
        time.sleep(r.uniform(0.05, 1.5))
        end = time.perf_counter() + r.uniform(0.05, 1.5)
        while time.perf_counter() < end:
            pass


def _ratios(timings: list[Any]) -> list[dict[str, float]]:
    ref = timings[0]
    return [{"fastest": t.ms / ref.ms, "paired": st.median(a / b for a, b in zip(t.window_ms, ref.window_ms))}
            for t in timings[1:]]


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": st.median(values), "min": min(values), "max": max(values), "sd": st.pstdev(values)}


def main(argv: list[str] | None = None) -> int:
    from pipeline.checkpoint import load_model
    from pipeline.config import CompareConfig, TargetConfig, parse_section
    from pipeline.latency import target_backend, timing_protocol
    from pipeline.slim import channel_groups, masks_from_kept, prune_structure

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("."), help="a run directory: params.yaml, artifacts/student/model.pt "
                   "and optionally artifacts/prune/{masks.json,model.pt} (default: this repository after make run)")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--load", choices=("quiet", "bursty", "both"), default="both")
    p.add_argument("--copies", type=int, default=1, help="identical copies of the student and of ours measured in each "
                   "round (more models: a longer pass, as in compare's final run)")
    p.add_argument("--burst-procs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.rounds < 2:
        p.error("--rounds must be at least 2 (a spread needs two readings)")
    if args.copies < 1:
        p.error("--copies must be at least 1")

    params = yaml.safe_load((args.run / "params.yaml").read_text())
    target = parse_section(params, "target", TargetConfig)
    cmp = parse_section(params, "compare", CompareConfig)
    student, _ = load_model(args.run / "artifacts" / "student" / "model.pt")
    student.eval()
    meta = json.loads((args.run / "artifacts" / "prepare" / "meta.json").read_text())
    shape = (int(meta["channels"]), *meta["image_size"])
    models = {"student": student, **{f"student copy {i + 1}": copy.deepcopy(student) for i in range(args.copies)}}
    masks_path = args.run / "artifacts" / "prune" / "masks.json"
    if masks_path.is_file():
        example = torch.zeros(1, *shape)
        masked, _ = load_model(args.run / "artifacts" / "prune" / "model.pt")
        kept = json.loads(masks_path.read_text())["kept"]
        ours = prune_structure(masked, example, masks_from_kept(channel_groups(masked, example), kept))
        models.update({f"ours {i + 1}": copy.deepcopy(ours) for i in range(args.copies)})
    backend = target_backend(target)
    protocols = {"target.timing": timing_protocol(target),
                 "compare verdict": timing_protocol(target, passes=cmp.timing_passes, min_span_s=cmp.timing_span_s)}
    nets, names = list(models.values()), list(models)[1:]  # every ratio is to the student, the first
    loads = ["quiet", "bursty"] if args.load == "both" else [args.load]
    rows: list[dict[str, Any]] = []
    for load in loads:
        procs = [mp.Process(target=_burst, args=(i,), daemon=True) for i in range(args.burst_procs)] if load == "bursty" else []
        for proc in procs:
            proc.start()
        try:
            for pname, proto in protocols.items():
                reads: dict[str, dict[str, list[float]]] = {n: {"fastest": [], "paired": []} for n in names}
                t0 = time.perf_counter()
                for _ in range(args.rounds):
                    for name, r in zip(names, _ratios(backend.measure_many(nets, shape, proto))):
                        for est, v in r.items():
                            reads[name][est].append(v)
                for name, by_est in reads.items():
                    for est, values in by_est.items():
                        rows.append({"load": load, "protocol": pname, "passes": proto.passes, "span_s": proto.min_span_s,
                                     "network": name, "estimator": est, "rounds": args.rounds, **_summary(values),
                                     "values": values})
                print(f"{load} / {pname}: {time.perf_counter() - t0:.0f} s", flush=True)
        finally:
            for proc in procs:
                proc.terminate()
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"date": date.today().isoformat(), "machine": machine(), "run": str(args.run),
              "fingerprint": backend.fingerprint(), "burst_procs": args.burst_procs, "rows": rows}
    (args.out / "timing_noise.json").write_text(json.dumps(record, indent=2))
    lines = [f"Ratio to the student, {args.rounds} rounds per row ({machine()}, {date.today().isoformat()}); "
             "a student copy's true ratio is 1, and every copy of ours reads the same network.", "",
             "| load | protocol | network | estimator | median | min - max | sd |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['load']} | {r['protocol']} ({r['passes']} x over {r['span_s']:g} s) | {r['network']} | "
                     f"{r['estimator']} | {r['median']:.3f} | {r['min']:.3f} - {r['max']:.3f} | {r['sd']:.3f} |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
