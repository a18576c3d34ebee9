"""INT8 against FP32 on this CPU with ONNX Runtime: every quantization choice, latency and accuracy.

    python -m benchmarks.int8 --out benchmarks/results/int8 [--rounds 5 --work /tmp/slimdeploy_trained_model]
        [--student /tmp/c10 --holdout-per-class 1000]

Models (batch 1, one thread, ONNX Runtime's CPU provider):
* the trained resnet18 of ``benchmarks/trained_model.py`` (torchvision architecture trained outside
  the pipeline on CIFAR-10 JPEGs at its size), with the accuracy of every variant on that folder's
  held-out test/ (when ``--work`` holds its upstream; skipped otherwise);
* with ``--student DIR``: the searched student of a pipeline run (``python -m stages --preset
  cifar10-cpu --workdir DIR --until student``), with the accuracy of every variant on its test split,
  or with ``--holdout-per-class N`` on up to N images per class the run's prepare stage left out
  (benchmarks/prune_protocol.py's ``make_holdout``, written to ``DIR/holdout.npz``);
* torchvision ``resnet18`` and ``mobilenet_v2`` at 224 px, randomly initialised: latency only (no
  trained 224 px weights are available offline here, so no accuracy is claimed for them).

Each model is exported to ONNX (``pipeline.runtimes.export_onnx``) and quantized by
``pipeline.quantize.quantize_int8`` (Q/DQ, int8 per-channel weights) with uint8 activations (U8S8)
and with int8 activations (S8S8); calibration: 256 training images (the trained model) or 64
normal random images (the others: the ranges do not change the latency). fp32 runs the graph
optimised by ONNX Runtime, as the engine stage does. The three sessions are timed interleaved
(``pipeline.latency.timing``: the fastest window median of 40 windows over at least 4 s), ``--rounds``
times; the table gives each variant's median (min-max) over rounds and the fp32 / int8 ratio per
round (median, min-max): a ratio above 1 means INT8 is faster.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

import torch

from benchmarks._runner import REPO, command_line, machine, write_results


def cpu_flags() -> dict[str, bool]:
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {f: f in flags for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")}


def _scored(name: str, model: Any, data: Any, split: Any) -> dict[str, Any]:
    """A trained ``model`` on ``data`` with 256 calibration images of its training split, scored on ``split``."""
    from pipeline.data import Normalized
    from pipeline.quantize import calibration_rows

    mean, std = data.norm()
    return {"name": name, "model": model.eval(), "shape": (data.channels, *data.meta["image_size"]),
            "calib": Normalized(data.train, mean, std)[calibration_rows(len(data.train), 256, seed=0)],
            "test": (Normalized(split, mean, std), split.y)}


def _student(run: Path, holdout_per_class: int, label: str) -> dict[str, Any]:
    """The pipeline run ``run``'s student, scored on its test split (or the holdout)."""
    from benchmarks.prune_protocol import make_holdout
    from pipeline.checkpoint import load_model
    from pipeline.data import load_prepared, load_split

    data = load_prepared(run / "artifacts" / "prepare")
    model, _ = load_model(run / "artifacts" / "student" / "model.pt")
    split, where = data.test, "test split"
    if holdout_per_class:
        split = load_split(make_holdout(run, run / "holdout.npz", holdout_per_class), data.meta)
        where = "holdout"
    return _scored(f"{label} ({data.meta['image_size'][0]} px; accuracy on its {where}, {len(split.y):,} images)",
                   model, data, split)


