"""engine: build the deployable engine (TensorRT from the ONNX model; where TensorRT is absent,
ONNX Runtime, or on a GPU without ONNX Runtime's CUDA provider the PyTorch-native engine from the
slimmed model: torch.export + AOTInductor + CUDA graphs), check its accuracy and top-1 agreement
with ONNX on the test split, measure its latency at the deployment batch, and verify that it meets
the prune stage's latency budget (``Budget.verdict``, the rule every stage judges by: over means
above budget x (1 + measured noise)).

The verdict is read on the scale the budget was set on: the slimmed network and the network it was
pruned from (``--student``; in fp32 when the budget is a fraction of the fp32 student) measured
together by the target's backend in interleaved windows, the ratio times that reference's latency
the prune stage measured (``pipeline.prune.BudgetReading``), as prune and compare judge. A slow
spell of a shared machine then moves both and cancels out, where a reading of the engine alone,
minutes after the budget was measured, would fail the stage (a fresh clone of
6404a5b read its engine alone at 1.205 of the budget while prune and compare had read the same
network at 0.988 and 0.929). The engine's own latency, alone, is reported beside it: what the deploy
team gets."""

from __future__ import annotations

import shutil
import statistics
import sys
from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pipeline.checkpoint import load_student
from pipeline.config import EngineConfig, TargetConfig, parse_section
from pipeline.data import Normalized, PreparedData, load_prepared
from pipeline.deploy import DeployError, engine_latency, parity, select_backend
from pipeline.errors import ConfigError
from pipeline.io import atomic_dir, write_json
from pipeline.latency import TimingProtocol, device_record, target_backend, timing_protocol
from pipeline.latency.backends import cuda_timed, wall_timed
from pipeline.latency.timing import TimedCall, measure_calls
from pipeline.prune.budget import Budget
from pipeline.prune.measure import paired_with
from pipeline.quantize import calibration_images
from pipeline.runtimes import TensorRTRunner, build_tensorrt_plan, ort_logits, ort_session
from stages._common import add_precision_arg, deployed_target, load_params, log, parser, read_pruned, run


class BudgetExceeded(DeployError):
    """The engine's measured latency is over the budget."""


