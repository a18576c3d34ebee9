"""Engine builds in every precision on the machine at hand: the GPU check's engine step.

    python -m benchmarks.gpu_engines --json OUT.json [--run RUN_DIR] [--models resnet18 mobilenet_v2]

Three parts, each recorded even when another fails:

1. **torchvision models at 224 px** (random weights, seed 0; latency does not depend on the values),
   on CUDA: the PyTorch-native engine (``pipeline.runtimes.torch_engine``: torch.export program
   replayed as a CUDA graph; AOTInductor is left to the pipeline's engine stage, it takes a minute
   per model) in fp32, fp16 and bf16 at ``--batch``, and TensorRT fp16 and int8 (Q/DQ from
   ``pipeline.quantize``, symmetric int8 activations) where ``tensorrt`` imports. Latency with the
   project's protocol (fastest window median, p50 and p99 of all calls); each reduced precision's
   logits against fp32 on the same inputs (max abs difference, relative to the largest logit).
2. **The pipeline's own slimmed network** (``--run``: a ``python -m stages`` work directory that
   reached export): the torch engine in fp32, fp16 and bf16 on its test split (accuracy, top-1
   agreement with fp32), and on the host CPU, ONNX Runtime fp32 against INT8 (uint8 and int8
   activations, ``pipeline.quantize`` calibrated on 256 training images) at batch 1, one thread:
   accuracy, agreement and latency ratio, measured interleaved.
3. **The host CPU**: name, cores and the flags that decide INT8 speed (AVX-512 VNNI, AVX-VNNI, AMX).

Without CUDA (a dry run) part 1 and the GPU half of part 2 run fp32 on the CPU only, and say so.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.deploy import engine_latency, parity
from pipeline.latency.backends import device_record, wall_timed
from pipeline.latency.timing import TimingProtocol, measure_calls

GPU_PROTOCOL = TimingProtocol(passes=10, window_s=0.01, min_span_s=0.5)
CPU_PROTOCOL = TimingProtocol(passes=10, window_s=0.05, min_span_s=2.0)
def cpu_flags() -> dict[str, Any]:
    """The host CPU's name and the instruction-set flags INT8 speed depends on (Linux)."""
    from benchmarks.int8 import cpu_flags as flags

    return {**device_record("cpu"), **flags()}


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"


