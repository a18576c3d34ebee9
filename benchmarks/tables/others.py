"""Tables of the other benchmarks' result files: latency model, timing noise, throughput, the
preset end to end, failure handling."""

from __future__ import annotations

import re

from benchmarks.tables.fmt import REPO, RESULTS, Refs, device_text, median_range, read_json
from benchmarks.tables.protocol import seed_list

# --------------------------------------------------------------------------------------------
# Other benchmarks


LATENCY_RUNS = (("quiet machine", RESULTS / "latency_model/runs.json"),
                ("a busy loop on the other core", RESULTS / "latency_model_loaded/runs.json"))


def latency_model() -> tuple[list[str], list[list[str]], Refs]:
    refs = Refs()
    rows = []
    for label, path in LATENCY_RUNS:
        runs = read_json(path)
        dev = runs[0].get("device")
        k = refs.key(path, f"python -m benchmarks.latency_model --runs {len(runs)} --out {path.parent}",
                     device_text(dev, runs[0].get("backend", "")))
        steps = sorted({r["step"] for r in runs})
        agree = sum(len(set(r["repeat_steps"])) == 1 for r in runs)
        rows.append([label, str(len(runs)), f"{seed_list(steps)} (repeats agreeing in {agree} of {len(runs)})",
                     median_range([100 * r["mape"] for r in runs], 2, "%"),
                     median_range([100 * r["max_ape"] for r in runs], 1, "%"),
                     median_range([100 * r["within_10pct"] for r in runs], 0, "%"),
                     median_range([r["spearman"] for r in runs], 3),
                     median_range([100 * r["uncalibrated_mape"] for r in runs], 1, "%"),
                     median_range([r["points"] for r in runs], 0),
                     median_range([r["stage_wall_s"] for r in runs], 1), k])
    header = ["condition", "runs", "channel step", "held-out MAPE", "max error", "within +-10%", "Spearman",
              "MAPE before calibration", "table points", "stage s", "src"]
    return header, rows, refs


TIMING_NOISE = (RESULTS / "timing_noise/copies1_rounds40/timing_noise.json",
                RESULTS / "timing_noise/copies2_rounds20/timing_noise.json")


def timing_noise() -> tuple[list[str], list[list[str]], Refs]:
    refs = Refs()
    rows = []
    for path in TIMING_NOISE:
        d = read_json(path)
        fp = d.get("fingerprint", {})
        vers = ", ".join(f"{k} {v}" for k, v in sorted((fp.get("versions") or {}).items()))
        copies = len({r["network"] for r in d["rows"] if r["network"].startswith("student copy")})
        rounds = max(r["rounds"] for r in d["rows"])
        cmd = f"python -m benchmarks.timing_noise --run RUN --rounds {rounds} --copies {copies} --out {path.parent}"
        k = refs.key(path, cmd, f"{d.get('machine', 'not recorded')}; {vers or fp.get('backend', '')}")
        for r in d["rows"]:
            if r["estimator"] != "fastest" or not r["network"].startswith("student copy"):
                continue
            proto = f"{r['protocol']} ({r['passes']} windows over {r['span_s']:g} s)"
            rows.append([str(copies), r["load"], proto, r["network"], str(r["rounds"]), f"{r['median']:.3f}",
                         f"{r['min']:.3f}-{r['max']:.3f}", f"{r['sd']:.3f}", k])
    header = ["copies per round", "load", "protocol", "network", "rounds", "median ratio", "min-max", "sd", "src"]
    return header, rows, refs


GPU_CHECK = RESULTS / "gpu_check/h200-48df9a6"
THROUGHPUT = (RESULTS / "train_throughput_cpu.json", GPU_CHECK / "throughput.json")


def train_throughput() -> tuple[list[str], list[list[str]], Refs]:
    refs = Refs()
    rows = []
    for path in THROUGHPUT:
        d = read_json(path)
        dev = d.get("device", {})
        cmd = (f"python -m benchmarks.train_throughput --arch {d['arch']} --device {dev.get('type', 'auto')} "
               f"--batch {d['batch']} --images {d['images']} --matmul {d['matmul']['n']} --json {path}")
        machine = f"{dev.get('name') or d.get('host', device_text(dev))}; torch {dev.get('torch', '?')}"
        k = refs.key(path, d.get("command", cmd), machine)
        mm = d["matmul"]
        for r in d["rows"]:
            rows.append([d["arch"], r["variant"], str(d["batch"]),
                         f"{r['images_per_s']:.0f} ({r['min']:.0f}-{r['max']:.0f})",
                         str(r["epochs_timed"]), f"{mm['tflops_median']:.3f} ({mm['dtype'].removeprefix('torch.')}, "
                         f"{mm['n']}x{mm['n']})", f"{100 * r['utilisation']:.0f}%", k])
    header = ["model", "variant", "batch", "images/s, median (range) over epochs", "epochs timed",
              "measured matmul TFLOP/s", "of the matmul rate", "src"]
    return header, rows, refs