@dataclass
class Built:
    """An engine built into the output directory: its file, precision, logits on the test split,
    latency at the deployment batch (``engine_latency``), device and runtime versions."""

    engine_file: str
    precision: str
    logits: torch.Tensor
    latency: dict[str, Any]
    device: dict[str, Any]
    versions: dict[str, str]
    torch_engine: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None  # int8: the quantization record (pipeline/quantize.py)
    timed: TimedCall | None = None  # int8: one batch of the engine itself, for the paired verdict
    call: TimedCall | None = None  # one deployment batch, timed as the target's backend times (CUDA events on CUDA)
    predict: Callable[[Any], torch.Tensor] | None = None  # float32 CPU logits of normalised rows
    choice: dict[str, Any] | None = None  # precision auto: every candidate measured and the one kept


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", required=True)
    p.add_argument("--onnx", required=True, help="ONNX model (export stage)")
    p.add_argument("--pruned", required=True, help="masks.json of the prune stage (budget, predicted latency)")
    p.add_argument("--model", help="slimmed checkpoint (slim stage): what the torch engine is built from and "
                   "what the verdict measures with --student")
    p.add_argument("--student", help="the network pruned (compress.model): the verdict's reference, measured with "
                   "--model; without both, the verdict reads the engine alone")
    p.add_argument("--out-dir", required=True, help="engine directory")
    p.add_argument("--metrics", required=True)
    add_precision_arg(p)
    args = p.parse_args(argv)

    def body() -> None:
        params = load_params(args.params)
        cfg = parse_section(params, "engine", EngineConfig)
        target = deployed_target(params, args.precision, args.student)
        if parse_section(params, "target", TargetConfig).precision == "auto":  # deploy what the precision stage chose
            cfg = cfg.model_copy(update={"precision": target.precision})
        data = load_prepared(args.data)
        pruned = read_pruned(args.pruned, "budget_ms", "predicted_ms", "measured_ms")
        budget = Budget.from_masks(pruned)  # the prune stage's budget and measured noise
        predicted_ms, pruned_ms = pruned["predicted_ms"], pruned["measured_ms"]
        protocol = timing_protocol(target, passes=cfg.timing_passes, min_span_s=cfg.timing_span_s)
        backend, reason = select_backend(cfg.backend, target.device)
        mean, std = data.norm()
        x = Normalized(data.test, mean, std)  # rows normalised as read: a split of files is never held whole
        reference = ort_logits(ort_session(args.onnx, "cpu", optimize=False), x)
        bs = target.batch_size
        xb = x[torch.arange(bs) % len(x)].contiguous()  # one deployment batch of real test images
        with atomic_dir(args.out_dir) as tmp:
            if cfg.precision == "auto":
                built = _auto(backend, args, cfg, target, data, tmp, x, xb, protocol)
            else:
                built = BUILDERS[backend](args, cfg, target, data, tmp, x, xb, protocol)
            check, latency = parity(reference, built.logits), built.latency
            paired, paired_all = _paired_reading(args, cfg, target, data, budget, protocol, built.timed)
            judged_ms = latency["ms"] if paired is None else paired
            status, how = budget.verdict(judged_ms)
            acc = (built.logits.argmax(1) == data.test.y).double().mean().item()
            metrics = {
                "backend": backend, "backend_reason": reason, "precision": built.precision,
                "engine_file": built.engine_file, "test_acc": acc,
                "test_acc_onnx": (reference.argmax(1) == data.test.y).double().mean().item(),
                "top1_agreement_with_onnx": check["top1_agreement"], "max_abs_diff_vs_onnx": check["max_abs_diff"],
                "min_agreement": cfg.min_agreement, "batch_size": bs, "latency": latency,
                "budget_ms": budget.target_ms, "predicted_ms": predicted_ms, "prune_measured_ms": pruned_ms,
                "measured_over_budget": latency["ms"] / budget.target_ms,
                "paired_ms": paired, "paired_over_budget": None if paired is None else paired / budget.target_ms,
                "paired_readings_over_budget": [v / budget.target_ms for v in paired_all],
                "verdict_on": "alone" if paired is None else "paired with " + paired_with(budget.reference_ms is not None),
                "p50_over_budget": latency["p50_ms"] / budget.target_ms, "noise": budget.noise,
                "within_budget": budget.meets(judged_ms), "budget_status": status, "verdict": how,
                "budget": budget.to_dict(), "device": built.device,
                "versions": {**built.versions, "torch": torch.__version__}, "threads": target.threads,
            }
            if built.torch_engine is not None:
                metrics["torch_engine"] = built.torch_engine
            if built.quantization is not None:
                metrics.update(quantization=built.quantization, max_accuracy_drop=cfg.max_accuracy_drop,
                               accuracy_drop=metrics["test_acc_onnx"] - acc)
            if built.choice is not None:
                metrics["precision_choice"] = built.choice
            write_json(tmp / "engine.json", metrics)
            if built.quantization is not None and metrics["accuracy_drop"] > cfg.max_accuracy_drop:
                write_json(args.metrics, metrics)
                raise DeployError(
                    f"the int8 engine's test accuracy is {acc:.2%} against {metrics['test_acc_onnx']:.2%} for the fp32 "
                    f"ONNX model: a drop of {100 * metrics['accuracy_drop']:.2f} points, over engine.max_accuracy_drop "
                    f"{100 * cfg.max_accuracy_drop:.2f} (top-1 agreement {check['top1_agreement']:.2%}). Raise the bound, "
                    f"try engine.int8_activations uint8 or int8, more engine.calibration_images, or precision fp32")
            if built.quantization is None and check["top1_agreement"] < cfg.min_agreement:
                write_json(args.metrics, metrics)
                raise DeployError(f"{backend} engine agrees with ONNX on {check['top1_agreement']:.2%} of test images, "
                                  f"below engine.min_agreement {cfg.min_agreement:.2%}")
            if not metrics["within_budget"]:
                msg = (("" if paired is None else f"measured with the student, the network reads {paired:.4f} ms; ") +
                       f"{backend} engine measures {latency['ms']:.4f} ms (fastest of {latency['windows']} windows; "
                       f"median window {latency['interval_ms'][1]:.4f}, p50 of all calls {latency['p50_ms']:.4f}, p99 "
                       f"{latency['p99_ms']:.4f}) at batch {bs}: over the budget {budget.target_ms:.4f} ms "
                       f"({how}); the "
                       f"table predicted {predicted_ms:.4f} ms and the prune stage measured {pruned_ms:.4f} ms")
                if cfg.on_over_budget == "fail":
                    write_json(args.metrics, metrics)
                    raise BudgetExceeded(msg + " (engine.on_over_budget: warn turns this into a warning)")
                log.warning("%s", msg)
        write_json(args.metrics, metrics)
        log.info("%s engine (%s): test acc %.4f, top-1 agreement with ONNX %.4f, %.4f ms (p50 of all calls %.4f): %s",
                 backend, reason, acc, check["top1_agreement"], latency["ms"], latency["p50_ms"], how)

    return run(body)


