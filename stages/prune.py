"""prune: channel and block pruning of the student under a latency budget on the target. The
channels and blocks are ranked by their Taylor importance in the student (``method: taylor``) or
by SCP soft masks trained jointly with oracle distillation (``method: scp``); the widths are
allocated on the latency table and adjusted in a closed loop until the network measured on the
target is in the budget's band; the decided network then trains with the masks fixed. Writes the
masks (with the ``Budget`` every later stage judges against) and the masked checkpoint that `slim`
turns into a smaller dense network."""

from __future__ import annotations

import copy
import sys
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint import load_student, load_teachers, save_checkpoint
from pipeline.config import (
    CompareConfig,
    DistillConfig,
    PruneConfig,
    TrainConfig,
    parse_section,
    parse_teachers,
)
from pipeline.data import load_prepared
from pipeline.distill import kd_criterion, training_ensemble
from pipeline.io import atomic_path, file_sha256, write_csv, write_json
from pipeline.latency import LatencyTable, target_backend, timing_protocol
from pipeline.plots import widths_png
from pipeline.prune import (
    SETTLE_PHASES,
    BudgetError,
    BudgetReading,
    Pruned,
    ResumeState,
    SoftMaskedNet,
    Training,
    decide_widths,
    history_rows,
    importance_for,
    joint_training,
    loop_rows,
    masks_record,
    measure_alone,
    measure_paired,
    measure_reference_budget,
    prune_metrics,
    prune_space,
    rebuild,
    schedule,
    score,
    settle,
    share_reference,
    summary,
    val_cost,
    width_rows,
)
from pipeline.runtime import describe_device, shutdown_distributed, start_training
from pipeline.slim import apply_masks
from pipeline.train import test_accuracy
from stages._common import add_precision_arg, deployed_target, digest, load_params, log, parser, run

