"""compare: the baselines under the same protocol as ours (pipeline/compare.py): cut from the same
student to the same measured-latency band of the prune stage's budget (uniform width scaling, its
width ratio swept; Torch-Pruning global L1 magnitude, its pruning ratio swept), trained with the
same distillation loss for as many epochs as the prune stage trained, and measured at the end, each
in a pair with the budget's reference (the student, or the student in fp32 when the budget is a fraction
of it) as ours was decided, where every network, ours included, is judged by the
budget's one rule (``budget_status``). ``unpruned``: the student itself trained as many more epochs the same way,
the equal-training reference every pruned network is judged against (the student's own accuracy
had that many fewer epochs); it is not cut to the budget and is no baseline to beat."""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

from pipeline.checkpoint import load_model, load_student, load_teachers
from pipeline.compare import (
    FineTune,
    baseline_space,
    judge,
    paired_measure,
    protocol_record,
    run_methods,
    table_predict,
    versus_ours,
)
from pipeline.config import (
    CompareConfig,
    DistillConfig,
    EngineConfig,
    PruneConfig,
    TargetConfig,
    TrainConfig,
    parse_section,
    parse_teachers,
)
from pipeline.data import Normalized, PreparedData, load_prepared, load_split
from pipeline.distill import kd_criterion, training_ensemble
from pipeline.flops import count_params
from pipeline.io import file_sha256, write_json
from pipeline.latency import LatencyTable, target_backend, timing_protocol
from pipeline.prune import Budget, BudgetReading, taylor_batches
from pipeline.quantize import calibration_images, fallback_split, int8_accuracies
from pipeline.runtime import describe_device, resolve_device
from pipeline.slim import channel_groups, masks_from_kept, prune_structure
from pipeline.train import epoch_steps, test_accuracy
from stages._common import add_precision_arg, deployed_target, load_params, log, parser, read_pruned, run

