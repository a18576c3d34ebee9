"""The one-command GPU check: everything the CUDA path must show, in one call, one results table.

    python3 -m benchmarks.gpu_check OUT_DIR [--budget-s 540]

For a bare CUDA machine with PyTorch but without DVC or a network (../shared/GPU.md). Prepare
the checkout first (README, "GPU check"): the missing wheels in ``.whl/`` and the CIFAR-10 JPEG
archive at ``.cifar/train.tar.gz``; both folders are git-ignored and travel with the checkout.
Then, in order, each step with its own time limit inside ``--budget-s`` (9 minutes by default,
what one H100 call allows):

1. install the wheels from ``.whl/`` into ``.site/`` (``pip --no-index``), only if the project's
   imports are missing;
2. the CUDA tests (``pytest -m "gpu and not slow"``: the H100 failures' regression tests, the
   torch engine's CUDA graph in fp16 and bf16, the CUDA graph training step);
3. the pipeline on ``presets/gpu-check.yaml`` through handoff, with ``python -m stages`` (no DVC);
4. engine builds in every precision (``benchmarks/gpu_engines.py``): the torch engine in fp32,
   fp16 and bf16 for two torchvision models at 224 px and the pipeline's slimmed network, TensorRT
   fp16 and int8 (Q/DQ) where installed, and INT8 on the host CPU with ONNX Runtime;
5. the training throughput benchmark (ResNet-56, batch 128: CUDA graph step against eager).

It writes ``OUT_DIR/results.md`` (the table for docs/history.md, rewritten after every step, so
a run cut short still leaves what it measured) and ``OUT_DIR/results.json``, plus every step's log.
Exit status 0 only when every step passed. Only the standard library is imported here: the
project's dependencies may not be installed yet when it starts.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NEEDED = ("pydantic", "torch_pruning", "yaml", "onnx", "onnxruntime", "sklearn", "tqdm")


def _env() -> dict[str, str]:
    site = REPO / ".site"
    path = [str(REPO), *([str(site)] if site.is_dir() else []), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}


def _run(cmd: list[str], log: Path, timeout: float) -> tuple[int | None, float]:
    """(exit status or None on timeout, seconds); stdout and stderr go to ``log``. On timeout the
    whole process group is killed (a stage started by ``python -m stages`` included)."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    return rc, time.perf_counter() - t0


def _missing() -> list[str]:
    code = "import importlib.util,sys; print(','.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))"
    out = subprocess.run([sys.executable, "-c", code, *NEEDED], env=_env(), capture_output=True, text=True).stdout
    return [m for m in out.strip().split(",") if m]


def _device() -> dict[str, Any]:
    code = ("import json,torch; c=torch.cuda.is_available(); print(json.dumps({'cuda': c, 'torch': torch.__version__, "
            "'name': torch.cuda.get_device_name(0) if c else None, 'cuda_version': torch.version.cuda}))")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"cuda": False, "error": (out.stderr.strip().splitlines() or ["torch does not import"])[-1]}


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _pytest_counts(log: Path) -> str:
    text = log.read_text() if log.is_file() else ""
    m = re.findall(r"^=* ?(\d+ (?:passed|failed|skipped|error|deselected)[^\n]*?) in [0-9.]+s", text, re.M)
    return m[-1] if m else "no summary (see log)"


