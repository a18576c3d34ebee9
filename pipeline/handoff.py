"""The handoff bundle's contents: the accuracy/latency points of its plot, its README and its
manifest, from what the earlier stages measured. The stage (``stages/handoff.py``) reads the
inputs and writes the files; nothing here touches the file system except ``git_revision``."""

from __future__ import annotations

import math
import platform
import subprocess
from typing import Any

import torch

from pipeline.latency import LatencyTable
from pipeline.runtimes import INPUT, OUTPUT

README = """# {name}

Image classifier built by slimdeploy (git {git}). Everything here is listed with its sha256 in
`manifest.json`; check them before use (`python -m pipeline.predict` does).

| file | what |
|---|---|
{files_table}

## Input

- tensor `{input_name}`, float32, layout NCHW, shape (batch, {c}, {h}, {w}); batch is dynamic in the ONNX model{trt_batch}
- preprocessing: decode, convert to {order}, {resize}, scale to [0, 1] (x / 255),
  subtract mean {mean} and divide by std {std} per channel
- output `{output_name}`: (batch, {k}) unnormalised class scores; softmax gives probabilities
- classes (index order): {classes}

## Measured

- test accuracy: {acc:.2%} with the engine, {acc_onnx:.2%} with the ONNX model ({n_test} test images)
- latency of the engine ({backend}, {precision}) at batch {batch} on {device}: {ms:.4f} ms (the
  fastest of {windows} timing windows' median call, spread over {span:g} s); over all {runs} calls,
  disturbances of the shared machine included: p50 {p50:.4f} ms, p90 {p90:.4f} ms, p99 {p99:.4f} ms
- latency budget {budget:.4f} ms: {verdict}
- latency model used to prune: channel step {step} ({step_source}); predictor error on {held_n} held-out
  sub-networks: MAPE {held_mape:.1%}, {held_within:.0%} within +-10%, Spearman {held_rho:.3f}{model_warnings}

## Use

```bash
python -m pipeline.predict --bundle <this directory> image1.png image2.jpg
```

The engine file was measured on the device named above; the ONNX model is the portable artifact. A
TensorRT engine must be rebuilt for another GPU or TensorRT version.
"""

INT8_FILE = ("INT8 model, explicitly quantized (Q/DQ nodes, int8 per-channel weights): runs on ONNX Runtime anywhere "
             "and builds in TensorRT; what `pipeline.predict` runs (model.onnx is the fp32 network)")
ENGINE_FILES = {
    ("tensorrt", None): "TensorRT engine (this GPU and TensorRT version only)",
    ("onnxruntime", None): "ONNX Runtime graph optimised for the measured device (use model.onnx elsewhere)",
    ("torch", "aoti"): "PyTorch-native engine: AOTInductor package at the measured batch, load with "
                       "torch._inductor.aoti_load_package (this torch version and device type)",
    ("torch", "exported"): "PyTorch-native engine: torch.export program at the measured batch, run with "
                           "torch.export.load(path).module() (this torch version)",
}

# compare.json keys of the baselines, and their labels in the plot and the manifest
BASELINES = (("uniform", "uniform scaling"), ("l1", "Torch-Pruning L1"), ("unpruned", "student trained as long"))


def git_revision() -> str:
    """The working tree's commit, with ``+uncommitted-changes`` when tracked files differ; "unknown"
    outside git."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return rev + ("+uncommitted-changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict[str, str]:
    """Python and the deployment libraries, as installed here."""
    import onnx
    import onnxruntime

    out = {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
           "onnxruntime": onnxruntime.__version__}
    try:
        import tensorrt

        out["tensorrt"] = tensorrt.__version__
    except ImportError:
        pass
    return out


def point(method: str, name: str, ms: float, spread: float, acc: float, n_test: int) -> dict[str, Any]:
    """One model of the accuracy/latency plot. Error bars: the binomial standard error of an
    accuracy on ``n_test`` images, and from the fastest timing window (the estimate, ms) up to the
    median window (``spread`` is their relative gap)."""
    return {"method": method, "name": name, "latency_ms": ms, "latency_err": [0.0, ms * max(0.0, spread)],
            "accuracy": acc, "accuracy_err": math.sqrt(acc * (1 - acc) / n_test)}


def baseline_points(compare: dict[str, Any], ours_ms: float, n_test: int) -> list[dict[str, Any]]:
    """The compare stage's baselines as plot points. Their latency is taken relative to ours as
    compare measured them (one interleaved run), on the scale of ``ours_ms`` (this stage's
    measurement of ours)."""
    ours = compare.get("ours", {})
    ratio = ours["measured_ms"] / ours_ms if "measured_ms" in ours else 1.0
    return [point(label, key, compare[key]["measured_ms"] / ratio, float(compare[key].get("measured_spread", 0.0)),
                  compare[key]["test_acc"], n_test)
            for key, label in BASELINES if key in compare]


def latency_model_record(table: LatencyTable) -> dict[str, Any]:
    """What the manifest says of the latency model pruning used: the step and the predictor's error."""
    stair = table.meta.get("staircase", {})
    return {
        "channel_step": table.step, "step_source": stair.get("source"), "detected_step": stair.get("detected"),
        "repeat_steps": stair.get("repeat_steps"), "scale": table.calibration["scale"],
        "offset_ms": table.calibration["offset_ms"], "heldout": table.calibration["heldout_metrics"],
        "fit_samples": len(table.calibration.get("fit_set", [])),
        "warnings": table.calibration.get("warnings", []),
    }