def torch_engine_rows(model: torch.nn.Module, shape: tuple[int, ...], batch: int, device: str, x: torch.Tensor,
                      precisions: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per precision: the torch engine built from a copy of ``model``, its latency at
    ``batch`` and its logits on ``x`` against the fp32 engine's."""
    import copy

    from pipeline.runtimes import TorchEngineRunner, build_torch_engine

    rows, ref = [], None
    for precision in precisions:
        row: dict[str, Any] = {"engine": "torch", "precision": precision}
        try:
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                info = build_torch_engine(copy.deepcopy(model), shape, batch, device, precision, tmp, aoti=False)
                runner = TorchEngineRunner(Path(tmp) / info["engine_file"], info["kind"], device, precision, batch,
                                           shape, cuda_graph=True)
                row.update(build_s=time.perf_counter() - t0, kind=info["kind"], cuda_graph=runner.graph_status)
                logits = runner.logits(x)
                xb = x[:batch].to(device, runner.dtype)
                row["latency"] = engine_latency(wall_timed(lambda r=runner, b=xb: r(b)),
                                                GPU_PROTOCOL if device == "cuda" else CPU_PROTOCOL)
            if precision == "fp32":
                ref = logits
            if ref is None:
                raise RuntimeError("no fp32 engine to compare with (its build failed)")
            # a random-weight network can carry activations below fp16's range (mobilenet_v2's logits are
            # ~3e-9): its fp16 logits then underflow to zero, which says nothing about the engine
            row["logit_max"] = logits.abs().max().item()
            p = parity(ref, logits)
            row.update(max_abs_diff_vs_fp32=p["max_abs_diff"], top1_agreement_vs_fp32=p["top1_agreement"],
                       relative_diff_vs_fp32=p["max_abs_diff"] / max(1e-12, ref.abs().max().item()), logits=logits)
        except Exception as err:  # noqa: BLE001 - a failure is this row's result
            row["error"] = _error(err)
            traceback.print_exc()
        rows.append(row)
    return rows


def tensorrt_rows(onnx_path: Path, shape: tuple[int, ...], batch: int, x: torch.Tensor, calib: torch.Tensor,
                  ref: torch.Tensor | None) -> list[dict[str, Any]]:
    """TensorRT fp16 (from the fp32 ONNX) and int8 (from its Q/DQ model) where TensorRT imports."""
    from pipeline.runtimes import TensorRTRunner, build_tensorrt_plan, tensorrt_available

    if not tensorrt_available():
        return [{"engine": "tensorrt", "precision": p, "error": "not run: the tensorrt package is not installed here"}
                for p in ("fp16", "int8")]
    from pipeline.quantize import quantize_int8

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp16", "int8"):
            row: dict[str, Any] = {"engine": "tensorrt", "precision": precision}
            try:
                src = onnx_path
                if precision == "int8":  # strongly typed: int8 only from explicit Q/DQ nodes (TensorRT needs int8 activations)
                    src = Path(tmp) / "model.qdq.onnx"
                    row["quantization"] = quantize_int8(onnx_path, src, calib, "int8")
                t0 = time.perf_counter()
                plan = build_tensorrt_plan(src, shape, (batch, batch, batch), precision)
                runner = TensorRTRunner(plan)
                row["build_s"] = time.perf_counter() - t0
                logits = runner.logits(x, batch)
                xg = x[:batch].cuda()
                row["latency"] = engine_latency(wall_timed(lambda r=runner, b=xg: r(b)), GPU_PROTOCOL)
                if ref is not None:
                    p = parity(ref, logits)
                    row.update(max_abs_diff_vs_fp32=p["max_abs_diff"], top1_agreement_vs_fp32=p["top1_agreement"],
                               relative_diff_vs_fp32=p["max_abs_diff"] / max(1e-12, ref.abs().max().item()))
            except Exception as err:  # noqa: BLE001
                row["error"] = _error(err)
                traceback.print_exc()
            rows.append(row)
    return rows


def torchvision_part(names: list[str], size: int, batch: int, device: str) -> list[dict[str, Any]]:
    from models.tvcompat import import_torchvision
    from pipeline.runtimes import export_onnx

    torchvision = import_torchvision()

    out = []
    precisions = ("fp32", "fp16", "bf16") if device == "cuda" else ("fp32",)
    for name in names:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None, num_classes=1000).eval()
        shape = (3, size, size)
        x = torch.randn(2 * batch, *shape, generator=torch.Generator().manual_seed(1))
        rows = torch_engine_rows(model, shape, batch, device, x, precisions)
        ref = rows[0].get("logits")
        if device == "cuda":
            with tempfile.TemporaryDirectory() as tmp:
                onnx_path = Path(tmp) / "model.onnx"
                try:
                    export_onnx(model.float().cpu(), shape, onnx_path)
                    rows += tensorrt_rows(onnx_path, shape, batch, x, x[:64], ref)
                except Exception as err:  # noqa: BLE001
                    rows.append({"engine": "tensorrt", "precision": "-", "error": _error(err)})
        for r in rows:
            r.pop("logits", None)
            r.update(model=name, image_size=size, batch=batch, device=device)
        out += rows
        print(f"[gpu_engines] {name}: " + "; ".join(f"{r['engine']} {r['precision']} "
              + (f"{r['latency']['ms']:.4f} ms" if "latency" in r else r.get("error", "?")) for r in rows), flush=True)
    return out


