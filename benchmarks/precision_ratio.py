"""How far one reading across precisions strays: an int8 network read paired with the fp32 model,
many times over a few minutes, with the closed loop's and the verdict's protocols.

    python -m benchmarks.precision_ratio --run /tmp/c10_joint/runs_int8/budget0.3_seed2 \\
        --fp32-run /tmp/c10_joint/runs_fp32/budget0.3_seed2 --readings 40 \\
        --out benchmarks/results/precision_ratio/cifar10-cpu

``--run``: an int8 prune run of benchmarks/joint_precision.py (``--fp32-run``: its fp32 partner, for
the networks' layout). Each round reads, one after the other, the student's Q/DQ model and the pruned
network's Q/DQ model, each paired with the student in fp32 (``Backend.measure_readings`` with the fp32
model as the reference, as ``pipeline.prune.BudgetReading`` reads with ``prune.budget_reference:
fp32``), once with ``target.timing`` (the closed loop's ``loop_timing: target``) and once with
compare's protocol (``compare.timing_passes`` over ``compare.timing_span_s``). Writes every ratio
(fp32 model / int8 network) with its time, and per network and protocol the median, the 5-95%
interval of one reading and of the median of 3 and of 5 readings (resampled from the readings), as
half-widths relative to the median: what ``prune.reference_readings`` is sized by.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

from benchmarks._runner import command_line, machine, write_results

MEDIANS_OF = (1, 3, 5)
RESAMPLES = 2000


def spread(ratios: list[float], k: int, seed: int = 0) -> float:
    """Half the 5-95% interval of the median of ``k`` readings drawn from ``ratios``, over their median."""
    rng = random.Random(seed)
    meds = [statistics.median(rng.sample(ratios, k)) for _ in range(RESAMPLES)]
    q = statistics.quantiles(meds, n=20)
    return (q[-1] - q[0]) / 2 / statistics.median(ratios)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="an int8 run of benchmarks/joint_precision.py")
    ap.add_argument("--fp32-run", type=Path, required=True, help="its fp32 partner")
    ap.add_argument("--readings", type=int, default=40)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/precision_ratio"))
    args = ap.parse_args(argv)
    if args.readings < max(MEDIANS_OF):
        ap.error(f"--readings must be at least {max(MEDIANS_OF)}")
    from benchmarks.joint_precision import _setting
    from pipeline.config import CompareConfig, TargetConfig, parse_section
    from pipeline.latency import target_backend, timing_protocol

    params, _, shape, nets = _setting(args.fp32_run, args.run)
    target = parse_section(params, "target", TargetConfig)
    cmp = parse_section(params, "compare", CompareConfig)
    int8 = target_backend(target)
    fp32 = int8.at_precision("fp32")
    protocols = {"target.timing": timing_protocol(target),
                 "compare": timing_protocol(target, passes=cmp.timing_passes, min_span_s=cmp.timing_span_s)}
    model = nets["int8_only"]
    calls = {"the student (INT8 alone)": int8.prepare(model, shape), "ours, pruned in int8": int8.prepare(nets["joint"], shape)}
    readings: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for i in range(args.readings):
        for net, call in calls.items():
            for name, protocol in protocols.items():
                ref, sub = fp32.measure_readings([model], shape, protocol, 1, extra=[call])[0]
                readings.append({"round": i, "s": round(time.perf_counter() - t0, 2), "network": net, "protocol": name,
                                 "fp32_ms": ref.ms, "int8_ms": sub.ms, "ratio": ref.ms / sub.ms})
        print(i, [round(r["ratio"], 3) for r in readings[-4:]], flush=True)
    summary = []
    for net in calls:
        for name in protocols:
            ratios = [r["ratio"] for r in readings if r["network"] == net and r["protocol"] == name]
            summary.append({"network": net, "protocol": name, "readings": len(ratios),
                            "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                            **{f"half_width_median_of_{k}": spread(ratios, k) for k in MEDIANS_OF}})
    meta = {"date": str(date.today()), "machine": machine(), "run": str(args.run), "seconds": time.perf_counter() - t0,
            "command": command_line("benchmarks.precision_ratio", argv if argv is not None else sys.argv[1:])}
    write_results(args.out, "rows.json", {"meta": meta, "summary": summary, "readings": readings}, table(meta, summary))
    print(table(meta, summary))
    return 0


def table(meta: dict[str, Any], summary: list[dict[str, Any]]) -> str:
    lines = [f"# One int8 network's ratio to the fp32 model, read again and again ({meta['date']}, {meta['machine']})",
             "", f"`{meta['command']}` ({meta['seconds'] / 60:.1f} min)", "",
             "| network | protocol | readings | fp32 / int8, median (range) | "
             + " | ".join(f"± (90%), median of {k}" for k in MEDIANS_OF) + " |",
             "|---|---|---|---|" + "---|" * len(MEDIANS_OF)]
    for s in summary:
        lines.append(f"| {s['network']} | {s['protocol']} | {s['readings']} | {s['median']:.3f} ({s['min']:.3f}-"
                     f"{s['max']:.3f}) | " + " | ".join(f"{100 * s[f'half_width_median_of_{k}']:.1f}%"
                                                       for k in MEDIANS_OF) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