def _paired_reading(args: Namespace, cfg: EngineConfig, target: TargetConfig, data: PreparedData, budget: Budget,
                    protocol: TimingProtocol, engine: TimedCall | None = None) -> tuple[float | None, list[float]]:
    """The slimmed network's latency on the budget's scale: the median over ``engine.timing_readings``
    readings of it measured interleaved with the budget's reference (the student, or the student in
    fp32 when the budget is a fraction of it; ``pipeline.prune.BudgetReading``) by the target's
    backend, each ratio times the reference's latency the prune stage measured (one reading of a
    sub-millisecond network on a shared machine can be 30% off: a fresh clone of d26ff0a read 1.299
    where prune and compare had read 0.911 and 0.927). ``engine`` (int8, or a precision chosen by
    auto): the engine's own call is measured instead of the slimmed network. (None, []) without
    ``--model`` and ``--student``."""
    if not (args.model and args.student):
        return None, []
    from pipeline.prune import BudgetReading
    from pipeline.slim import load_slimmed_model

    student, _ = load_student(args.student, data.meta)
    shape = (data.channels, *data.meta["image_size"])
    reading = BudgetReading.of(target_backend(target), student, shape, budget, protocol, cfg.timing_readings)
    values = reading.values(engine if engine is not None else load_slimmed_model(args.model)[0].eval())
    return statistics.median(values), values


def _quantize(args: Namespace, cfg: EngineConfig, data: PreparedData, out: Path, calib: torch.Tensor,
              kind: Literal["uint8", "int8"], threads: int) -> dict[str, Any]:
    """The Q/DQ model of the ONNX model at ``out``: every layer int8, or (``engine.int8_fallback:
    float_layers``) with the layers whose quantization costs the most accuracy left in float until
    the validation accuracy is within ``engine.max_accuracy_drop`` (``pipeline.quantize.int8_within_bound``)."""
    from pipeline.quantize import fallback_split, int8_within_bound

    record = int8_within_bound(args.onnx, out, calib, kind, fallback_split(data, cfg.int8_fallback),
                               cfg.max_accuracy_drop, threads)
    if record["float_nodes"]:
        fb = record["float_fallback"]
        log.info("int8 (%s activations): %d of %d layers left in float, the most sensitive to quantization, for a "
                 "validation accuracy of %.2f%% against %.2f%% in fp32 (%.2f%% with every layer int8)", kind,
                 len(record["float_nodes"]), len(fb["sensitivity"]), 100 * fb["val_acc"], 100 * fb["val_acc_fp32"],
                 100 * fb["val_acc_all_int8"])
    return record


def _onnxruntime(args: Namespace, cfg: EngineConfig, target: TargetConfig, data: PreparedData, tmp: Path,
                 x: Normalized, xb: torch.Tensor, protocol: TimingProtocol) -> Built:
    import onnxruntime

    if cfg.precision == "int8":
        return _onnxruntime_int8(args, cfg, target, data, tmp, x, xb, protocol)
    engine_file = "model.opt.onnx"
    sess = ort_session(args.onnx, target.device, target.threads, optimized_path=tmp / engine_file)
    logits = ort_logits(sess, x)
    feed = {sess.get_inputs()[0].name: xb.numpy().astype(np.float32)}
    call = wall_timed(lambda: sess.run(None, feed))
    latency = engine_latency(call, protocol)
    return Built(engine_file, "fp32", logits, latency, device_record(target.device),
                 {"onnxruntime": onnxruntime.__version__}, call=call, predict=lambda rows: ort_logits(sess, rows))