def _fmt(v: Any, spec: str = ".4g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def write_results(out: Path, res: dict[str, Any]) -> None:
    (out / "results.json").write_text(json.dumps(res, indent=2, default=str))
    d = res["device"]
    lines = [f"## GPU check ({res['date']}): {d.get('name') or 'no CUDA device'}",
             "", f"torch {d.get('torch')} (CUDA {d.get('cuda_version')}), Python {platform.python_version()}, "
             f"host {platform.node() or '?'}; command `python3 -m benchmarks.gpu_check OUT`; "
             f"{res['elapsed_s']:.0f} s of a {res['budget_s']:.0f} s budget", "",
             "| step | result | seconds |", "|---|---|---|"]
    for s in res["steps"]:
        lines.append(f"| {s['step']} | {s['result']} | {s['seconds']:.1f} |")
    if res.get("stages"):
        lines += ["", "| stage | result | seconds | figures |", "|---|---|---|---|"]
        for s in res["stages"]:
            lines.append(f"| {s['stage']} | {s['result']} | {_fmt(s.get('seconds'), '.1f')} | {s.get('figures', '')} |")
    lines += engine_lines(res.get("engines") or {})
    if res.get("throughput"):
        t = res["throughput"]
        lines += ["", f"Training throughput, {t.get('arch')} batch {t.get('batch')} ({t.get('images')} synthetic images "
                  f"per epoch; matmul {t.get('matmul', {}).get('tflops_median', 0):.1f} TFLOP/s):", "",
                  "| variant | step | images/s median | range | of matmul throughput |", "|---|---|---|---|---|"]
        for r in t.get("rows", []):
            lines.append(f"| {r['variant']} | {r.get('step_mode', '?')} | {r['images_per_s']:.0f} | "
                         f"{r['min']:.0f}-{r['max']:.0f} | {100 * r['utilisation']:.2f}% |")
        rows = t.get("rows", [])
        if len(rows) >= 2:
            lines.append(f"\nCUDA graph step / eager step (same run): {rows[0]['images_per_s'] / rows[1]['images_per_s']:.2f}x")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def engine_lines(e: dict[str, Any]) -> list[str]:
    """The engine step's tables (benchmarks/gpu_engines.py's JSON) for results.md."""
    if not e:
        return []
    cpu = e.get("host_cpu", {})
    flags = ", ".join(f for f in ("avx512_vnni", "avx_vnni", "amx_int8") if cpu.get(f)) or "no VNNI / AMX"
    lines = ["", f"Engines on {e.get('device', {}).get('name', '?')} (host CPU {cpu.get('name', '?')}, {flags}):", "",
             "| network | engine | precision | batch | ms (fastest window median) | p50 / p99 ms | vs fp32: max rel diff, "
             "top-1 agreement | test acc |", "|---|---|---|---|---|---|---|---|"]

    def row(net: str, r: dict[str, Any], batch: Any) -> str:
        lat = r.get("latency") or {}
        if "error" in r:
            return f"| {net} | {r.get('engine')} | {r.get('precision')} | {batch} | {r['error']} | | | |"
        return (f"| {net} | {r.get('engine')} | {r.get('precision')} | {batch} | {_fmt(lat.get('ms'))} | "
                f"{_fmt(lat.get('p50_ms'))} / {_fmt(lat.get('p99_ms'))} | {_fmt(r.get('relative_diff_vs_fp32'), '.2e')}, "
                f"{_fmt(r.get('top1_agreement_vs_fp32'))} | {_fmt(r.get('test_acc'))} |")

    for r in e.get("torchvision", []):
        lines.append(row(f"{r.get('model')} {r.get('image_size')} px", r, r.get("batch")))
    run = e.get("run", {})
    if "error" in run:
        lines.append(f"| the pipeline's slimmed network | - | - | - | {run['error']} | | | |")
    for r in run.get("torch_engine", []):
        lines.append(row("the pipeline's slimmed network", r, 32))
    ort = run.get("onnxruntime_cpu", {})
    if ort.get("error"):
        lines.append(f"| slimmed, host CPU | onnxruntime | int8 | 1 | {ort['error']} | | | |")
    for r in ort.get("rows", []):
        lines.append(f"| slimmed, host CPU (1 thread) | onnxruntime {ort.get('onnxruntime')} | {r['precision']} | 1 | "
                     f"{_fmt(r['ms'])} ({r['speedup_vs_fp32']:.2f}x fp32) | {_fmt(r['p50_ms'])} / {_fmt(r['p99_ms'])} | "
                     f"-, {_fmt(r['top1_agreement_vs_fp32'])} | {_fmt(r['test_acc'])} |")
    return lines


def stage_log(log: Path) -> list[tuple[str, str, float | None]]:
    """(stage, result, seconds) from ``python -m stages``' own log lines: done, failed, or the one
    still running when the step was stopped."""
    text = log.read_text() if log.is_file() else ""
    rows: dict[str, tuple[str, float | None]] = {}
    for m in re.finditer(r"^\[\d+/\d+\] (\S+): (done in ([0-9.]+) s)?", text, re.M):
        name = m.group(1)
        rows[name] = ("ok", float(m.group(3))) if m.group(2) else ("stopped (time budget)", None)
    for m in re.finditer(r"^error: stage (\S+) failed with exit code (-?\d+) after ([0-9.]+) s", text, re.M):
        rows[m.group(1)] = (f"FAILED (exit {m.group(2)})", float(m.group(3)))
    return [(n, r, sec) for n, (r, sec) in rows.items()]


def stage_figures(run: Path, log: Path) -> list[dict[str, Any]]:
    """One row per pipeline stage reached: its result, wall time and the figures that matter."""
    m = {n: _read(run / "metrics" / f"{n}.json") for n in
         ("prepare", "ensemble", "search", "student", "profile", "prune", "slim", "compare", "export", "engine")}
    rows = []
    for name, result, sec in stage_log(log):
        if result != "ok":
            rows.append({"stage": name, "result": result, "seconds": sec, "figures": ""})
            continue
        base = name.split("@")[0]
        fig = ""
        if base == "train_teacher":
            t = _read(run / "metrics" / "teachers" / f"{name.split('@')[1]}.json")
            fig = f"test acc {_fmt(t.get('test_acc'))}, {t.get('step_mode', '?')}"
        elif base == "train_student":
            fig = f"test acc {_fmt(m['student'].get('test_acc'))}, {m['student'].get('step_mode', '?')}"
        elif base == "profile":
            p = m["profile"].get("predictor", {})
            fig = (f"step {m['profile'].get('multiple')}, held-out MAPE {_fmt(p.get('heldout_mape'), '.2%')}, "
                   f"Spearman {_fmt(p.get('heldout_spearman'), '.3f')}, {m['profile'].get('removable_blocks')} removable blocks")
        elif base == "prune":
            q = m["prune"]
            floor = (q["smallest_network_ms"] / q["student_ms"]) if q.get("student_ms") else None
            fig = (f"measured/budget {_fmt(q.get('measured_over_budget'), '.3f')}, smallest network "
                   f"{_fmt(floor, '.3f')} of the student, {len(q.get('removed_blocks', []))}/{q.get('removable_blocks')} "
                   f"blocks removed, test acc {_fmt(q.get('test_acc'))} (student {_fmt(q.get('test_acc_student'))})")
        elif base == "slim":
            fig = f"max abs diff {_fmt(m['slim'].get('max_abs_diff_vs_masked'), '.2e')}"
        elif base == "compare":
            c = m["compare"]
            fig = ", ".join(f"{k} {_fmt(c[k].get('test_acc'))}" for k in ("ours", "uniform", "l1")
                            if isinstance(c.get(k), dict))
        elif base == "export":
            fig = f"max abs diff {_fmt(m['export'].get('max_abs_diff'), '.2e')}"
        elif base == "engine":
            e, lat = m["engine"], m["engine"].get("latency", {})
            te = e.get("torch_engine", {})
            how = f" {te['kind']} (AOTInductor: {te.get('aoti')}; CUDA graph: {te.get('cuda_graph')})" if te else ""
            fig = (f"{e.get('backend')}{how} {e.get('precision', '')}, batch {e.get('batch_size')}: "
                   f"p50 {_fmt(lat.get('p50_ms'))} ms, p99 {_fmt(lat.get('p99_ms'))} ms, measured/budget "
                   f"{_fmt(e.get('measured_over_budget'), '.3f')}, test acc {_fmt(e.get('test_acc'))}, agreement "
                   f"{_fmt(e.get('top1_agreement_with_onnx'))}")
        rows.append({"stage": name, "result": "ok", "seconds": sec, "figures": fig})
    return rows


def missing_data_of(preset: Path) -> list[str]:
    """The preset's ``root:`` paths (relative to the repository) that do not exist; [] when it has
    none or cannot be read (the pipeline step then says what is wrong)."""
    try:
        roots = re.findall(r"^\s*root:\s*([^\s#]+)", preset.read_text(), re.MULTILINE)
    except OSError:
        return []
    return [r for r in roots if not (REPO / r).exists()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="directory for results.md, results.json and the logs")
    p.add_argument("--budget-s", type=float, default=540.0, help="wall time for everything (default 9 minutes)")
    p.add_argument("--preset", default="gpu-check", help="pipeline preset (presets/NAME.yaml)")
    p.add_argument("--params", type=Path, default=None, help="a params file instead of --preset (dry runs)")
    p.add_argument("--allow-cpu", action="store_true", help="run on a machine without CUDA (a dry run of the script)")
    p.add_argument("--throughput-images", type=int, default=10_000)
    args = p.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    left = lambda: args.budget_s - (time.perf_counter() - t_start)  # noqa: E731
    res: dict[str, Any] = {"date": str(date.today()), "budget_s": args.budget_s, "steps": [], "stages": [],
                           "elapsed_s": 0.0, "device": {}}

    def step(name: str, result: str, seconds: float) -> None:
        res["steps"].append({"step": name, "result": result, "seconds": seconds})
        res["elapsed_s"] = time.perf_counter() - t_start
        write_results(out, res)
        print(f"[gpu_check] {name}: {result} ({seconds:.1f} s)", flush=True)

    # 0. the data the pipeline step reads, before minutes go into the other steps
    missing_data = [] if args.params else missing_data_of(REPO / "presets" / f"{args.preset}.yaml")
    if missing_data:
        step("data", f"FAILED: {missing_data[0]} is not there (README: GPU check, `make gpu-bundle` copies it)", 0.0)
        return 1

    # 1. wheels
    t0 = time.perf_counter()
    missing = _missing()
    if missing:
        wheels = sorted(glob.glob(str(REPO / ".whl" / "*.whl")))
        if not wheels:
            step("install wheels", f"FAILED: {missing} missing and no wheels in .whl/ (README: GPU check)", 0.0)
            return 1
        rc, _ = _run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                      str(REPO / ".site"), *wheels], out / "install.log", min(120.0, left()))
        missing = _missing()
        step("install wheels", f"{len(wheels)} wheels into .site/" + (f"; still missing {missing}" if missing else "")
             if rc == 0 else f"FAILED (exit {rc}, install.log)", time.perf_counter() - t0)
        if missing:
            return 1
    else:
        step("install wheels", "nothing missing", time.perf_counter() - t0)
    res["device"] = _device()
    if not res["device"].get("cuda") and not args.allow_cpu:
        step("device", f"FAILED: no CUDA device ({res['device'].get('error', 'torch.cuda.is_available() is False')})", 0.0)
        return 1
    ok = True

    # 2. CUDA tests (the pipeline, step 3, gets the largest share of the budget)
    rc, sec = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu and not slow",
                    "tests/test_gpu.py", "tests/test_torch_engine.py", "tests/test_latency.py"],
                   out / "gpu_tests.log", min(0.15 * args.budget_s, left() - 0.7 * args.budget_s))
    ok &= rc == 0
    step("CUDA tests (pytest -m 'gpu and not slow')",
         ("passed: " if rc == 0 else "FAILED: " if rc is not None else "TIMEOUT: ") + _pytest_counts(out / "gpu_tests.log"), sec)

    # 3. the pipeline through handoff (the largest share; engines and throughput keep theirs)
    run = out / "run"
    cmd = [sys.executable, "-m", "stages", "--workdir", str(run)]
    cmd += ["--params", str(args.params.resolve())] if args.params else ["--preset", args.preset]
    rc, sec = _run(cmd, out / "pipeline.log", left() - 0.25 * args.budget_s)
    res["stages"] = stage_figures(run, out / "pipeline.log")
    failed = [r["stage"] for r in res["stages"] if r["result"] != "ok"]
    ok &= rc == 0
    step(f"pipeline {args.params.name if args.params else args.preset} through handoff",
         "ok" if rc == 0 else ("TIMEOUT" if rc is None else f"FAILED at {failed[-1] if failed else '?'} (pipeline.log)"), sec)

    # 4. engine builds in every precision: torchvision models at 224 px and the pipeline's slimmed network
    ej = out / "engines.json"
    rc, sec = _run([sys.executable, "-m", "benchmarks.gpu_engines", "--json", str(ej), "--run", str(run),
                    *(["--models", "resnet18", "--batch", "4"] if args.allow_cpu else [])],
                   out / "engines.log", left() - 0.1 * args.budget_s)
    res["engines"] = _read(ej)
    ok &= rc == 0
    step("engine precisions (torch fp32/fp16/bf16, TensorRT where installed, INT8 on the host CPU)",
         "ok" if rc == 0 else ("TIMEOUT (engines.log)" if rc is None else f"FAILED (exit {rc}, engines.log)"), sec)

    # 5. throughput, with what is left
    tp = out / "throughput.json"
    rc, sec = _run([sys.executable, "-m", "benchmarks.train_throughput", "--arch", "resnet56", "--batch", "128",
                    "--images", str(args.throughput_images), "--epochs", "3", "--json", str(tp)],
                   out / "throughput.log", left() - 5)
    res["throughput"] = _read(tp)
    ok &= rc == 0
    rows = res["throughput"].get("rows", [])
    step("training throughput (ResNet-56, batch 128)", ("ok: " + ", ".join(f"{r['variant']} {r['images_per_s']:.0f}/s"
                                                        for r in rows[:2])) if rc == 0 else
         ("TIMEOUT (throughput.log)" if rc is None else f"FAILED (exit {rc}, throughput.log)"), sec)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