PIPELINE_LOG = RESULTS / "cifar10_pipeline/cifar10-cpu-verdict/console.log"
PIPELINE_ENGINE = RESULTS / "cifar10_pipeline/cifar10-cpu-verdict/engine.json"


def _md_tables(text: str) -> list[list[dict[str, str]]]:
    """The Markdown tables in ``text`` (a benchmark's console log), as lists of {header: cell}."""
    tables, cur = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cur.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif cur:
            head, body = cur[0], [r for r in cur[2:]]
            tables.append([dict(zip(head, r)) for r in body])
            cur = []
    return tables


def cifar10_pipeline() -> tuple[list[str], list[list[str]], Refs]:
    refs = Refs()
    text = (REPO / PIPELINE_LOG).read_text()
    head = next(line for line in text.splitlines() if line.startswith("## CIFAR-10 pipeline"))
    preset = re.search(r"preset (\S+)", head).group(1).rstrip(",")
    mach = re.search(r"machine: (.*)$", head).group(1)
    eng = read_json(PIPELINE_ENGINE)
    vers = ", ".join(f"{k} {v}" for k, v in sorted((eng.get("versions") or {}).items()))
    k = refs.key(PIPELINE_LOG, f"python -m benchmarks.cifar10_pipeline --preset {preset}", f"{mach}; {vers}")
    ke = refs.key(PIPELINE_ENGINE, f"python -m benchmarks.cifar10_pipeline --preset {preset}", f"{mach}; {vers}")
    models, lat, stages = [t for t in _md_tables(text) if t][:3]
    rows = [[m["model"], m["params"], m["test acc"], "-", k] for m in models]
    for m in lat:
        if m["latency (target)"].startswith("engine"):
            continue  # engine.json's row below says more: the verdict and the p50
        rows.append([f"latency: {m['latency (target)']}", "-", "-", f"{m['ms']} ms = {m['of budget']} of the budget",
                     k])
    lt = eng["latency"]
    rows.append([f"engine ({eng['backend']}): fastest of {lt['windows']} windows, the budget verdict", "-",
                 f"{100 * eng['test_acc']:.1f}%",
                 f"{lt['ms']:.4f} ms = {eng['measured_over_budget']:.3f} of the budget ({eng['verdict']}); "
                 f"p50 of {lt['runs']} calls {eng['p50_over_budget']:.3f}", ke])
    total = next(s for s in stages if "total" in s["stage"])
    secs, _, rest = total["seconds"].replace("*", "").partition(" ")
    rows.append(["the whole preset, every stage run (no DVC cache)", "-", "-", f"{secs} s {rest}".strip(), k])
    header = ["network or figure", "params", "test acc (1,000 images)", "latency / time", "src"]
    return header, rows, refs


ROBUSTNESS = RESULTS / "robustness/results.json"


def robustness() -> tuple[list[str], list[list[str]], Refs]:
    refs = Refs()
    d = read_json(ROBUSTNESS)
    k = refs.key(ROBUSTNESS, f"python -m benchmarks.robustness --out {ROBUSTNESS.parent}",
                 d.get("machine", "not recorded"))
    rows = []
    det = d.get("determinism")
    if det:
        rows.append(["`dvc repro -f` of a teacher, params unchanged", "byte-identical checkpoint" if det["identical"]
                     else "checkpoint differs", f"dvc status clean: {det['dvc_status_clean']}", k])
    dv = d.get("diverged")
    if dv:
        rows.append(["teacher with lr 10 (diverges)", f"stage exit 2: {dv['stage_exited_2']}",
                     f"outputs left: {dv['outputs_left']}; lr restored, checkpoint identical: "
                     f"{dv['restored_identical']}", k])
    for name, what in (("killed_teacher", "teacher"), ("killed_prune", "prune stage")):
        kt = d.get(name)
        if kt:
            eq = kt["equal"]
            same = eq if isinstance(eq, bool) else ", ".join(f"{a} {'equal' if v else 'differs'}"
                                                             for a, v in eq.items())
            rows.append([f"`kill -9` of the {what} after one epoch, then `dvc repro`",
                         f"resumed from its state: {kt['resumed_from_state']}",
                         f"against an uninterrupted run: {same}", k])
    for case, res in (d.get("bundle") or {}).items():
        if not isinstance(res, dict):
            continue
        msg = re.sub(r"/tmp/\S+?/", "<tmp>/", res["message"]).strip()
        if res["exit"] == 0 and msg.count("\t") == 2:
            _, cls, prob = msg.split("\t")
            msg = f"predicted class {cls}, probability {prob}"
        rows.append([f"`pipeline.predict` on a bundle: {case.replace('_', ' ')}", f"exit {res['exit']}",
                     msg if len(msg) <= 110 else msg[:107] + "...", k])
    return ["case", "result", "detail", "src"], rows, refs




