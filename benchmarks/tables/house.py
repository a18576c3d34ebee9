"""Tables of the house checks' result files: `make run` in fresh clones (time per stage, the
headline figures of each run), the tiny preset's margin over the chance guard, the own-model
walk-through, streaming from disk and pruning a trained model."""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.tables.fmt import RESULTS, Refs, mean_std, median_range, read_json

FRESH_CLONES = RESULTS / "fresh_clone/runs.json"
# the same check on other machines than the one FRESH_CLONES ran on (one folder each)
FRESH_CLONES_ELSEWHERE = (RESULTS / "fresh_clone/intel-vnni/runs.json",)
TINY_MARGIN = RESULTS / "tiny_margin/runs.json"
YOUR_MODEL = RESULTS / "your_model/result.json"


def _pct(x: Any) -> str:
    return f"{100 * x:.2f}" if isinstance(x, (int, float)) else "-"


def _ratio(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else "-"


def _files(paths: tuple[Path, ...], refs: Refs) -> Iterator[tuple[dict[str, Any], str, str]]:
    """Each result file of ``paths`` that exists (one per machine or model) as (its JSON, its source
    key in ``refs``, the CPU it ran on)."""
    for path in paths:
        if path.is_file():
            d = read_json(path)
            m = d.get("meta", d)
            yield d, refs.key(path, m["command"], m["machine"]), m["machine"].split(",")[0]


def fresh_clone_runs() -> tuple[list[str], list[list[str]], Refs]:
    """One row per clone: exit code, install and `make run` seconds, the figures compared between runs;
    the latest check first, then the same check on other machines."""
    refs = Refs()
    rows = []
    for d, k, cpu in _files((FRESH_CLONES, *FRESH_CLONES_ELSEWHERE), refs):
        for r in d["runs"]:
            h, c = r.get("metrics", {}), r.get("metrics", {}).get("compare", {})
            rows.append([cpu, str(r["clone"]), r["commit"], str(r["exit"]),
                         f"{r['install_s']:.0f}", f"{r['run_s']:.0f}",
                         _pct(h.get("student")), _pct(h.get("pruned")), _pct(c.get("uniform")), _pct(c.get("l1")),
                         _pct(c.get("unpruned")), _ratio(h.get("prune_measured_over_budget")),
                         _ratio(h.get("engine_over_budget")), str(h.get("step", "-")), h.get("kept_digest", "-"), k])
    header = ["CPU", "clone", "commit", "exit", "install s", "make run s", "student %", "pruned %", "uniform %", "L1 %",
              "unpruned %", "prune: measured / budget", "engine: measured / budget", "channel step",
              "kept channels (digest)", "src"]
    return header, rows, refs


def fresh_clone_stages() -> tuple[list[str], list[list[str]], Refs]:
    """Seconds per stage of `make run`, median (range) over the clones that completed."""
    d = read_json(FRESH_CLONES)
    refs = Refs()
    k = refs.key(FRESH_CLONES, d["command"], d["machine"])
    ok = [r for r in d["runs"] if r["exit"] == 0]
    stages = list(dict.fromkeys(s for r in ok for s in r["stages_s"]))
    total = statistics.median(r["run_s"] for r in ok) if ok else 0.0
    rows = []
    for s in stages:
        xs = [r["stages_s"][s] for r in ok if s in r["stages_s"]]
        rows.append([s, median_range(xs, 1), f"{100 * statistics.median(xs) / total:.0f}%" if total else "-", k])
    rows.append(["**`make run`, in all** (`dvc repro` and the report; install excluded)",
                 f"**{median_range([r['run_s'] for r in ok], 1)}**", "", k])
    return ["stage", "seconds, median (range)", "share", "src"], rows, refs


def tiny_margin() -> tuple[list[str], list[list[str]], Refs]:
    """Each network of the tiny preset against the chance guard's limit, over seeds."""
    d = read_json(TINY_MARGIN)
    refs = Refs()
    k = refs.key(TINY_MARGIN, d["command"], d["machine"])
    ok = [r for r in d["runs"] if r["exit"] == 0]
    limit = ok[0]["limit"] if ok else float("nan")
    rows = []
    for name in sorted({n for r in ok for n in r["acc"]}):
        xs = [r["acc"][name] for r in ok if name in r["acc"]]
        rows.append([name, f"{len(xs)} of {len(d['runs'])}", mean_std(xs), f"{100 * min(xs):.1f}",
                     f"{100 * limit:.1f}", f"{100 * (min(xs) - limit):+.1f}", k])
    return ["network", "seeds completed", "test acc % mean ± std", "lowest %", "guard limit %",
            "lowest - limit, points", "src"], rows, refs


def make_run_summary() -> tuple[str, str]:
    """(median (range) seconds of `make run`, "N of N exit 0") for the README."""
    d = read_json(FRESH_CLONES)
    ok = [r for r in d["runs"] if r["exit"] == 0]
    return median_range([r["run_s"] for r in ok], 0, " s"), f"{len(ok)} of {len(d['runs'])} exit 0"


def your_model() -> tuple[list[str], list[list[str]], Refs]:
    """The README's own-model walk-through: the input network, ours and the baselines, one run."""
    d = read_json(YOUR_MODEL)
    refs = Refs()
    k = refs.key(YOUR_MODEL, d["command"], d["machine"])
    o, e, p = d["outside"], d["engine"], d["predict"]
    dd = d["data"]
    rows = [[f"your model (torchvision resnet18, {o['epochs']} epochs outside the pipeline; "
             f"{dd['classes'] * dd['train_per_class']} train + {dd['classes'] * dd['test_per_class']} test images at "
             f"{dd['size']} px)",
             _pct(d["input_model_test_acc"]), f"{d['student_ms']:.3f} ms (measured by prune)", "-", k],
            [f"ours, budget {d['budget_ms']:.3f} ms (0.5 of it)", _pct(d["compressed_test_acc"]),
             f"{e['ms']:.3f} ms (engine)", f"{e['over_budget']:.3f} ({e['status']})", k]]
    for m, acc in d["baselines_test_acc"].items():
        rows.append([f"{m} (compare's joint run)", _pct(acc), "-", _ratio(d["baselines_over_budget"].get(m)), k])
    rows.append([f"bundle `pipeline.predict` against the slimmed PyTorch model, {p['images']} test images",
                 f"{100 * p['agreement']:.2f}% agree", "-", "-", k])
    return ["network", "test acc %", "latency", "measured / budget", "src"], rows, refs


STREAMING = RESULTS / "streaming/rows.json"
TRAINED_MODEL = RESULTS / "trained_model/rows.json"
TRAINED_MODEL_TUNED = RESULTS / "trained_model/lr0.01_padcrop_flip/rows.json"  # --set prune.optimizer.lr=0.01 train.augment=padcrop_flip


def streaming() -> tuple[list[str], list[list[str]], Refs]:
    """prepare.storage files against memory at 224 px: peak memory of prepare and of one epoch, images/s."""
    d = read_json(STREAMING)
    refs = Refs()
    m = d["meta"]
    k = refs.key(STREAMING, m["command"], m["machine"])
    rows = [[r["storage"], str(r["images"]), f"{r['prepare']['tree_pss_mb']:.0f}", f"{r['epoch']['tree_pss_mb']:.0f}",
             f"{r['epoch']['main_rss_mb']:.0f}", f"{r['train_images_per_s']:.1f}", k] for r in d["rows"]]
    return (["storage", "images", "prepare peak PSS MB", "epoch peak PSS MB (all processes)", "epoch peak RSS MB (main)",
             f"train images/s ({m['arch']})", "src"], rows, refs)


def trained_model(path: Path = TRAINED_MODEL) -> tuple[list[str], list[list[str]], Refs]:
    """Pruning a trained model: every method's held-out accuracy per budget, ours minus the best peer."""
    d = read_json(path)
    refs = Refs()
    m = d["meta"]
    k = refs.key(path, m["command"], m["machine"])
    o = m["outside"]
    unpruned = (f"the trained model, unpruned ({o['train_images']:,} training images, {o['epochs']} epochs outside; "
                f"held out: {o['test_images']:,})")
    rows = []
    for b, cell in d["summary"].items():
        if cell["unpruned_test_acc"] is not None:
            rows.append([b, unpruned, _pct(cell["unpruned_test_acc"]), "-", k])
        if u := m.get("unpruned_trained"):
            rows.append([b, "the trained model, unpruned, fine-tuned as every method is", mean_std(u["test_acc"], 100, 2),
                         "-", k])
        for name, label in (("ours", "ours (taylor)"), ("scp", "ours, prune.method scp"),
                            ("uniform", "uniform width scaling"), ("tp_norm", "Torch-Pruning group L2 norm"),
                            ("tp_taylor", "Torch-Pruning group Taylor"),
                            ("fastnas", "TensorRT Model Optimizer FastNAS")):
            c = cell.get(name, {})
            if name == "fastnas" and not c.get("test_acc"):
                continue
            rows.append([b, label, mean_std(c.get("test_acc", []), 100, 2),
                         ", ".join(f"{x:.3f}" for x in c.get("over_budget", [])) or "-", k])
        best = cell.get("best_peer")
        rows.append([b, "ours - best peer at the budget (points)" + (f"; best peer per seed: {', '.join(best)}" if best else ""),
                     mean_std(cell["ours_minus_best_peer"], 100, 2, signed=True),
                     ", ".join(f"{100 * x:+.2f}" for x in cell["ours_minus_best_peer"]), k])
        if v := cell.get("variant"):  # ours with other params (--variant), against the same peers per seed
            rows.append([b, f"{v['label']} (seeds {', '.join(map(str, v['seeds']))})", mean_std(v["test_acc"], 100, 2),
                         ", ".join(f"{x:.3f}" for x in v["over_budget"]) or "-", k])
            rows.append([b, f"{v['label']} - best peer of the same seed (points)",
                         mean_std(v["minus_best_peer"], 100, 2, signed=True),
                         ", ".join(f"{100 * x:+.2f}" for x in v["minus_best_peer"]), k])
    return ["budget", "method", "held-out acc % (mean ± std, seeds)", "measured / budget per seed", "src"], rows, refs


FASTNAS = RESULTS / "fastnas/rows.json"


def fastnas() -> tuple[list[str], list[list[str]], Refs]:
    """TensorRT Model Optimizer's FastNAS from the trained model, matched by measured latency, against ours."""
    d = read_json(FASTNAS)
    refs = Refs()
    m = d["meta"]
    k = refs.key(FASTNAS, m["command"], m["machine"])
    rows = []
    for b in sorted({r["budget"] for r in d["rows"]}, reverse=True):
        rs = [r for r in d["rows"] if r["budget"] == b]
        rows.append([f"{b:g}", mean_std([r["test_acc"] for r in rs], 100, 2),
                     mean_std([r["ours_test_acc"] for r in rs], 100, 2),
                     mean_std([r["ours_test_acc"] - r["test_acc"] for r in rs], 100, 2, signed=True),
                     ", ".join(f"{r['verdicts']['fastnas']['measured_over_budget']:.3f}" for r in rs),
                     ", ".join(f"{r['verdicts']['ours']['measured_over_budget']:.3f}" for r in rs),
                     ", ".join(f"{100 * r['flops']:g}%" for r in rs), k])
    return (["budget", "FastNAS held-out acc %", "ours held-out acc %", "ours - FastNAS (points)",
             "FastNAS measured / budget per seed", "ours measured / budget (read just after)", "FLOPs constraint taken",
             "src"], rows, refs)


INT8 = (RESULTS / "int8/rows.json", RESULTS / "int8/intel-vnni/rows.json")
PAIRED_READINGS = RESULTS / "paired_readings/rows.json"
PRECISION_RATIO = RESULTS / "precision_ratio/cifar10-cpu/rows.json"
JOINT_PRECISION = (RESULTS / "joint_precision/rows.json", RESULTS / "joint_precision/cifar10-cpu/rows.json")
JOINT_MODEL = "the trained resnet18 (32 px)"  # benchmarks/joint_precision.py's default --model
PRECISION_AUTO = (RESULTS / "precision_auto/rows.json", RESULTS / "precision_auto/intel-vnni/rows.json")


def _trained_as_long(rows: list[dict], acc: str) -> str:
    """benchmarks/joint_precision.py --unpruned-reference: the student trained as long, in int8."""
    xs = [r["unpruned_trained"].get(f"{acc}_int8") for r in rows if "unpruned_trained" in r]
    return mean_std(xs, digits=2) if xs and len(xs) == len(rows) and None not in xs else "-"


def _read_again(over: list[float]) -> str:
    """benchmarks/joint_precision.py --reread: the pairs' latencies read once more, median (range)."""
    return f"; read again {median_range(over, digits=3)}" if over else ""


def int8() -> tuple[list[str], list[list[str]], Refs]:
    """INT8 (U8S8, S8S8) against FP32 with ONNX Runtime on this CPU: latency per variant, speed-up, accuracy."""
    refs = Refs()
    rows = []
    for d, k, cpu in _files(INT8, refs):  # one file per machine
        m = d["meta"]
        vnni = "yes" if m["cpu_flags"].get("avx512_vnni") or m["cpu_flags"].get("avx_vnni") else "no"
        for r in d["rows"]:
            for v in r["variants"]:
                c = r[v]
                sp = c.get("speedup")
                rows.append([r["model"], v, cpu, vnni, f"{c['median_ms']:.3f} ({c['min_ms']:.3f}-{c['max_ms']:.3f})",
                             f"{sp['median']:.2f}x ({sp['min']:.2f}-{sp['max']:.2f})" if sp else "1",
                             f"{100 * c['test_acc']:.2f} ({-c['drop_points']:+.2f})" if "test_acc" in c else "-", k])
    return (["model", "variant", "CPU", "VNNI", "ms, median (min-max) over rounds", "fp32 / variant (above 1: faster)",
             "held-out acc % (points vs fp32)", "src"], rows, refs)


def paired_readings() -> tuple[list[str], list[list[str]], Refs]:
    """One pruned network against its model, read four ways, repeated: the spread and the composition effect."""
    d = read_json(PAIRED_READINGS)
    refs = Refs()
    m = d["meta"]
    k = refs.key(PAIRED_READINGS, m["command"], m["machine"])
    rows = [[way, f"{s['median']:.3f}", f"{s['min']:.3f}-{s['max']:.3f}", f"{(s['max'] - s['min']) / s['median']:.2f}", k]
            for way, s in d["summary"].items()]
    rows.append(["the prune stage's own reading (earlier)", f"{m['prune_stage_ratio']:.3f}", "-", "-", k])
    return ["way", "ours / model, median", "range", "(max - min) / median", "src"], rows, refs


def precision_ratio() -> tuple[list[str], list[list[str]], Refs]:
    """One int8 network's ratio to the fp32 model, read many times: what prune.reference_readings is sized by."""
    d = read_json(PRECISION_RATIO)
    refs = Refs()
    m = d["meta"]
    k = refs.key(PRECISION_RATIO, m["command"], m["machine"])
    rows = [[s["network"], s["protocol"], str(s["readings"]), f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f})",
             *(f"{100 * s[f'half_width_median_of_{n}']:.1f}%" for n in (1, 3, 5)), k] for s in d["summary"]]
    return (["network", "protocol", "readings", "fp32 / int8, median (range)", "± 90%, one reading", "median of 3",
             "median of 5", "src"], rows, refs)