def _onnxruntime_int8(args: Namespace, cfg: EngineConfig, target: TargetConfig, data: PreparedData, tmp: Path,
                      x: Normalized, xb: torch.Tensor, protocol: TimingProtocol) -> Built:
    """Post-training static INT8 of the ONNX model (pipeline/quantize.py) on ONNX Runtime's CPU
    provider: ``engine.int8_activations`` uint8 or int8, or (auto) both quantized and measured
    together on the target, the faster kept (which one wins depends on the CPU)."""
    import onnxruntime

    if target.device != "cpu":
        raise DeployError("engine.precision int8 on ONNX Runtime runs on its CPU provider (target.device: cpu); on a "
                          "GPU, TensorRT builds the int8 engine (engine.backend: tensorrt)")
    calib = calibration_images(data, cfg.calibration_images)
    if cfg.int8_activations != "auto":
        kinds, how = (cfg.int8_activations,), "engine.int8_activations"
    elif target.precision == "int8":  # pruning measured every network with this type: deploy what was measured
        kinds, how = (target.int8_activations,), "target.int8_activations (every latency was measured with it)"
    else:
        kinds, how = ("uint8", "int8"), "the faster measured on the target"
    cands = {}
    for kind in kinds:
        path = tmp / f"model.int8.{kind}.onnx"
        record = _quantize(args, cfg, data, path, calib, kind, target.threads)
        sess = ort_session(path, "cpu", target.threads)
        feed = {sess.get_inputs()[0].name: xb.numpy().astype(np.float32)}
        cands[kind] = (path, record, sess, wall_timed(lambda s=sess, f=feed: s.run(None, f)))
    # a choice to make: both timed interleaved (the same machine state); none: the engine's own latency below
    timings = measure_calls([c[3] for c in cands.values()], protocol) if len(cands) > 1 else []
    kind = min(zip(cands, timings), key=lambda kt: kt[1].ms)[0] if timings else kinds[0]
    path, record, sess, call = cands[kind]
    engine_file = "model.int8.onnx"
    path.rename(tmp / engine_file)
    for other, c in cands.items():
        if other != kind:
            c[0].unlink()
    logits = ort_logits(sess, x)
    latency = engine_latency(call, protocol)
    measured = {k: t.ms for k, t in zip(cands, timings)} or {kind: latency["ms"]}
    record.update(chosen_by=how, measured_ms=measured)
    log.info("int8 (%s activations, %s): %s", kind, how, ", ".join(f"{k} {ms:.4f} ms" for k, ms in measured.items()))
    return Built(engine_file, "int8", logits, latency, device_record("cpu"), {"onnxruntime": onnxruntime.__version__},
                 quantization=record, timed=call, call=call, predict=lambda rows: ort_logits(sess, rows))


def _torch(args: Namespace, cfg: EngineConfig, target: TargetConfig, data: PreparedData, tmp: Path,
           x: Normalized, xb: torch.Tensor, protocol: TimingProtocol) -> Built:
    from pipeline.runtimes import TorchEngineRunner, build_torch_engine
    from pipeline.slim import load_slimmed_model

    if not args.model:
        raise DeployError("the torch engine is built from the slimmed model: pass --model (dvc.yaml does)")
    if cfg.precision == "int8":
        raise DeployError("engine.precision int8 runs on TensorRT (a GPU) or ONNX Runtime (a CPU); the torch engine "
                          "runs fp16, bf16 or fp32: set engine.backend tensorrt or onnxruntime, or precision fp16, bf16, "
                          "fp32 or auto")
    precision = cfg.precision if target.device == "cuda" else "fp32"
    if precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise DeployError("engine.precision bf16 needs a GPU with bf16 arithmetic (compute capability 8.0, Ampere, or "
                          f"later); this one is {_gpu_name()}, where bf16 would be emulated: set engine.precision fp16, "
                          "fp32 or auto")
    shape, bs = (data.channels, *data.meta["image_size"]), target.batch_size
    model, _ = load_slimmed_model(args.model)
    built = build_torch_engine(model, shape, bs, target.device, precision, tmp, aoti=cfg.aoti)
    runner = TorchEngineRunner(tmp / built["engine_file"], built["kind"], target.device, precision, bs, shape,
                               cuda_graph=cfg.cuda_graph)
    if target.device == "cpu":
        torch.set_num_threads(target.threads)
    logits = runner.logits(x)
    xd = xb.to(target.device, runner.dtype)
    latency = engine_latency(wall_timed(lambda: runner(xd)), protocol)  # the runner synchronises
    built["cuda_graph"] = runner.graph_status
    if target.device == "cuda":  # paired with the student as the torch backend times it: CUDA events
        runner.static_in.copy_(xd)
        call = cuda_timed(runner.replay)
    else:
        call = wall_timed(lambda: runner(xd))
    return Built(built["engine_file"], precision, logits, latency, device_record(target.device), {}, built, call=call,
                 predict=runner.logits)


