"""handoff: the bundle for the deploy team: engine, ONNX, manifest (input, preprocessing, classes,
accuracy, latency, budget, device, versions, git revision, sha256 of every file), a README, and
plots (accuracy against measured latency for teachers, student and pruned model; kept widths)."""

from __future__ import annotations

import math
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from pipeline.checkpoint import load_model
from pipeline.config import HandoffConfig, TargetConfig, parse_section, parse_teachers
from pipeline.data import load_prepared
from pipeline.deploy import INPUT, OUTPUT, check_manifest, model_card, sha256, verify_bundle
from pipeline.errors import CheckpointError
from pipeline.io import atomic_dir, read_json, write_json
from pipeline.latency import LatencyTable, target_backend
from pipeline.plots import pareto_png
from pipeline.slim import load_slimmed_model
from pipeline.train import test_accuracy
from stages._common import load_params, log, parser, run


def _git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return rev + ("+uncommitted-changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _versions() -> dict[str, str]:
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


README = """# {name}

Image classifier built by slimdeploy (git {git}). Everything here is listed with its sha256 in
`manifest.json`; check them before use (`python -m pipeline.predict` does).

| file | what |
|---|---|
{files_table}

## Input

- tensor `{input_name}`, float32, layout NCHW, shape (batch, {c}, {h}, {w}); batch is dynamic in the ONNX model{trt_batch}
- preprocessing: decode, convert to {order}, resize to {h}x{w} (bilinear), scale to [0, 1] (x / 255),
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

{engine_note}
"""


_ENGINE_FILES = {
    ("tensorrt", None): "TensorRT engine (this GPU and TensorRT version only)",
    ("onnxruntime", None): "ONNX Runtime graph optimised for the measured device (use model.onnx elsewhere)",
    ("torch", "aoti"): "PyTorch-native engine: AOTInductor package at the measured batch, load with "
                       "torch._inductor.aoti_load_package (this torch version and device type)",
    ("torch", "exported"): "PyTorch-native engine: torch.export program at the measured batch, run with "
                           "torch.export.load(path).module() (this torch version)",
}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", required=True)
    p.add_argument("--teachers", required=True, help="directory of teacher checkpoints")
    p.add_argument("--student", required=True, help="student checkpoint")
    p.add_argument("--slim", required=True, help="slimmed checkpoint")
    p.add_argument("--onnx", required=True, help="ONNX model (export stage)")
    p.add_argument("--engine-dir", required=True, help="engine directory (engine stage)")
    p.add_argument("--widths-png", required=True, help="kept-widths plot of the prune stage")
    p.add_argument("--compare", default=None, help="metrics of the compare stage (optional, for the plot)")
    p.add_argument("--latency-table", required=True, help="latency table of the profile stage (its error goes "
                   "into the manifest)")
    p.add_argument("--out-dir", required=True, help="bundle directory")
    args = p.parse_args(argv)

    def body() -> None:
        params = load_params(args.params)
        cfg = parse_section(params, "handoff", HandoffConfig)
        target = parse_section(params, "target", TargetConfig)
        names = list(parse_teachers(params))
        data = load_prepared(args.data)
        engine_dir = Path(args.engine_dir)
        try:
            eng = read_json(engine_dir / "engine.json")
        except (FileNotFoundError, ValueError) as err:
            raise CheckpointError(f"{engine_dir / 'engine.json'} missing or unreadable ({err}); run the engine stage") from None
        slimmed, slim_ckpt = load_slimmed_model(args.slim)
        shape = (data.channels, *data.meta["image_size"])
        cpu = torch.device("cpu")

        # accuracy against latency measured on the target, every model the same way
        backend = target_backend(target)
        entries = [("teachers", n, load_model(Path(args.teachers) / f"{n}.pt")[0]) for n in names]
        entries += [("student", "student", load_model(args.student)[0]), ("pruned (ours)", "pruned", slimmed)]
        timings = backend.measure_many([m for _, _, m in entries], shape)  # interleaved: the same conditions
        n_test = len(data.test.y)

        def point(method: str, name: str, ms: float, spread: float, acc: float) -> dict:
            # error bars: the binomial standard error of an accuracy on n_test images, and from the
            # fastest timing window (the estimate) up to the median window
            return {"method": method, "name": name, "latency_ms": ms, "latency_err": [0.0, ms * max(0.0, spread)],
                    "accuracy": acc, "accuracy_err": math.sqrt(acc * (1 - acc) / n_test)}

        points = [point(method, n, t.ms, t.spread, test_accuracy(m, data, cpu))
                  for (method, n, m), t in zip(entries, timings)]
        if args.compare and Path(args.compare).is_file():
            cmp_ = read_json(args.compare)
            ratio = cmp_["ours"]["measured_ms"] / timings[-1].ms if "measured_ms" in cmp_.get("ours", {}) else 1.0
            for key, label in (("uniform", "uniform scaling"), ("l1", "Torch-Pruning L1"),
                               ("unpruned", "student trained as long")):
                # the baselines' latency relative to ours as the compare stage measured them (in one
                # interleaved run), on the scale of this stage's measurement of ours
                if key in cmp_:
                    points.append(point(label, key, cmp_[key]["measured_ms"] / ratio,
                                        float(cmp_[key].get("measured_spread", 0.0)), cmp_[key]["test_acc"]))
        table = LatencyTable.load(args.latency_table)
        held = table.calibration["heldout_metrics"]
        stair = table.meta.get("staircase", {})
        latency_model = {
            "channel_step": table.step, "step_source": stair.get("source"), "detected_step": stair.get("detected"),
            "repeat_steps": stair.get("repeat_steps"), "scale": table.calibration["scale"],
            "offset_ms": table.calibration["offset_ms"], "heldout": held,
            "fit_samples": len(table.calibration.get("fit_set", [])),
            "warnings": table.calibration.get("warnings", []),
        }
        git = _git_revision()
        device_name = eng["device"].get("name", "?")
        with atomic_dir(args.out_dir) as tmp:
            shutil.copyfile(args.onnx, tmp / "model.onnx")
            shutil.copyfile(engine_dir / eng["engine_file"], tmp / eng["engine_file"])
            shutil.copyfile(args.widths_png, tmp / "widths.png")
            pareto_png(points, tmp / "pareto.png",
                       f"test accuracy vs latency on {target.backend}/{device_name}, batch {target.batch_size}",
                       f"error bars: accuracy +-1 standard error on {n_test} test images; latency from the fastest "
                       "timing window (the estimate) to the median one. One run: seeds spread more (docs/BENCHMARKS.md)",
                       scatter=("teachers",))
            lat = eng["latency"]
            files = {f: sha256(tmp / f) for f in sorted({"model.onnx", eng["engine_file"], "widths.png", "pareto.png"})}
            h, w = data.meta["image_size"]
            card = model_card(data.meta)  # what export stored inside model.onnx; the manifest repeats it
            pre = card["preprocessing"]
            verdict = (f"{'met' if eng['within_budget'] else 'NOT met'} (the engine measures "
                       f"{lat['ms'] / eng['budget_ms']:.3f} of it: {eng['verdict']})")
            readme = README.format(
                name=cfg.name, git=git, input_name=INPUT, output_name=OUTPUT, c=data.channels, h=h, w=w,
                trt_batch={"tensorrt": " (the TensorRT engine: 1 to its profile's maximum)",
                           "torch": f" (the torch engine: exactly {eng['batch_size']})"}.get(eng["backend"], ""),
                order=pre["channel_order"], mean=pre["mean"], std=pre["std"], k=data.num_classes,
                classes=", ".join(data.meta["classes"]), acc=eng["test_acc"], acc_onnx=eng["test_acc_onnx"],
                n_test=len(data.test.y), backend=eng["backend"], precision=eng["precision"], batch=eng["batch_size"],
                device=device_name, ms=lat["ms"], windows=lat["windows"], span=lat["span_s"], p50=lat["p50_ms"], p90=lat["p90_ms"], p99=lat["p99_ms"], runs=lat["runs"],
                budget=eng["budget_ms"], verdict=verdict, step=table.step, step_source=stair.get("source", "?"),
                held_n=held["samples"], held_mape=held["mape"], held_within=held["within_10pct"],
                held_rho=held["spearman"],
                model_warnings="".join(f"\n  - WARNING: {w}" for w in latency_model["warnings"]),
                files_table="\n".join(f"| `{f}` | {d} |" for f, d in (
                    ("model.onnx", "ONNX (opset 17+), dynamic batch; runs anywhere ONNX Runtime runs"),
                    (eng["engine_file"], _ENGINE_FILES.get((eng["backend"], eng.get("torch_engine", {}).get("kind")),
                                                           "the engine")),
                    ("manifest.json", "everything below, machine-readable, with sha256 of every file"),
                    ("pareto.png", "test accuracy against measured latency: teachers, student, pruned, baselines"),
                    ("widths.png", "channels kept per group by pruning"))),
                engine_note=("The engine file was measured on the device named above; the ONNX model is the portable "
                             "artifact. A TensorRT engine must be rebuilt for another GPU or TensorRT version."),
            )
            (tmp / "README.md").write_text(readme)
            files["README.md"] = sha256(tmp / "README.md")
            manifest = {
                "format": "slimdeploy-handoff/1", "name": cfg.name,
                "model": {"onnx": "model.onnx", "arch": slim_ckpt["arch"], "arch_config": slim_ckpt["arch_config"],
                          "channel_manifest": slim_ckpt.get("channel_manifest"),
                          "params": sum(q.numel() for q in slimmed.parameters())},
                "engine": {"file": eng["engine_file"], "backend": eng["backend"], "reason": eng["backend_reason"],
                           "precision": eng["precision"]},
                "input": card["input"], "output": card["output"], "preprocessing": pre, "classes": card["classes"],
                "accuracy": {"test_acc_engine": eng["test_acc"], "test_acc_onnx": eng["test_acc_onnx"],
                             "top1_agreement_engine_onnx": eng["top1_agreement_with_onnx"],
                             "test_images": len(data.test.y), "models": points},
                "latency": {**lat, "batch_size": eng["batch_size"], "threads": eng["threads"]},
                "budget": {"budget_ms": eng["budget_ms"], "predicted_ms": eng["predicted_ms"],
                           "prune_measured_ms": eng["prune_measured_ms"], "engine_ms": lat["ms"],
                           "engine_p50_ms": lat["p50_ms"], "noise": eng["noise"], "verdict": eng["verdict"],
                           "within_budget": eng["within_budget"]},
                "latency_model": latency_model,
                "device": eng["device"], "versions": {**_versions(), **eng["versions"]}, "git_revision": git,
                "data": {"source": data.meta.get("source"), "split_hashes": data.meta.get("split_hashes")},
                "files": files,
            }
            check_manifest(manifest)
            write_json(tmp / "manifest.json", manifest)
            verify_bundle(tmp)
        log.info("handoff bundle %s: %s + %s, test acc %.4f, %.4f ms (budget %.4f ms)", args.out_dir,
                 "model.onnx", eng["engine_file"], eng["test_acc"], lat["ms"], eng["budget_ms"])

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