def precision_auto() -> tuple[list[str], list[list[str]], Refs]:
    """What target.precision auto chose, run after run, and on what evidence."""
    refs = Refs()
    rows = []
    for d, k, cpu in _files(PRECISION_AUTO, refs):  # one file per machine
        for r in d["rows"]:
            rs = r["runs"]
            chosen = ", ".join(f"{p} in {sum(x['precision'] == p for x in rs)}"
                               for p in sorted({x["precision"] for x in rs}))
            rows.append([r["case"], cpu, str(len(rs)), chosen,
                         median_range([x["int8_over_fp32"] for x in rs], digits=3),
                         f"{100 * rs[0]['fp32_val_acc']:.2f}", f"{100 * rs[0]['int8_val_acc']:.2f}",
                         str(rs[0].get("int8_float_layers", "-")), median_range([x["seconds"] for x in rs], digits=1), k])
    return (["network", "CPU", "runs", "chosen", "int8 / fp32 latency, median (range) over runs", "fp32 val acc %",
             "int8 val acc %", "int8 layers left in float", "stage s", "src"], rows, refs)


def joint_precision() -> tuple[list[str], list[list[str]], Refs]:
    """Pruned in fp32, INT8 alone and pruned in int8 (joint) at fractions of the model's fp32 latency,
    per model (one result file each): accuracy on the holdout where the file has one, else the test split."""
    refs = Refs()
    rows = []
    for d, k, _ in _files(JOINT_PRECISION, refs):  # one file per model
        m = d["meta"]
        judged = [r for r in d["rows"] if "judge" in r]
        acc = "holdout_acc" if judged and "holdout_images" in m else "test_acc"
        scored = f"holdout, {m['holdout_images']:,} images" if acc == "holdout_acc" else "test split"
        for b in sorted({r["budget"] for r in judged}, reverse=True):
            j = [r["judge"] for r in judged if r["budget"] == b]
            rows.append([m.get("model", JOINT_MODEL), f"{b:g}", str(len(j)), scored,
                         mean_std([x["model_fp32"][acc] for x in j], digits=2)]
                        + [f"{mean_std([x[c][acc] for x in j], digits=2)}; "
                           f"{median_range([x[c]['over_budget'] for x in j], digits=3)}"
                           + (f" [{statistics.median(x[c]['over_budget_loop_protocol'] for x in j):.3f}]"
                              if all("over_budget_loop_protocol" in x[c] for x in j) else "")
                           + _read_again([x[c]["over_budget"] for r in judged if r["budget"] == b
                                          for x in r.get("rereads", [])])
                           for c in ("fp32_pruned", "int8_only", "joint")]
                        + [_trained_as_long([r for r in judged if r["budget"] == b], acc),
                           mean_std([x["joint"][acc] - x["fp32_pruned"][acc] for x in j], digits=2, signed=True), k])
    return (["model", "budget (of the fp32 model)", "seeds", "scored on", "fp32 model acc %",
             "pruned fp32: acc %; latency / budget", "INT8 alone: acc %; latency / budget",
             "ours, pruned in int8: acc %; latency / budget", "unpruned, trained as long, int8: acc %",
             "ours - pruned fp32 (points)", "src"], rows, refs)