def _gpu_check_refs(engine_run: bool) -> tuple[Refs, str, str, dict]:
    """The check's results, its source key and (``engine_run``) the key of the run without AOTInductor."""
    d = read_json(GPU_CHECK / "results.json")
    refs = Refs()
    machine = f"{d['device']['name']}, torch {d['device']['torch']}"
    a = refs.key(GPU_CHECK / "results.json", "python3 -m benchmarks.gpu_check OUT --budget-s 450 --throughput-images 5000",
                 machine)
    b = refs.key(GPU_CHECK / "run_no_aoti/engine.json", "python3 -m stages --params P --workdir DIR (P: presets/"
                 "gpu-check.yaml with engine.aoti false; " + str(GPU_CHECK / "README.md") + ")", machine) if engine_run else ""
    return refs, a, b, d


def gpu_check_stages() -> tuple[list[str], list[list[str]], Refs]:
    """Every stage of the gpu-check preset on the GPU: the check's run (stopped in the engine stage's
    AOTInductor compile by the check's time budget) and the run without AOTInductor (its engine)."""
    refs, a, b, d = _gpu_check_refs(engine_run=True)
    rows = [[s["stage"], s["result"], "-" if s.get("seconds") is None else f"{s['seconds']:.1f}", s.get("figures", ""), a]
            for s in d["stages"]]
    e = read_json(GPU_CHECK / "run_no_aoti/engine.json")
    te = e.get("torch_engine", {})
    log = (REPO / GPU_CHECK / "pipeline_no_aoti.log").read_text()
    secs = re.search(r"stage engine failed with exit code \d+ after ([0-9.]+) s|\[\d+/\d+\] engine: done in ([0-9.]+) s", log)
    rows.append(["engine (AOTInductor off)", "FAILED: over budget" if not e["within_budget"] else "ok",
                 next((g for g in secs.groups() if g), "-") if secs else "-",
                 f"{e['backend']} {te.get('kind')} + CUDA graph {te.get('cuda_graph')}, {e['precision']}, batch "
                 f"{e['batch_size']}: {e['latency']['ms']:.4f} ms alone; paired with the student "
                 f"{e['paired_over_budget']:.3f} of the budget (noise {100 * e['noise']:.1f}%); test acc "
                 f"{e['test_acc']:.3f} (ONNX {e['test_acc_onnx']:.3f}), agreement {e['top1_agreement_with_onnx']:.3f}", b])
    return ["stage", "result", "s", "figures", "src"], rows, refs


def gpu_check_engines() -> tuple[list[str], list[list[str]], Refs]:
    """Engine builds in every precision on the GPU (benchmarks/gpu_engines.py inside the check)."""
    refs, a, _, d = _gpu_check_refs(engine_run=False)
    e = d["engines"]

    def lat(r: dict) -> str:
        t = r.get("latency") or {}
        return f"{t['ms']:.3f} ({t['p50_ms']:.3f} / {t['p99_ms']:.3f})" if t else r.get("error", "-")

    def diff(r: dict) -> str:
        if "relative_diff_vs_fp32" not in r:
            return "-"
        return f"{r['relative_diff_vs_fp32']:.1e}, {100 * r['top1_agreement_vs_fp32']:.1f}%"

    rows = []
    for r in e.get("torchvision", []):
        rows.append([f"{r['model']} (random weights) {r['image_size']} px", f"{r['engine']} {r['precision']}",
                     str(r["batch"]), lat(r), diff(r), "-", a])
    for r in e.get("run", {}).get("torch_engine", []):
        rows.append(["the pipeline's slimmed network, 32 px", f"torch {r['precision']}", "32", lat(r), diff(r),
                     f"{100 * r['test_acc']:.1f}", a])
    ort = e.get("run", {}).get("onnxruntime_cpu", {})
    for r in ort.get("rows", []):
        rows.append(["the slimmed network on the host CPU, 1 thread", f"onnxruntime {ort['onnxruntime']} {r['precision']}",
                     "1", f"{r['ms']:.3f} ({r['p50_ms']:.3f} / {r['p99_ms']:.3f}); {r['speedup_vs_fp32']:.2f}x fp32",
                     f"-, {100 * r['top1_agreement_vs_fp32']:.1f}%", f"{100 * r['test_acc']:.1f}", a])
    return (["network", "engine, precision", "batch", "ms: fastest window median (p50 / p99 of all calls)",
             "vs fp32: max abs diff / max logit, top-1 agreement", "test acc %", "src"], rows, refs)
