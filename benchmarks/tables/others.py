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


THROUGHPUT = (RESULTS / "train_throughput_cpu.json",)


def train_throughput() -> tuple[list[str], list[list[str]], Refs]:
    refs = Refs()
    rows = []
    for path in THROUGHPUT:
        d = read_json(path)
        dev = d.get("device", {})
        cmd = (f"python -m benchmarks.train_throughput --arch {d['arch']} --device {dev.get('type', 'auto')} "
               f"--batch {d['batch']} --images {d['images']} --matmul {d['matmul']['n']} --json {path}")
        k = refs.key(path, cmd, f"{d.get('host', device_text(dev))}; torch {dev.get('torch', '?')}")
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