def _models(work: Path, student: Path | None = None, holdout_per_class: int = 0,
            label: str = "the searched student") -> list[dict[str, Any]]:
    from models.tvcompat import import_torchvision

    tv = import_torchvision()
    out = [_student(student, holdout_per_class, label)] if student else []
    up = work / "upstream" / "artifacts"
    if (up / "teachers" / "mine.pt").is_file():
        from pipeline.checkpoint import load_student
        from pipeline.data import load_prepared

        data = load_prepared(up / "prepare")
        model, _ = load_student(up / "teachers" / "mine.pt", data.meta)
        out.append(_scored(f"resnet18 trained (trained_model benchmark, {data.meta['image_size'][0]} px)",
                           model, data, data.test))
    g = torch.Generator().manual_seed(0)
    for name in ("resnet18", "mobilenet_v2"):
        torch.manual_seed(0)
        out.append({"name": f"torchvision {name}, 224 px (random weights: latency only)",
                    "model": getattr(tv.models, name)(num_classes=1000).eval(), "shape": (3, 224, 224),
                    "calib": torch.randn(64, 3, 224, 224, generator=g), "test": None})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "int8")
    p.add_argument("--work", type=Path, default=Path("/tmp/slimdeploy_trained_model"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--student", type=Path, default=None, help="a pipeline run's work directory: its student too")
    p.add_argument("--holdout-per-class", type=int, default=0, metavar="N",
                   help="score --student on up to N images per class its prepare stage left out")
    p.add_argument("--student-label", default="the searched student", help="what --student is, for the table")
    args = p.parse_args(argv)
    import onnxruntime

    from pipeline.latency.backends import wall_timed
    from pipeline.latency.timing import TimingProtocol, measure_calls
    from pipeline.quantize import quantize_int8
    from pipeline.runtimes import export_onnx, ort_logits, ort_session

    protocol = TimingProtocol(passes=40, window_s=0.005, min_span_s=4.0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in _models(args.work, args.student, args.holdout_per_class, args.student_label):
            d = Path(tmp) / str(len(rows))
            d.mkdir()
            export_onnx(m["model"], m["shape"], d / "fp32.onnx")
            paths = {"fp32": d / "fp32.onnx"}
            records = {}
            for act, label in (("uint8", "int8 U8S8"), ("int8", "int8 S8S8")):
                paths[label] = d / f"{act}.onnx"
                records[label] = quantize_int8(paths["fp32"], paths[label], m["calib"], act)
            sessions = {k: ort_session(v, "cpu", threads=1) for k, v in paths.items()}
            x = torch.randn(1, *m["shape"], generator=torch.Generator().manual_seed(1)).numpy()
            calls = [wall_timed(lambda s=s, x=x: s.run(None, {s.get_inputs()[0].name: x})) for s in sessions.values()]
            rounds = [[t.ms for t in measure_calls(calls, protocol)] for _ in range(args.rounds)]
            row: dict[str, Any] = {"model": m["name"], "shape": list(m["shape"]), "rounds_ms": rounds,
                                   "variants": list(sessions), "quantization": records}
            for i, k in enumerate(sessions):
                ms = [r[i] for r in rounds]
                row[k] = {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms)}
                if i:
                    ratio = [r[0] / r[i] for r in rounds]
                    row[k]["speedup"] = {"median": statistics.median(ratio), "min": min(ratio), "max": max(ratio)}
            if m["test"] is not None:
                xs, ys = m["test"]
                acc = {k: (ort_logits(s, xs).argmax(1) == ys).double().mean().item() for k, s in sessions.items()}
                for k in sessions:
                    row[k]["test_acc"] = acc[k]
                    row[k]["drop_points"] = 100 * (acc["fp32"] - acc[k])
                row["test_images"] = len(ys)
            rows.append(row)
            print(table_rows([row]), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    meta = {"machine": machine(), "date": date.today().isoformat(), "commit": commit, "cpu_flags": cpu_flags(),
            "onnxruntime": onnxruntime.__version__, "rounds": args.rounds,
            "command": command_line("benchmarks.int8", argv if argv is not None else sys.argv[1:])}
    text = table(meta, rows)
    write_results(args.out, "rows.json", {"meta": meta, "rows": rows}, text)
    print(text)
    return 0


def table_rows(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        for k in r["variants"]:
            v = r[k]
            sp = v.get("speedup")
            lines.append(f"| {r['model']} | {k} | {v['median_ms']:.3f} ({v['min_ms']:.3f}-{v['max_ms']:.3f}) | "
                         + (f"{sp['median']:.2f}x ({sp['min']:.2f}-{sp['max']:.2f})" if sp else "1 (reference)") + " | "
                         + (f"{100 * v['test_acc']:.2f} ({-v['drop_points']:+.2f})" if "test_acc" in v else "-") + " |")
    return "\n".join(lines)


def table(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in meta["cpu_flags"].items())
    counts = {r["test_images"] for r in rows if "test_images" in r}
    held = counts.pop() if len(counts) == 1 else None  # several: each model's name says what it is scored on
    return "\n".join([
        f"INT8 against FP32 with ONNX Runtime {meta['onnxruntime']} (CPU provider, 1 thread, batch 1), {meta['machine']} "
        f"({flags}), {meta['date']}, commit {meta['commit']}", f"`{meta['command']}`", "",
        f"| model | variant | latency ms, median (min-max) over {meta['rounds']} interleaved rounds | fp32 / variant per "
        f"round (above 1: faster than fp32) | held-out accuracy % (points against fp32)"
        + (f", {held} images" if held else "") + " |",
        "|---|---|---|---|---|", table_rows(rows)])


if __name__ == "__main__":
    sys.exit(main())