def _gpu_name() -> str:
    if not torch.cuda.is_available():
        return "no GPU (CUDA is not available)"
    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} (compute capability {major}.{minor})"


def _tensorrt(args: Namespace, cfg: EngineConfig, target: TargetConfig, data: PreparedData, tmp: Path,
              x: Normalized, xb: torch.Tensor, protocol: TimingProtocol) -> Built:
    import tensorrt

    engine_file, precision = "model.plan", cfg.precision
    shape, bs = (data.channels, *data.meta["image_size"]), target.batch_size
    # strongly typed: fp16 is built from an fp16 conversion of the ONNX model, int8 from its Q/DQ model
    source, record = args.onnx, None
    if precision == "int8":
        if cfg.int8_activations == "uint8":
            raise DeployError("engine.int8_activations uint8 (asymmetric) does not build in TensorRT, whose Q/DQ "
                              "activations are symmetric int8: set engine.int8_activations int8 or auto")
        source = tmp / "model.int8.onnx"
        record = _quantize(args, cfg, data, source, calibration_images(data, cfg.calibration_images), "int8", target.threads)
        record["chosen_by"] = "TensorRT (symmetric int8 activations only)"
    plan = build_tensorrt_plan(source, shape, (1, bs, max(bs, cfg.max_batch)), precision,
                               timing_cache=tmp / "timing.cache")
    (tmp / engine_file).write_bytes(plan)
    runner = TensorRTRunner(tmp / engine_file)
    logits = runner.logits(x, bs)
    xg = xb.cuda()
    latency = engine_latency(wall_timed(lambda: runner(xg)), protocol)  # the runner synchronises
    runner.bind(xg)  # the buffers stay bound: the paired verdict times enqueues with CUDA events, as the backends do
    call = cuda_timed(lambda: runner.enqueue(torch.cuda.current_stream()))
    return Built(engine_file, precision, logits, latency, device_record("cuda"), {"tensorrt": tensorrt.__version__},
                 quantization=record, timed=call if record is not None else None, call=call,
                 predict=lambda rows: runner.logits(rows, bs))


def precision_candidates(backend: str, target: TargetConfig, cfg: EngineConfig) -> tuple[str, ...]:
    """What ``engine.precision: auto`` measures: every precision ``backend`` runs on the target's
    device; int8 alone when the target measured every network in int8 (the budget is in int8)."""
    if target.precision == "int8":
        return ("int8",)
    if backend == "onnxruntime":
        return ("fp32", "int8") if target.device == "cpu" else ("fp32",)
    if backend == "torch":
        if target.device != "cuda":
            return ("fp32",)
        native_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        return ("fp32", "fp16", "bf16") if native_bf16 else (
            "fp32", "fp16")
    # tensorrt: its Q/DQ activations are symmetric int8; asked for uint8 ones, int8 is not a candidate
    return ("fp32", "fp16") if cfg.int8_activations == "uint8" else ("fp32", "fp16", "int8")