def run_part(run: Path, device: str, calibration: int = 256) -> dict[str, Any]:
    """The pipeline run's slimmed network: torch engine precisions on its test split, and ONNX
    Runtime fp32 against INT8 on the host CPU."""
    import onnxruntime

    from pipeline.data import Normalized, load_prepared
    from pipeline.quantize import calibration_rows, quantize_int8
    from pipeline.runtimes import ort_logits, ort_session
    from pipeline.slim import load_slimmed_model

    data = load_prepared(run / "artifacts" / "prepare")
    mean, std = data.norm()
    x = Normalized(data.test, mean, std)[:]
    y = data.test.y
    shape = (data.channels, *data.meta["image_size"])
    model, _ = load_slimmed_model(run / "artifacts" / "slim" / "model.pt")
    res: dict[str, Any] = {"test_images": len(y), "image_size": list(data.meta["image_size"])}
    precisions = ("fp32", "fp16", "bf16") if device == "cuda" else ("fp32",)
    rows = torch_engine_rows(model.eval(), shape, 32, device, x, precisions)
    for r in rows:
        logits = r.pop("logits", None)
        if logits is not None:
            r["test_acc"] = (logits.argmax(1) == y).double().mean().item()
        r["device"] = device
    res["torch_engine"] = rows
    print("[gpu_engines] slimmed network, torch engine: " + "; ".join(
        f"{r['precision']} acc {r.get('test_acc', float('nan')):.4f} " + (f"{r['latency']['ms']:.4f} ms"
                                                                         if "latency" in r else r.get("error", "?"))
        for r in rows), flush=True)
    # INT8 on the host CPU: ONNX Runtime's CPU provider (no GPU INT8 without TensorRT)
    onnx_path = run / "artifacts" / "export" / "model.onnx"
    cpu: dict[str, Any] = {"onnxruntime": onnxruntime.__version__, "batch": 1, "threads": 1}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            calib = Normalized(data.train, mean, std)[calibration_rows(len(data.train), calibration, seed=0)]
            sessions = {"fp32": ort_session(onnx_path, "cpu", 1)}
            for kind in ("uint8", "int8"):
                path = Path(tmp) / f"model.{kind}.onnx"
                cpu[f"quantization_{kind}"] = quantize_int8(onnx_path, path, calib, kind)
                sessions[f"int8 ({kind} activations)"] = ort_session(path, "cpu", 1)
            logits = {k: ort_logits(s, x) for k, s in sessions.items()}
            x1 = x[:1].numpy().astype(np.float32)
            calls = [wall_timed(lambda s=s: s.run(None, {s.get_inputs()[0].name: x1})) for s in sessions.values()]
            torch.set_num_threads(1)
            timings = measure_calls(calls, CPU_PROTOCOL)
            base = timings[0].ms
            cpu["rows"] = [{"precision": k, "ms": t.ms, "p50_ms": t.p50_ms, "p99_ms": t.p99_ms,
                            "speedup_vs_fp32": base / t.ms, "test_acc": (logits[k].argmax(1) == y).double().mean().item(),
                            "top1_agreement_vs_fp32": parity(logits["fp32"], logits[k])["top1_agreement"]}
                           for k, t in zip(sessions, timings)]
        print("[gpu_engines] slimmed network, ONNX Runtime on the host CPU: " + "; ".join(
            f"{r['precision']} {r['ms']:.4f} ms ({r['speedup_vs_fp32']:.2f}x) acc {r['test_acc']:.4f}"
            for r in cpu["rows"]), flush=True)
    except Exception as err:  # noqa: BLE001
        cpu["error"] = _error(err)
        traceback.print_exc()
    res["onnxruntime_cpu"] = cpu
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True, help="result file")
    p.add_argument("--run", type=Path, default=None, help="a python -m stages work directory that reached export")
    p.add_argument("--models", nargs="*", default=["resnet18", "mobilenet_v2"], help="torchvision models (224 px)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res: dict[str, Any] = {"device": device_record(device), "host_cpu": cpu_flags(), "torch": torch.__version__,
                           "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
                           "command": "python -m benchmarks.gpu_engines " + " ".join(argv or [])}
    if device != "cuda":
        res["note"] = "no CUDA device: a dry run, fp32 on the CPU only"
    args.json.parent.mkdir(parents=True, exist_ok=True)
    res["torchvision"] = torchvision_part(args.models, args.image_size, args.batch, device)
    args.json.write_text(json.dumps(res, indent=2, default=str))
    if args.run is not None:
        try:
            res["run"] = run_part(args.run, device)
        except Exception as err:  # noqa: BLE001
            res["run"] = {"error": _error(err)}
            traceback.print_exc()
        args.json.write_text(json.dumps(res, indent=2, default=str))
    failed = [r for r in res["torchvision"] if "error" in r and r["engine"] == "torch"]
    return 1 if failed or "error" in res.get("run", {}) else 0


if __name__ == "__main__":
    raise SystemExit(main())
