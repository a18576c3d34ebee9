"""prune: channel and block pruning of the student under a latency budget on the target. The
channels and blocks are ranked by their Taylor importance in the student (``method: taylor``) or
by SCP soft masks trained jointly with oracle distillation (``method: scp``); the widths are
allocated on the latency table and adjusted in a closed loop until the network measured on the
target meets the budget; the decided network then trains with the masks fixed. Writes the masks
and the masked checkpoint that `slim` turns into a smaller dense network."""

from __future__ import annotations

import copy
import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed
import torch.nn.functional as F

from models import build_model
from pipeline.checkpoint import save_checkpoint
from pipeline.config import DistillConfig, PruneConfig, TargetConfig, TrainConfig, parse_section, parse_teachers
from pipeline.data import PreparedData, load_prepared, normalize
from pipeline.distill import TeacherEnsemble, kd_criterion
from pipeline.errors import ConfigError, SlimdeployError
from pipeline.flops import count_flops, count_params
from pipeline.io import atomic_path, file_sha256, write_csv, write_json
from pipeline.latency import LatencyTable, measure_reference, target_backend
from pipeline.plots import widths_png
from pipeline.prune import (BudgetError, BudgetPenalty, LoopResult, SoftMaskedNet, allocate_widths, allowed_for,
                            blocks_only, closed_loop, effective_band, harden, inner_groups, masks_for_widths,
                            normalize_importance, prune_groups, taylor_importance, top_mask, widths_of)
from pipeline.runtime import describe_device, shutdown_distributed, start_training
from pipeline.slim import BLOCK, apply_masks, dropped_blocks, masks_from_kept, prune_structure
from pipeline.train import check_above_chance, epoch_steps, test_accuracy, train_classifier
from stages._common import digest, load_params, log, parser, run
from stages._teachers import load_student, load_teachers


