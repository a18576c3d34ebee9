"""engine: build the deployable engine (TensorRT from the ONNX model; where TensorRT is absent,
ONNX Runtime, or on a GPU without ONNX Runtime's CUDA provider the PyTorch-native engine from the
slimmed model: torch.export + AOTInductor + CUDA graphs), check its accuracy and top-1 agreement with ONNX on the test split, measure
its latency at the deployment batch, and verify that it meets the latency budget."""

from __future__ import annotations

import sys

import numpy as np
import torch

from pipeline.config import EngineConfig, TargetConfig, parse_section
from pipeline.data import load_prepared, normalize
from pipeline.deploy import (DeployError, TensorRTRunner, budget_verdict, build_tensorrt_engine, engine_latency,
                             ort_logits, ort_session, parity, select_backend)
from pipeline.io import atomic_dir, write_json
from pipeline.latency import device_record, timing_protocol
from pipeline.latency.backends import wall_timed
from stages._common import load_params, log, parser, read_pruned, run


class BudgetExceeded(DeployError):
    """The engine's measured latency is over the budget."""


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", required=True)
    p.add_argument("--onnx", required=True, help="ONNX model (export stage)")
    p.add_argument("--pruned", required=True, help="masks.json of the prune stage (budget, predicted latency)")
    p.add_argument("--model", help="slimmed checkpoint (slim stage): what the torch engine is built from")
    p.add_argument("--out-dir", required=True, help="engine directory")
    p.add_argument("--metrics", required=True)
    args = p.parse_args(argv)

    def body() -> None:
        params = load_params(args.params)
        cfg = parse_section(params, "engine", EngineConfig)
        target = parse_section(params, "target", TargetConfig)
        data = load_prepared(args.data)
        pruned = read_pruned(args.pruned, "budget_ms", "predicted_ms", "measured_ms")
        budget_ms, predicted_ms, pruned_ms = pruned["budget_ms"], pruned["predicted_ms"], pruned["measured_ms"]
        noise = float(pruned.get("noise", 0.0))  # repeatability of a measurement, measured by the prune stage
        protocol = timing_protocol(target, passes=cfg.timing_passes, min_span_s=cfg.timing_span_s)
        backend, reason = select_backend(cfg.backend, target.device)
        shape = (data.channels, *data.meta["image_size"])
        mean, std = data.norm()
        x = normalize(data.test.x, mean, std)
        reference = ort_logits(ort_session(args.onnx, "cpu", optimize=False), x)
        bs = target.batch_size
        xb = x[torch.arange(bs) % len(x)].contiguous()  # one deployment batch of real test images
        with atomic_dir(args.out_dir) as tmp:
            if backend == "onnxruntime":
                engine_file, precision = "model.opt.onnx", "fp32"
                sess = ort_session(args.onnx, target.device, target.threads, optimized_path=tmp / engine_file)
                logits = ort_logits(sess, x)
                feed = {sess.get_inputs()[0].name: xb.numpy().astype(np.float32)}
                latency = engine_latency(wall_timed(lambda: sess.run(None, feed)), protocol)
                device = device_record(target.device)
                import onnxruntime

                versions = {"onnxruntime": onnxruntime.__version__}
            elif backend == "torch":
                from pipeline.slim import load_slimmed_model
                from pipeline.torch_engine import TorchEngineRunner, build_torch_engine

                if not args.model:
                    raise DeployError("the torch engine is built from the slimmed model: pass --model (dvc.yaml does)")
                if cfg.precision == "int8":
                    raise DeployError("engine.precision int8 is TensorRT only; the torch engine runs fp16 or fp32")
                precision = cfg.precision if target.device == "cuda" else "fp32"
                model, _ = load_slimmed_model(args.model)
                built = build_torch_engine(model, shape, bs, target.device, precision, tmp, aoti=cfg.aoti)
                engine_file = built["engine_file"]
                runner = TorchEngineRunner(tmp / engine_file, built["kind"], target.device, precision, bs, shape,
                                           cuda_graph=cfg.cuda_graph)
                if target.device == "cpu":
                    torch.set_num_threads(target.threads)
                logits = runner.logits(x)
                xd = xb.to(target.device, runner.dtype)
                latency = engine_latency(wall_timed(lambda: runner(xd)), protocol)  # the runner synchronises
                device, versions = device_record(target.device), {}
                built["cuda_graph"] = runner.graph_status
            else:
                import tensorrt

                engine_file, precision = "model.plan", cfg.precision
                calib = None
                if precision == "int8":
                    calib = normalize(data.train.x[: cfg.calibration_images], mean, std).numpy()
                build_tensorrt_engine(args.onnx, tmp / engine_file, shape, (1, bs, max(bs, cfg.max_batch)), precision,
                                      tmp / "timing.cache", calib, tmp / "calibration.cache")
                runner = TensorRTRunner(tmp / engine_file)
                logits = runner.logits(x, bs)
                xg = xb.cuda()
                latency = engine_latency(wall_timed(lambda: runner(xg)), protocol)  # the runner synchronises
                device, versions = device_record("cuda"), {"tensorrt": tensorrt.__version__}
            check = parity(reference, logits)
            within, how = budget_verdict(latency["ms"], budget_ms, noise)
            acc = (logits.argmax(1) == data.test.y).double().mean().item()
            metrics = {
                "backend": backend, "backend_reason": reason, "precision": precision, "engine_file": engine_file,
                "test_acc": acc, "test_acc_onnx": (reference.argmax(1) == data.test.y).double().mean().item(),
                "top1_agreement_with_onnx": check["top1_agreement"], "max_abs_diff_vs_onnx": check["max_abs_diff"],
                "min_agreement": cfg.min_agreement, "batch_size": bs, "latency": latency,
                "budget_ms": budget_ms, "predicted_ms": predicted_ms, "prune_measured_ms": pruned_ms,
                "measured_over_budget": latency["ms"] / budget_ms, "p50_over_budget": latency["p50_ms"] / budget_ms,
                "noise": noise, "within_budget": within, "verdict": how,
                "device": device, "versions": {**versions, "torch": torch.__version__}, "threads": target.threads,
            }
            if backend == "torch":
                metrics["torch_engine"] = built
            write_json(tmp / "engine.json", metrics)
            if check["top1_agreement"] < cfg.min_agreement:
                write_json(args.metrics, metrics)
                raise DeployError(f"{backend} engine agrees with ONNX on {check['top1_agreement']:.2%} of test images, "
                                  f"below engine.min_agreement {cfg.min_agreement:.2%}")
            if not metrics["within_budget"]:
                msg = (f"{backend} engine measures {latency['ms']:.4f} ms (fastest of {latency['windows']} windows; "
                       f"median window {latency['interval_ms'][1]:.4f}, p50 of all calls {latency['p50_ms']:.4f}, p99 "
                       f"{latency['p99_ms']:.4f}) at batch {bs}: over the budget {budget_ms:.4f} ms ({how}); the table "
                       f"predicted {predicted_ms:.4f} ms and the prune stage measured {pruned_ms:.4f} ms")
                if cfg.on_over_budget == "fail":
                    write_json(args.metrics, metrics)
                    raise BudgetExceeded(msg + " (engine.on_over_budget: warn turns this into a warning)")
                log.warning("%s", msg)
        write_json(args.metrics, metrics)
        log.info("%s engine (%s): test acc %.4f, top-1 agreement with ONNX %.4f, %.4f ms (p50 of all calls %.4f) / "
                 "budget %.4f ms (%.3f, %s)", backend, reason, acc, check["top1_agreement"], latency["ms"],
                 latency["p50_ms"], budget_ms, latency["ms"] / budget_ms, how)

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