def bundle_readme(name: str, git: str, eng: dict[str, Any], card: dict[str, Any], meta: dict[str, Any],
                  n_test: int, latency_model: dict[str, Any]) -> str:
    """The bundle's README.md for the deploy team. ``eng``: the engine stage's engine.json;
    ``card``: the model card stored in model.onnx; ``meta``: the prepared data's meta."""
    lat, pre, held = eng["latency"], card["preprocessing"], latency_model["heldout"]
    h, w = meta["image_size"]
    paired = eng.get("paired_ms")
    verdict = (f"{'met' if eng['within_budget'] else 'NOT met'} (" +
               (f"the network measured with the model it was pruned from reads {paired / eng['budget_ms']:.3f} of it, "
                "the verdict's reading; " if paired is not None else "") +
               f"the engine alone measures {lat['ms'] / eng['budget_ms']:.3f} of it: {eng['verdict']})")
    files = (("model.onnx", "ONNX (opset 17+), dynamic batch; runs anywhere ONNX Runtime runs"),
             (eng["engine_file"], INT8_FILE if eng["precision"] == "int8" and eng["engine_file"].endswith(".onnx")
              else ENGINE_FILES.get((eng["backend"], eng.get("torch_engine", {}).get("kind")), "the engine")),
             ("manifest.json", "everything below, machine-readable, with sha256 of every file"),
             ("pareto.png", "test accuracy against measured latency: teachers, student, pruned, baselines"),
             ("widths.png", "channels kept per group by pruning"))
    return README.format(
        name=name, git=git, input_name=INPUT, output_name=OUTPUT, c=meta["channels"], h=h, w=w,
        trt_batch={"tensorrt": " (the TensorRT engine: 1 to its profile's maximum)",
                   "torch": f" (the torch engine: exactly {eng['batch_size']})"}.get(eng["backend"], ""),
        order=pre["channel_order"], resize=(
            f"resize the shorter side to {pre['shorter_side']} (bilinear, antialiased), crop the centre {h}x{w}"
            if pre.get("shorter_side") else f"resize to {h}x{w} (bilinear)"), mean=pre["mean"], std=pre["std"], k=meta["num_classes"],
        classes=", ".join(meta["classes"]), acc=eng["test_acc"], acc_onnx=eng["test_acc_onnx"], n_test=n_test,
        backend=eng["backend"], precision=eng["precision"], batch=eng["batch_size"],
        device=eng["device"].get("name", "?"), ms=lat["ms"], windows=lat["windows"], span=lat["span_s"],
        p50=lat["p50_ms"], p90=lat["p90_ms"], p99=lat["p99_ms"], runs=lat["runs"], budget=eng["budget_ms"],
        verdict=verdict, step=latency_model["channel_step"], step_source=latency_model["step_source"] or "?",
        held_n=held["samples"], held_mape=held["mape"], held_within=held["within_10pct"], held_rho=held["spearman"],
        model_warnings="".join(f"\n  - WARNING: {x}" for x in latency_model["warnings"]),
        files_table="\n".join(f"| `{f}` | {d} |" for f, d in files),
    )


def bundle_manifest(name: str, git: str, eng: dict[str, Any], card: dict[str, Any], slim_ckpt: dict[str, Any],
                    params: int, meta: dict[str, Any], n_test: int, points: list[dict[str, Any]],
                    latency_model: dict[str, Any], files: dict[str, str]) -> dict[str, Any]:
    """manifest.json: everything the README says, machine-readable, with the sha256 of every file."""
    lat = eng["latency"]
    return {
        "format": "slimdeploy-handoff/1", "name": name,
        "model": {"onnx": "model.onnx", "arch": slim_ckpt["arch"], "arch_config": slim_ckpt["arch_config"],
                  "channel_manifest": slim_ckpt.get("channel_manifest"), "params": params},
        "engine": {"file": eng["engine_file"], "backend": eng["backend"], "reason": eng["backend_reason"],
                   "precision": eng["precision"],
                   **({"quantization": eng["quantization"], "accuracy_drop": eng["accuracy_drop"]}
                      if eng.get("quantization") else {})},
        "input": card["input"], "output": card["output"], "preprocessing": card["preprocessing"],
        "classes": card["classes"],
        "accuracy": {"test_acc_engine": eng["test_acc"], "test_acc_onnx": eng["test_acc_onnx"],
                     "top1_agreement_engine_onnx": eng["top1_agreement_with_onnx"], "test_images": n_test,
                     "models": points},
        "latency": {**lat, "batch_size": eng["batch_size"], "threads": eng["threads"]},
        "budget": {"budget_ms": eng["budget_ms"], "predicted_ms": eng["predicted_ms"],
                   "prune_measured_ms": eng["prune_measured_ms"], "engine_ms": lat["ms"],
                   "engine_p50_ms": lat["p50_ms"], "noise": eng["noise"], "verdict": eng["verdict"],
                   "within_budget": eng["within_budget"]},
        "latency_model": latency_model,
        "device": eng["device"], "versions": {**versions(), **eng["versions"]}, "git_revision": git,
        "data": {"source": meta.get("source"), "split_hashes": meta.get("split_hashes")},
        "files": files,
    }