SECTIONS = (("compare", CompareConfig), ("prune", PruneConfig), ("distill", DistillConfig),  # target: deployed_target
            ("train", TrainConfig))


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", required=True)
    p.add_argument("--teachers", required=True, help="directory of teacher checkpoints")
    p.add_argument("--student", required=True, help="trained student checkpoint")
    p.add_argument("--table", required=True, help="latency table (its channel lattice)")
    p.add_argument("--pruned", required=True, help="masks.json of the prune stage (its budget, ours' channels)")
    p.add_argument("--model", required=True, help="masked checkpoint of the prune stage")
    p.add_argument("--metrics", required=True)
    p.add_argument("--holdout", default=None, help="optional .npz split (x uint8 NCHW, y) every network is also "
                   "scored on, as holdout_acc (benchmarks: a larger test set than the prepared one)")
    add_precision_arg(p)
    args = p.parse_args(argv)

    def body() -> None:
        t0 = time.perf_counter()
        params = load_params(args.params)
        cfg, prune_cfg, kd, train_cfg = (parse_section(params, name, kind) for name, kind in SECTIONS)
        target = deployed_target(params, args.precision, args.student)
        data = load_prepared(args.data)
        holdout = load_split(args.holdout, data.meta) if args.holdout else None
        student, _ = load_student(args.student, data.meta)
        shape = (data.channels, *data.meta["image_size"])
        example = torch.zeros(1, *shape)
        backend = target_backend(target)
        table = LatencyTable.load(args.table, fingerprint=backend.fingerprint())
        pruned = read_pruned(args.pruned, "kept", "budget_ms", "student_ms")
        budget = Budget.from_masks(pruned)  # the prune stage's: the same band and rule for every method
        masked, _ = load_model(args.model)
        ours = prune_structure(masked, example, masks_from_kept(channel_groups(masked, example), pruned["kept"]))
        cpu = torch.device("cpu")
        # a verdict's protocol: more windows over a longer span than target.timing's, which the profile stage
        # spends on hundreds of models; one reading of the fastest of 10 windows over 0.5 s is a noisy extreme,
        # and a baseline's match and its final reading once disagreed by 26% (docs/history.md, section 37)
        verdict = timing_protocol(target, passes=cfg.timing_passes, min_span_s=cfg.timing_span_s)

        reading = BudgetReading.of(backend, student, shape, budget, verdict, cfg.timing_readings)
        result: dict = {
            "protocol": protocol_record(budget, prune_cfg.epochs, f"distill ({kd.mode}, T={kd.temperature}, "
                                        f"alpha={kd.alpha})", cfg.seed, verdict.passes, verdict.min_span_s,
                                        cfg.timing_readings),
            "ours": {"test_acc": test_accuracy(ours, data, cpu), "params": count_params(ours),
                     "widths": pruned.get("widths"), "measured_ms_prune_stage": pruned.get("measured_ms")},
            "student": {"test_acc": test_accuracy(student, data, cpu), "measured_ms": budget.student_ms},
            "methods": list(cfg.methods),
        }
        finals: dict[str, torch.nn.Module] = {"ours": ours}
        if cfg.methods:
            device = resolve_device(train_cfg.device)
            teachers = load_teachers(args.teachers, list(parse_teachers(params)), data.meta)
            ensemble = training_ensemble(list(teachers.values()), data.train, *data.norm(), train_cfg.augment,
                                         device, train_cfg.batch_size)
            criterion = kd_criterion(ensemble, kd.temperature, kd.alpha, kd.mode, kd.average)
            used = min(prune_cfg.taylor_batches, epoch_steps(len(data.train), train_cfg.batch_size))
            space = baseline_space(student, example, prune_cfg.multiple or table.step, float(table.meta["min_fraction"]),
                                   lambda: taylor_batches(data, train_cfg.batch_size, used, cfg.seed, cpu))
            fine_tune = FineTune(data, train_cfg, prune_cfg.optimizer, prune_cfg.epochs, cfg.seed, device, criterion)
            records, models = run_methods(cfg.methods, space, budget, table_predict(table.predictor(), table.groups),
                                          paired_measure(reading), fine_tune)
            result.update(records)
            finals.update(models)
            result["train_device"] = describe_device(device)
        for name, verdict_of in judge(finals, budget, reading).items():  # one protocol, one rule
            result[name].update(verdict_of)
        if holdout is not None:
            result["holdout"] = {"path": str(args.holdout), "images": len(holdout), "sha256": file_sha256(args.holdout)}
            for name, model in (("student", student), *finals.items()):
                result[name]["holdout_acc"] = test_accuracy(model, data, cpu, split=holdout)
        if target.precision == "int8":  # every latency above was of the Q/DQ model: so is the accuracy that counts
            result["int8"] = _int8_accuracies(params, target, data, holdout, shape, {"student": student, **finals}, result)
        result.update(versus_ours(result, cfg.methods))
        acc_key = "test_acc_int8" if target.precision == "int8" else "test_acc"
        log.info("at %.4f ms budget: %s", budget.target_ms, ", ".join(
            f"{m} {result[m][acc_key]:.4f} ({result[m]['measured_over_budget']:.3f}, {result[m]['budget_status']})"
            for m in finals))
        result.update(backend=target.backend, device=backend.fingerprint()["device"], seconds=time.perf_counter() - t0)
        write_json(args.metrics, result)

    return run(body)


def _int8_accuracies(params: dict, target: TargetConfig, data: PreparedData, holdout: Any, shape: tuple[int, ...],
                     models: dict[str, torch.nn.Module], result: dict[str, Any]) -> dict[str, Any]:
    """``test_acc_int8`` (and ``holdout_acc_int8``) of every network: its Q/DQ model as the engine
    stage builds it for this target (``target.int8_activations``, the ``engine.calibration_images``
    training images, the layers ``engine.int8_fallback`` leaves in float), run by ONNX Runtime. The
    student's is what INT8 alone gives. ``ours_minus_<method>_int8``: the differences on them."""
    engine = parse_section(params, "engine", EngineConfig)
    calib = calibration_images(data, engine.calibration_images)
    norm = data.norm()
    splits = {"test_acc_int8": (Normalized(data.test, *norm), data.test.y)}
    if holdout is not None:
        splits["holdout_acc_int8"] = (Normalized(holdout, *norm), holdout.y)
    val = fallback_split(data, engine.int8_fallback)
    for name, model in models.items():
        result[name].update(int8_accuracies(model.eval(), shape, calib, target.int8_activations, splits, target.threads,
                                            None if val is None else (val, engine.max_accuracy_drop)))
    for m in (m for m in models if m not in ("student", "ours")):
        result[f"ours_minus_{m}_int8"] = result["ours"]["test_acc_int8"] - result[m]["test_acc_int8"]
    return {"activations": target.int8_activations, "calibration_images": engine.calibration_images,
            "int8_fallback": engine.int8_fallback, "tool": "onnxruntime.quantization (pipeline/quantize.py)"}


if __name__ == "__main__":
    sys.exit(main())