def _auto(backend: str, args: Namespace, cfg: EngineConfig, target: TargetConfig, data: PreparedData, tmp: Path,
          x: Normalized, xb: torch.Tensor, protocol: TimingProtocol) -> Built:
    """``engine.precision: auto``: every candidate precision built; each one's accuracy read on the
    validation split (the test split only reports) against the fp32 ONNX model's, with the stage's
    own gates (a quantized engine within ``max_accuracy_drop`` of it, a float one agreeing on at
    least ``min_agreement`` of the images); the eligible ones timed interleaved on the target (as
    its backend times), and the fastest kept. A candidate that fails to build is recorded and
    skipped while another builds (a config error is raised). With AOTInductor asked for, the
    candidates are exported programs and only the one kept is compiled."""
    cands = precision_candidates(backend, target, cfg)
    if len(data.val) == 0:
        raise ConfigError("engine.precision auto chooses among " + ", ".join(cands) + " by their accuracy on the "
                          "validation split, which is empty: set prepare.val_fraction above 0 (or give the image "
                          "folder a val/ split), or set engine.precision to one of " + ", ".join(cands))
    val = Normalized(data.val, *data.norm())
    ref = ort_logits(ort_session(args.onnx, "cpu", optimize=False), val)
    ref_acc = (ref.argmax(1) == data.val.y).double().mean().item()
    trial = cfg.model_copy(update={"aoti": False}) if backend == "torch" else cfg
    built: dict[str, Built] = {}
    record: dict[str, dict[str, Any]] = {}
    for p in cands:
        sub = tmp / f"candidate.{p}"
        sub.mkdir()
        try:
            b = BUILDERS[backend](args, trial.model_copy(update={"precision": p}), target, data, sub, x, xb, protocol)
            logits = b.predict(val)
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - a candidate that cannot run here is skipped, with its reason
            if len(cands) == 1:
                raise
            record[p] = {"error": f"{type(err).__name__}: {err}"[:400]}
            log.warning("precision auto: %s cannot be built here (%s)", p, record[p]["error"])
            continue
        acc = (logits.argmax(1) == data.val.y).double().mean().item()
        agree = parity(ref, logits)["top1_agreement"]
        ok = (ref_acc - acc <= cfg.max_accuracy_drop) if b.quantization is not None else agree >= cfg.min_agreement
        record[p] = {"val_acc": acc, "val_agreement_with_onnx": agree, "eligible": ok,
                     "latency_alone_ms": b.latency["ms"]}
        if ok:
            built[p] = b
    if not built:
        raise DeployError("engine.precision auto: no candidate precision passed the stage's checks on the validation "
                          f"split (fp32 ONNX {ref_acc:.2%}; max_accuracy_drop {cfg.max_accuracy_drop}, min_agreement "
                          f"{cfg.min_agreement}): " + "; ".join(f"{p}: {r}" for p, r in record.items()))
    timings = measure_calls([b.call for b in built.values()], protocol) if len(built) > 1 else []
    for p, t in zip(built, timings):
        record[p]["ms"] = t.ms
    chosen = min(built, key=lambda p: record[p].get("ms", 0.0))
    for p in cands:
        sub = tmp / f"candidate.{p}"
        if p == chosen and not (backend == "torch" and cfg.aoti):
            for f in sub.iterdir():
                f.rename(tmp / f.name)
        shutil.rmtree(sub, ignore_errors=True)
    if backend == "torch" and cfg.aoti:  # compile the one kept (a minute per compile on an H200)
        b = _torch(args, cfg.model_copy(update={"precision": chosen}), target, data, tmp, x, xb, protocol)
    else:
        b = built[chosen]
    if chosen != target.precision:  # the verdict pairs the engine itself with the student, as measured here
        b.timed = b.call
    b.choice = {"candidates": record, "chosen": chosen, "fp32_onnx_val_acc": ref_acc,
                "rule": "the fastest, timed interleaved on the target, of the precisions that pass the stage's checks "
                        f"on the validation split (quantized: at most {100 * cfg.max_accuracy_drop:.2f} points below "
                        f"the fp32 ONNX model; float: top-1 agreement with it at least {cfg.min_agreement:.2%})"}
    log.info("precision auto: %s kept; %s", chosen, ", ".join(
        f"{p} " + (f"{r['ms']:.4f} ms, " if "ms" in r else "") + (f"val acc {r['val_acc']:.4f}" if "val_acc" in r
                                                                  else f"not built: {r['error'][:80]}")
        for p, r in record.items()))
    return b


BUILDERS = {"onnxruntime": _onnxruntime, "torch": _torch, "tensorrt": _tensorrt}


if __name__ == "__main__":
    sys.exit(main())