SECTIONS = (("prune", PruneConfig), ("distill", DistillConfig), ("train", TrainConfig))  # target: deployed_target


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="prepared data directory")
    p.add_argument("--teachers", required=True, help="directory of teacher checkpoints")
    p.add_argument("--student", required=True, help="trained student checkpoint")
    p.add_argument("--table", required=True, help="latency table from the profile stage")
    p.add_argument("--out-dir", required=True, help="directory for model.pt (masked) and masks.json")
    p.add_argument("--metrics", required=True, help="metrics JSON path")
    p.add_argument("--plots-dir", required=True, help="directory for history/loop/widths CSV and PNG")
    p.add_argument("--resume-dir", default=".resume")
    add_precision_arg(p)
    args = p.parse_args(argv)

    def body() -> None:
        t_start = time.perf_counter()
        params = load_params(args.params)
        cfg, kd, train_cfg = (parse_section(params, name, kind) for name, kind in SECTIONS)
        target = deployed_target(params, args.precision, args.student)
        names = list(parse_teachers(params))
        data = load_prepared(args.data)
        student, ckpt = load_student(args.student, data.meta)
        arch = {"arch": ckpt["arch"], "arch_config": ckpt["arch_config"]}
        backend = target_backend(target)
        compare_cfg = parse_section(params, "compare", CompareConfig)
        # the closed loop reads ours as compare matches and judges every baseline: its protocol and a pair
        loop_protocol = (timing_protocol(target, passes=compare_cfg.timing_passes, min_span_s=compare_cfg.timing_span_s)
                         if cfg.loop_timing == "verdict" else timing_protocol(target))
        table = LatencyTable.load(args.table, fingerprint=backend.fingerprint())
        space = prune_space(student, arch, table, args.table, cfg, (data.channels, *data.meta["image_size"]))
        state = ResumeState(Path(args.resume_dir) / "prune")
        ref_key = digest(cfg.model_dump(exclude={"progress"}), target.model_dump(), file_sha256(args.student),
                         file_sha256(args.table))
        ref = measure_reference_budget(backend, student, space, cfg, state, ref_key)  # fails before training
        torch.manual_seed(cfg.seed)
        net = SoftMaskedNet(copy.deepcopy(student), space.groups, cfg.eps, cfg.sharpness, cfg.threshold,
                            cfg.mask_tau, cfg.gate_init)
        teachers = load_teachers(args.teachers, names, data.meta)
        device, ctx = start_training(train_cfg.device, train_cfg.num_threads)
        ref = share_reference(ref, ctx, device, state, ref_key)
        budget = ref.budget(cfg)  # the one Budget: written into masks.json, read back by compare and engine
        ensemble = training_ensemble(list(teachers.values()), data.train, *data.norm(), train_cfg.augment, device,
                                     train_cfg.batch_size // ctx.world_size)
        distil = kd_criterion(ensemble, kd.temperature, kd.alpha, kd.mode, kd.average)
        fingerprint = digest(cfg.model_dump(exclude={"progress"}), "calibrated", kd.model_dump(),
                             train_cfg.model_dump(exclude={"progress"}), file_sha256(args.student),
                             [file_sha256(Path(args.teachers) / f"{n}.pt") for n in names], budget.target_ms,
                             data.meta["split_hashes"], ctx.world_size, ref_key, ref.noise)  # ref_key: table, target
        soft_epochs, settle_epochs = schedule(cfg)
        try:
            soft_history, penalty = joint_training(
                net, space, budget, cfg, data, train_cfg, distil, epochs=soft_epochs, device=device, ctx=ctx,
                measure=measure_alone(backend, student, space), resume_path=state.path("prune.pt"),
                fingerprint=fingerprint)
        finally:
            shutdown_distributed()
        if not ctx.is_main:
            return
        cpu = torch.device("cpu")
        net.to(cpu).eval()  # the last epoch's weights, not the best by validation: early epochs are over budget
        soft_acc = None if cfg.method == "taylor" else test_accuracy(net, data, cpu)  # at the expected masks
        importance, taylor_used = importance_for(cfg, space, data, train_cfg.batch_size, distil, device,
                                                 kd.temperature if kd.mode != "none" else 1.0)
        plain = rebuild(arch, net.net.state_dict())
        reading = BudgetReading.of(backend, student, space.shape, budget, loop_protocol, cfg.loop_readings)
        measure = measure_paired(plain, reading, space)
        loop = decide_widths(net, space, budget, cfg, importance, measure,
                             val_cost(plain, space, data, cfg.loop_val_samples), state,
                             digest(fingerprint, vars(loop_protocol)))  # a decision measured with this protocol
        plots = Path(args.plots_dir)
        write_csv(plots / "loop.csv", loop_rows(loop))
        if loop.status == "unreachable":
            raise BudgetError(f"closed loop on {target.backend}: {loop.reason} "
                              f"(every measurement: {plots / 'loop.csv'})")
        decided_acc = test_accuracy(apply_masks(plain, space.example, loop.masks), data, cpu)
        last = loop.history[-1] if loop.history else None
        plain, history = settle(plain, loop.masks, space, cfg, data, train_cfg, distil, arch, epochs=settle_epochs,
                                history=soft_history, device=device, state=state,
                                fingerprints={phase: digest(fingerprint, phase, last) for phase in SETTLE_PHASES})
        pruned = score(plain, loop.masks, student, space, data, state)
        training = Training(soft_epochs, settle_epochs, penalty, soft_history, history, soft_acc, decided_acc,
                            taylor_used)
        metrics = prune_metrics(cfg, budget, ref, loop, pruned, training, space, student)
        metrics.update(backend=target.backend, device=backend.fingerprint()["device"],
                       train_device=describe_device(device), seconds=time.perf_counter() - t_start)
        _write_outputs(args, ckpt, pruned, masks_record(pruned, loop, space, budget), history_rows(training),
                       width_rows(space, pruned.widths), metrics)
        state.clear()  # the training states, the reference and the decision
        log.info("%s", summary(metrics))

    return run(body)


def _write_outputs(args: Namespace, ckpt: dict[str, Any], pruned: Pruned, masks: dict[str, Any],
                   history: list[dict[str, Any]], widths: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
    out_dir, plots = Path(args.out_dir), Path(args.plots_dir)
    with atomic_path(out_dir / "model.pt") as tmp:
        save_checkpoint(tmp, ckpt["arch"], ckpt["arch_config"], pruned.masked.state_dict(),
                        {**ckpt["meta"], "stage": "prune", "test_acc": pruned.test_acc,
                         "student_test_acc": pruned.student_test_acc})
    write_json(out_dir / "masks.json", masks)
    write_csv(plots / "history.csv", history)
    write_csv(plots / "widths.csv", widths)
    widths_png(widths, plots / "widths.png",
               f"kept channels per group: {metrics['measured_ms']:.4f} ms measured, budget {metrics['budget_ms']:.4f} "
               f"ms ({metrics['backend']}, {metrics['device'].get('name')})")
    write_json(args.metrics, metrics)


if __name__ == "__main__":
    sys.exit(main())
