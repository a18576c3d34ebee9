"""What the prune stage reports: the pruned network scored, masks.json (the decision and the
``Budget`` every later stage judges against), its metrics and its plots' rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.blocks import dropped_blocks
from pipeline.config import PruneConfig
from pipeline.data import PreparedData
from pipeline.errors import SlimdeployError
from pipeline.flops import count_flops, count_params
from pipeline.prune.budget import Budget
from pipeline.prune.decide import taylor_per_sample
from pipeline.prune.groups import kept_indices, widths_of
from pipeline.prune.loop import LoopResult
from pipeline.prune.measure import Reference, paired_with
from pipeline.prune.soft import BudgetPenalty
from pipeline.prune.space import PruneSpace
from pipeline.prune.state import ResumeState
from pipeline.slim import apply_masks, prune_structure
from pipeline.train import check_above_chance, test_accuracy


@dataclass
class Pruned:
    """The decided network: ``masked`` (full shapes, masked weights: the checkpoint), ``slimmed``
    (physically smaller), their masks and test accuracies (the student's beside them)."""

    masks: dict[str, torch.Tensor]
    masked: nn.Module
    slimmed: nn.Module
    test_acc: float
    student_test_acc: float

    @property
    def widths(self) -> dict[str, int]:
        return widths_of(self.masks)


def score(plain: nn.Module, masks: dict[str, torch.Tensor], student: nn.Module, space: PruneSpace,
          data: PreparedData, state: ResumeState) -> Pruned:
    """``plain`` masked and slimmed to ``masks``, scored on the test split; a network no better than
    chance is an error (and nothing of the run in ``state`` is resumed from)."""
    cpu = torch.device("cpu")
    masked = apply_masks(plain, space.example, masks)
    slimmed = prune_structure(masked, space.example, masks)
    acc_student = test_accuracy(student, data, cpu)
    acc = test_accuracy(masked, data, cpu)
    try:
        check_above_chance(acc, data.num_classes, len(data.test.y), "pruned network (test split)")
    except SlimdeployError:
        state.clear()
        raise
    return Pruned(masks, masked, slimmed, acc, acc_student)


def masks_record(pruned: Pruned, loop: LoopResult, space: PruneSpace, budget: Budget) -> dict[str, Any]:
    """masks.json: the kept channels (``pipeline.slim.masks_from_kept``), the widths, and the
    ``budget`` (``Budget.to_dict``); the flat ``budget_ms``, ``noise`` and ``student_ms`` repeat it
    for readers of older files."""
    return {
        "input_shape": list(space.shape), "kept": kept_indices(pruned.masks), "widths": pruned.widths,
        "full_widths": {g.name: g.size for g in space.groups}, "kinds": {g.name: g.kind for g in space.groups},
        "multiple": space.multiple, "budget_ms": budget.target_ms, "measured_ms": loop.measured_ms,
        "noise": budget.noise, "removed_blocks": dropped_blocks(pruned.masks),
        "predicted_ms": space.predict(pruned.widths), "student_ms": budget.student_ms, "budget": budget.to_dict(),
    }


def loop_rows(loop: LoopResult) -> list[dict[str, Any]]:
    """plots/prune/loop.csv: every closed-loop measurement (the widths are in the metrics)."""
    return [{k: v for k, v in h.items() if k != "widths"} for h in loop.history]


def history_rows(training: Training) -> list[dict[str, Any]]:
    """plots/prune/history.csv: every epoch, the search's marked as such."""
    n = len(training.soft_history)
    return [{"phase": "soft masks", **h} for h in training.history[:n]] + training.history[n:]


def width_rows(space: PruneSpace, widths: dict[str, int]) -> list[dict[str, Any]]:
    """plots/prune/widths.csv: kept channels per group (a group out of ``widths`` keeps all)."""
    return [{"group": g.name, "kind": g.kind, "full": g.size, "kept": widths.get(g.name, g.size)} for g in space.groups]


@dataclass
class Training:
    """How the stage trained: the soft-mask search's epochs, records and penalty, the settling
    epochs, every epoch's record (``history``: the search's first), the accuracy at the expected
    masks (scp) and at the decision, and the Taylor batches (taylor)."""

    soft_epochs: int
    settle_epochs: int
    penalty: BudgetPenalty
    soft_history: list[dict[str, Any]]
    history: list[dict[str, Any]]
    soft_acc: float | None
    decided_acc: float
    taylor_batches: int | None


def prune_metrics(cfg: PruneConfig, budget: Budget, ref: Reference, loop: LoopResult, pruned: Pruned,
                  training: Training, space: PruneSpace, student: nn.Module) -> dict[str, Any]:
    """metrics/prune.json, less the target's and the run's records (backend, device, seconds)."""
    ms, taylor = loop.measured_ms, cfg.method == "taylor"
    status, verdict = budget.verdict(ms)
    predicted_ms = space.predict(pruned.widths)
    soft = training.soft_epochs > 0  # the mask search's multiplier and expected latency (none with taylor)
    return {
        "budget": cfg.latency_budget, "budget_unit": cfg.budget_unit, "budget_ms": budget.target_ms,
        "student_ms": ref.student_ms, "budget_reference": "fp32 student" if budget.reference_ms is not None
        else "student at the target's precision", "student_fp32_ms": ref.fp32_ms,
        "predicted_ms": predicted_ms, "measured_ms": ms,
        "measured_over_budget": ms / budget.target_ms, "predicted_over_measured": predicted_ms / ms,
        "measured_over_student": ms / ref.student_ms,
        "measured_paired_with": paired_with(budget.reference_ms is not None),
        "measured_readings": budget.reading_count(cfg.loop_readings),
        "within_budget": budget.meets(ms), "in_band": status == "in_band", "budget_status": status,
        "budget_verdict": verdict, "band": list(budget.band), "band_effective": list(budget.band_effective),
        "noise": budget.noise, "budget_limit_ms": budget.limit_ms,
        "loop_status": loop.status, "loop_reason": loop.reason, "loop_iterations": len(loop.history),
        "smallest_network_ms": ref.floor_ms, "smallest_network_predicted_ms": ref.floor_predicted_ms,
        "test_acc_student": pruned.student_test_acc, "test_acc": pruned.test_acc,
        "test_acc_soft_expected": training.soft_acc, "allocation": cfg.allocation, "method": cfg.method,
        "taylor_batches": training.taylor_batches if taylor else None,
        "taylor_per_sample": taylor_per_sample(cfg) if taylor else None,
        "taylor_labels": cfg.taylor_labels if taylor else None,
        "taylor_normalize": cfg.taylor_normalize if taylor else None, "channels": cfg.channels,
        "test_acc_at_decision": training.decided_acc, "acc_drop": pruned.student_test_acc - pruned.test_acc,
        "params_student": count_params(student), "params": count_params(pruned.slimmed),
        "flops_student": count_flops(student, space.shape), "flops": count_flops(pruned.slimmed, space.shape),
        "epochs": cfg.epochs, "soft_epochs": training.soft_epochs, "settle_epochs": training.settle_epochs,
        "finetune_epochs": cfg.finetune_epochs, "multiple": space.multiple,
        "final_lambda": float(training.penalty.net.lam) if soft else None,
        "final_expected_ms": training.penalty.last_expected_ms if soft else None,
        "training_target_ms": budget.aim_ms(cfg.aim), "final_calibration": training.penalty.scale if soft else None,
        "groups": {k: sum(g.kind == k for g in space.groups) for k in ("scp", "gate", "fixed", "block")},
        "depth": cfg.depth, "removable_blocks": len(space.blocks), "removed_blocks": dropped_blocks(pruned.masks),
        "widths": pruned.widths, "epoch_seconds": [h["epoch_seconds"] for h in training.history],
    }


def summary(metrics: dict[str, Any]) -> str:
    """One line of ``prune_metrics``: where the network landed against the budget, and its accuracy."""
    m = metrics
    return (f"pruned: measured {m['measured_ms']:.4f} ms for a budget of {m['budget_ms']:.4f} ms "
            f"({m['measured_over_budget']:.3f}, {m['budget_status']}; predicted {m['predicted_ms']:.4f} ms) after "
            f"{m['loop_iterations']} loop iteration(s), {m['loop_status']}; {len(m['removed_blocks'])} of "
            f"{m['removable_blocks']} removable blocks removed; test acc {m['test_acc']:.4f} "
            f"(student {m['test_acc_student']:.4f})")