def _read_state(path: Path, key: str) -> dict | None:
    """A state file an interrupted run of the same configuration left (``key`` matches), else None."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and state.get("key") == key else None


def _taylor_batches(data: PreparedData, batch_size: int, count: int, seed: int,
                    device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` training batches (the caller caps it at one epoch), in a seeded order, normalised,
    without augmentation: what the Taylor importance is averaged over."""
    mean, std = data.norm()
    order = torch.randperm(len(data.train.y), generator=torch.Generator().manual_seed(seed))
    for i in range(count):
        idx = order[i * batch_size: (i + 1) * batch_size]
        if len(idx) < 2:
            return
        yield normalize(data.train.x[idx], mean, std).to(device), data.train.y[idx].to(device)


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
    args = p.parse_args(argv)

    def body() -> None:
        t_start = time.perf_counter()
        params = load_params(args.params)
        cfg = parse_section(params, "prune", PruneConfig)
        target = parse_section(params, "target", TargetConfig)
        kd = parse_section(params, "distill", DistillConfig)
        train_cfg = parse_section(params, "train", TrainConfig)
        names = list(parse_teachers(params))
        data = load_prepared(args.data)
        student, ckpt = load_student(args.student, data.meta)
        shape = (data.channels, *data.meta["image_size"])
        example = torch.zeros(1, *shape)
        backend = target_backend(target)
        table = LatencyTable.load(args.table, fingerprint=backend.fingerprint())
        profiled = {"arch": table.model.get("arch"), "arch_config": table.model.get("arch_config")}
        if json.dumps(profiled, sort_keys=True) != json.dumps({"arch": ckpt["arch"], "arch_config": ckpt["arch_config"]},
                                                              sort_keys=True):
            raise ConfigError(f"latency table {args.table} profiles {profiled}, not the student "
                              f"{ckpt['arch']} {ckpt['arch_config']}; set profile.arch: student and re-run profile")
        predictor = table.predictor()
        groups = prune_groups(student, example, cfg.coupled, depth=cfg.depth)
        blocks = [g.name for g in groups if g.kind == "block"]
        unpriced = sorted(set(blocks) - predictor.blocks)
        if unpriced:
            raise ConfigError(f"prune.depth: true, but the latency table {args.table} prices no removal of the blocks "
                              f"{[b[len(BLOCK):] for b in unpriced]} (a table from an older profile stage); re-run "
                              f"profile, or set prune.depth: false")
        multiple = cfg.multiple or table.step
        allowed = allowed_for(groups, multiple, table.meta["min_fraction"])
        if not cfg.channels:  # blocks only: every channel group keeps the student's width
            allowed = blocks_only(allowed)
        inside = inner_groups(groups)  # channel groups that stop mattering when their block is removed

        # --- the budget, and whether the smallest allowed network can meet it (before training)
        sizes = {g.name: g.size for g in groups}
        floor_masks = {g: top_mask(torch.ones(sizes[g]), a[0]) for g, a in allowed.items()}
        floor_pred = predictor(widths_of(floor_masks)).item()
        # An interrupted run's reference measurement is reused: the budget (a fraction of the measured
        # student) is part of the training state's fingerprint, so re-measuring would orphan it.
        state_dir = Path(args.resume_dir) / "prune"
        ref_key = digest(cfg.model_dump(exclude={"progress"}), target.model_dump(), file_sha256(args.student),
                         file_sha256(args.table))
        ref = _read_state(state_dir / "reference.json", ref_key)
        if ref is not None:
            student_ms, floor_ms, noise = ref["student_ms"], ref["floor_ms"], ref["noise"]
            log.info("resuming with the reference latencies the interrupted run measured (student %.4f ms)", student_ms)
        else:
            student_ms, floor_ms, noise = measure_reference(backend, student,
                                                            prune_structure(student, example, floor_masks), shape)
        budget_ms = cfg.latency_budget * student_ms if cfg.budget_unit == "fraction" else cfg.latency_budget
        band = effective_band(cfg.band, noise)
        how = (f"(student {student_ms:.4f} ms; "
               + (f"every prunable group at its smallest allowed width, multiples of {multiple} from "
                  f"{table.meta['min_fraction']:.0%} of the full width, coupled groups: {cfg.coupled}; " if cfg.channels
                  else "prune.channels: false, every channel group at its full width; ")
               + (f"all {len(blocks)} removable blocks removed)" if blocks else
                  "no block removed: prune.depth is false or the network has no removable block)"))
        if min(floor_pred, floor_ms) > budget_ms * band[1]:
            raise BudgetError(
                f"prune.latency_budget {cfg.latency_budget:g} {cfg.budget_unit} = {budget_ms:.4f} ms is below what the "
                f"smallest allowed network reaches: measured {floor_ms:.4f} ms ({floor_ms / student_ms:.2f} of the "
                f"student), predicted {floor_pred:.4f} ms {how}. Raise the budget, lower profile.min_fraction"
                f"{', use prune.coupled: gate' if cfg.coupled == 'keep' else ''}"
                f"{', set prune.channels: true' if not cfg.channels else ''}, or search a smaller student.")
        log.info("budget %.4f ms (%.2f of the student's %.4f ms); smallest allowed network measures %.4f ms; a "
                 "measurement repeats within %.1f%%, so the closed loop aims at [%.3f, %.3f] of the budget",
                 budget_ms, budget_ms / student_ms, student_ms, floor_ms, 100 * noise, *band)

        # --- joint training: oracle distillation + budget penalty with dual ascent
        torch.manual_seed(cfg.seed)
        net = SoftMaskedNet(copy.deepcopy(student), groups, cfg.eps, cfg.sharpness, cfg.threshold, cfg.mask_tau, cfg.gate_init)
        teachers = load_teachers(args.teachers, names, data.meta)
        device, ctx = start_training(train_cfg.device, train_cfg.num_threads)
        if ctx.enabled:  # every rank measured the student; rank 0's reference is the one used by all
            b = torch.tensor([student_ms, floor_ms, noise], dtype=torch.float64, device=device)
            torch.distributed.broadcast(b, 0)
            student_ms, floor_ms, noise = b.tolist()
            budget_ms = cfg.latency_budget * student_ms if cfg.budget_unit == "fraction" else cfg.latency_budget
            band = effective_band(cfg.band, noise)
        if ref is None and ctx.is_main:
            write_json(state_dir / "reference.json", {"key": ref_key, "student_ms": student_ms, "floor_ms": floor_ms,
                                                      "noise": noise})
        ensemble = TeacherEnsemble(list(teachers.values())).to(device)
        distil = kd_criterion(ensemble, kd.temperature, kd.alpha, kd.mode, kd.average)
        aim_ms = budget_ms * (band[0] + cfg.aim * (band[1] - band[0]))
        steps_per_epoch = epoch_steps(len(data.train.y), train_cfg.batch_size, ctx.world_size)
        penalty = BudgetPenalty(net, predictor, aim_ms, cfg.dual_lr, cfg.sparsity, steps_per_epoch)
        plain_student = copy.deepcopy(student)

        def criterion(logits: torch.Tensor, labels: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
            return distil(logits, labels, inputs) + penalty()

        def on_epoch_end(record: dict[str, float]) -> None:
            record.update(expected_ms=penalty.last_expected_ms, lam=float(net.lam),
                          expected_channels=float(sum(w.item() for w in net.expected_widths(False).values())))
            if cfg.allocation == "knapsack":  # widths are allocated from the table at the end: nothing to calibrate
                return
            # calibrate the predictor on the target: measure the network as it would be hardened now
            # and rescale what the penalty sees (the predictor at the expected widths) to that
            # (on rank 0 only under DDP, then broadcast, so every rank uses the same penalty)
            hard = harden(net.keep_probs(), allowed)
            predicted = predictor(widths_of(hard)).item()
            measured = float("nan")
            if ctx.is_main:
                measured = backend.measure(prune_structure(plain_student, example, hard), shape).ms
                with torch.no_grad():
                    soft = predictor({g: w.to("cpu", torch.float64) for g, w in net.expected_widths(False).items()})
                penalty.scale = min(2.0, max(0.5, measured / soft.item()))
            if ctx.enabled:
                scale = torch.tensor([penalty.scale], dtype=torch.float64, device=device)
                torch.distributed.broadcast(scale, 0)
                penalty.scale = scale.item()
            record.update(hardened_measured_ms=measured, hardened_predicted_ms=predicted, calibration=penalty.scale)

        teacher_files = [file_sha256(Path(args.teachers) / f"{n}.pt") for n in names]
        fingerprint = digest(cfg.model_dump(exclude={"progress"}), "calibrated", kd.model_dump(),
                             train_cfg.model_dump(exclude={"progress"}), file_sha256(args.student), teacher_files,
                             budget_ms, data.meta["split_hashes"], ctx.world_size,
                             ref_key, noise)  # ref_key: the latency table and the target; noise sets the band
        resume = state_dir / "prune.pt"
        if cfg.method == "taylor":  # no search epochs: every epoch trains the decided network
            soft_epochs, settle = 0, cfg.epochs
        else:
            settle = round(cfg.settle_fraction * cfg.epochs)
            soft_epochs = max(1, cfg.epochs - settle)
            settle = cfg.epochs - soft_epochs
        soft_history: list[dict[str, float]] = []
        try:
            if soft_epochs:
                soft_history = train_classifier(
                    net, data, train_cfg, cfg.optimizer, epochs=soft_epochs, seed=cfg.seed, device=device, ctx=ctx,
                    criterion=criterion, resume_path=resume, fingerprint=fingerprint, on_epoch_end=on_epoch_end,
                    desc="prune", graphable=False).history  # the dual step reads the multiplier on the host
        finally:
            shutdown_distributed()
        if not ctx.is_main:
            return
        cpu = torch.device("cpu")
        # The last epoch's weights, not the best by validation: early epochs are over budget.
        net.to(cpu).eval()
        # the expected masks, before any channel is cut (taylor: no soft masks)
        soft_acc = None if cfg.method == "taylor" else test_accuracy(net, data, cpu)

        taylor_used = min(cfg.taylor_batches, epoch_steps(len(data.train.y), train_cfg.batch_size))  # at most an epoch

        def ranking() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
            """(keep, values): which channels a group keeps first, and what the knapsack allocates by.
            Only when the closed loop runs (a resumed run that had decided needs neither)."""
            if cfg.method == "scp":
                # keep: unsaturated, ranks channels without the ties of the sharpened probability;
                # values: a block is worth the channels it takes away
                return net.importance(), net.allocation_values()
            try:
                imp = taylor_importance(net.to(device), _taylor_batches(data, train_cfg.batch_size, taylor_used, cfg.seed,
                                                                        device), distil, cfg.taylor_per_sample)
            finally:
                net.to(cpu).eval()
            log.info("Taylor importance of %d groups and blocks from %d training batches of the student%s",
                     len(imp), taylor_used, f" (prune.taylor_batches {cfg.taylor_batches} is more than one epoch)"
                     if taylor_used < cfg.taylor_batches else "")
            imp = normalize_importance(imp, groups, cfg.taylor_normalize)
            return imp, imp

        plain = build_model(ckpt["arch"], **ckpt["arch_config"])
        plain.load_state_dict(net.net.state_dict())
        plain.eval()

        # --- harden, then the closed loop on the target
        mean, std = data.norm()
        vx = normalize(data.val.x[: cfg.loop_val_samples], mean, std)
        vy = data.val.y[: cfg.loop_val_samples]

        def cost(masks: dict[str, torch.Tensor]) -> float:
            with torch.no_grad():
                return F.cross_entropy(apply_masks(plain, example, masks)(vx), vy).item()

        def measure(masks: dict[str, torch.Tensor]) -> float:
            # paired with the student in interleaved windows: a slow spell of the machine moves both
            sub_t, ref_t = backend.measure_many([prune_structure(plain, example, masks), student], shape)
            return student_ms * sub_t.ms / ref_t.ms

        decided = _read_state(state_dir / "decision.json", fingerprint)
        if decided is not None:  # the interrupted run's closed loop measured and decided already
            loop = LoopResult(masks_from_kept(groups, decided["kept"]), decided["measured_ms"], decided["status"],
                              decided["reason"], decided["history"])
            log.info("resuming with the widths the interrupted run's closed loop decided (%.4f ms measured)",
                     loop.measured_ms)
        else:
            keep, values = ranking()
            if cfg.allocation == "knapsack":
                alloc, alloc_ms = allocate_widths(values, allowed, lambda w: predictor(w).item(), aim_ms, inside)
                masks = masks_for_widths(keep, alloc)
                log.info("allocated widths for %.4f ms (predicted %.4f ms): %s", aim_ms, alloc_ms, alloc)
            else:
                masks = harden(net.keep_probs(), allowed)
            loop = closed_loop(masks, keep, allowed, budget_ms, measure, lambda w: predictor(w).item(), cost,
                               band, cfg.max_iterations, inside)
            if loop.status != "unreachable":
                write_json(state_dir / "decision.json", {
                    "key": fingerprint, "kept": {g: m.nonzero().flatten().tolist() for g, m in loop.masks.items()},
                    "measured_ms": loop.measured_ms, "status": loop.status, "reason": loop.reason,
                    "history": loop.history})
        masks = loop.masks
        plots = Path(args.plots_dir)
        write_csv(plots / "loop.csv", [{k: v for k, v in h.items() if k != "widths"} for h in loop.history])
        if loop.status == "unreachable":
            raise BudgetError(f"closed loop on {target.backend}: {loop.reason} (every measurement: {plots / 'loop.csv'})")

        acc_decided = test_accuracy(apply_masks(plain, example, masks), data, cpu)
        # --- settling (the rest of the schedule) and the optional recovery fine-tune, masks fixed
        history = list(soft_history)
        for epochs, what in ((settle, "settle"), (cfg.finetune_epochs, "recovery fine-tune")):
            if not epochs:
                continue
            fixed = SoftMaskedNet(plain, groups)
            fixed.fixed = masks
            extra = train_classifier(fixed, data, train_cfg, cfg.optimizer.model_copy(update={"warmup_epochs": 0}),
                                     epochs=epochs, seed=cfg.seed + len(history), device=device, criterion=distil,
                                     desc=what, resume_path=state_dir / f"{what.split()[0]}.pt",
                                     fingerprint=digest(fingerprint, what, loop.history[-1] if loop.history else None),
                                     graphable=False)  # the fixed masks are copied to the device in the hooks
            history += [{**h, "epoch": len(history) + i + 1, "phase": what} for i, h in enumerate(extra.history)]
            fixed.to(cpu)
            plain = build_model(ckpt["arch"], **ckpt["arch_config"])
            plain.load_state_dict(fixed.net.state_dict())
            plain.eval()
        masked = apply_masks(plain, example, masks)
        slimmed = prune_structure(masked, example, masks)
        acc_student = test_accuracy(student, data, cpu)
        acc_pruned = test_accuracy(masked, data, cpu)
        try:
            check_above_chance(acc_pruned, data.num_classes, len(data.test.y), "pruned network (test split)")
        except SlimdeployError:
            shutil.rmtree(state_dir, ignore_errors=True)  # nothing of this run is resumed from
            raise
        final_widths = widths_of(masks)
        predicted_ms = predictor(final_widths).item()
        kept = {g: m.nonzero().flatten().tolist() for g, m in masks.items()}

        out_dir = Path(args.out_dir)
        with atomic_path(out_dir / "model.pt") as tmp:
            save_checkpoint(tmp, ckpt["arch"], ckpt["arch_config"], masked.state_dict(),
                            {**ckpt["meta"], "stage": "prune", "test_acc": acc_pruned, "student_test_acc": acc_student})
        write_json(out_dir / "masks.json", {
            "input_shape": list(shape), "kept": kept, "widths": final_widths,
            "full_widths": {g.name: g.size for g in groups}, "kinds": {g.name: g.kind for g in groups},
            "multiple": multiple, "budget_ms": budget_ms, "measured_ms": loop.measured_ms, "noise": noise,
            "removed_blocks": dropped_blocks(masks),
            "predicted_ms": predicted_ms, "student_ms": student_ms,
        })
        write_csv(plots / "history.csv", [{"phase": "soft masks", **h} for h in soft_history] + history[len(soft_history):])
        rows = [{"group": g.name, "kind": g.kind, "full": g.size, "kept": final_widths.get(g.name, g.size)} for g in groups]
        write_csv(plots / "widths.csv", rows)
        widths_png(rows, plots / "widths.png",
                   f"kept channels per group: {loop.measured_ms:.4f} ms measured, budget {budget_ms:.4f} ms "
                   f"({target.backend}, {backend.fingerprint()['device'].get('name')})")
        metrics = {
            "budget": cfg.latency_budget, "budget_unit": cfg.budget_unit, "budget_ms": budget_ms,
            "student_ms": student_ms, "predicted_ms": predicted_ms, "measured_ms": loop.measured_ms,
            "measured_over_budget": loop.measured_ms / budget_ms, "predicted_over_measured": predicted_ms / loop.measured_ms,
            "measured_over_student": loop.measured_ms / student_ms,
            "within_budget": loop.measured_ms <= budget_ms,
            "in_band": band[0] * budget_ms <= loop.measured_ms <= band[1] * budget_ms,
            "band": list(cfg.band), "band_effective": list(band), "noise": noise,
            "loop_status": loop.status, "loop_reason": loop.reason, "loop_iterations": len(loop.history),
            "smallest_network_ms": floor_ms, "smallest_network_predicted_ms": floor_pred,
            "test_acc_student": acc_student, "test_acc": acc_pruned, "test_acc_soft_expected": soft_acc, "allocation": cfg.allocation,
            "method": cfg.method, "taylor_batches": taylor_used if cfg.method == "taylor" else None,
            "taylor_per_sample": cfg.taylor_per_sample if cfg.method == "taylor" else None,
            "taylor_normalize": cfg.taylor_normalize if cfg.method == "taylor" else None,
            "channels": cfg.channels,
            "test_acc_at_decision": acc_decided,
            "acc_drop": acc_student - acc_pruned,
            "params_student": count_params(student), "params": count_params(slimmed),
            "flops_student": count_flops(student, shape), "flops": count_flops(slimmed, shape),
            "epochs": cfg.epochs, "soft_epochs": soft_epochs, "settle_epochs": settle,
            "finetune_epochs": cfg.finetune_epochs, "multiple": multiple,
            # the mask search's multiplier and expected latency (none with method: taylor)
            "final_lambda": float(net.lam) if soft_epochs else None,
            "final_expected_ms": penalty.last_expected_ms if soft_epochs else None,
            "training_target_ms": aim_ms, "final_calibration": penalty.scale if soft_epochs else None,
            "groups": {k: sum(g.kind == k for g in groups) for k in ("scp", "gate", "fixed", "block")},
            "depth": cfg.depth, "removable_blocks": len(blocks), "removed_blocks": dropped_blocks(masks),
            "widths": final_widths, "backend": target.backend, "device": backend.fingerprint()["device"],
            "train_device": describe_device(device), "seconds": time.perf_counter() - t_start,
            "epoch_seconds": [h["epoch_seconds"] for h in history],
        }
        write_json(args.metrics, metrics)
        shutil.rmtree(state_dir, ignore_errors=True)  # the training states, the reference and the decision
        log.info("pruned: measured %.4f ms for a budget of %.4f ms (%.3f; predicted %.4f ms) after %d loop "
                 "iteration(s), %s; %d of %d removable blocks removed; test acc %.4f (student %.4f)", loop.measured_ms,
                 budget_ms, loop.measured_ms / budget_ms, predicted_ms, len(loop.history), loop.status,
                 len(dropped_blocks(masks)), len(blocks), acc_pruned, acc_student)

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
