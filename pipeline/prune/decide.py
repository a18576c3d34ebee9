"""Deciding the widths after the search: rank the channels (``pipeline.prune.importance``),
allocate widths on the latency table (knapsack) or harden the soft masks (threshold), then the
closed loop on the target until the measured network is in the budget's band. The decision is
recorded so that an interrupted run does not measure and decide again."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import PruneConfig
from pipeline.data import PreparedData, normalize
from pipeline.prune.budget import Budget
from pipeline.prune.groups import harden, kept_indices, masks_for_widths
from pipeline.prune.importance import (
    Importance,
    SoftMaskImportance,
    TaylorImportance,
    sampled_label_loss,
    taylor_batches,
)
from pipeline.prune.knapsack import allocate_widths
from pipeline.prune.loop import LoopResult, closed_loop
from pipeline.prune.soft import SoftMaskedNet
from pipeline.prune.space import PruneSpace
from pipeline.prune.state import ResumeState
from pipeline.slim import apply_masks, masks_from_kept
from pipeline.train import Criterion, epoch_steps

log = logging.getLogger(__name__)
Masks = dict[str, torch.Tensor]


def importance_for(cfg: PruneConfig, space: PruneSpace, data: PreparedData, batch_size: int, criterion: Criterion,
                   device: torch.device, temperature: float = 1.0) -> tuple[Importance, int | None]:
    """The criterion ``prune.method`` names, and (taylor) the training batches it averages over:
    ``prune.taylor_batches``, at most one epoch's. ``temperature``: the distillation's, at which
    ``prune.taylor_labels: sampled`` softens the output."""
    if cfg.method == "scp":
        return SoftMaskImportance(), None
    used = min(cfg.taylor_batches, epoch_steps(len(data.train.y), batch_size))
    source = f"{used} training batches of the student" + (
        f" (prune.taylor_batches {cfg.taylor_batches} is more than one epoch)" if used < cfg.taylor_batches else "")
    if cfg.taylor_labels == "sampled":  # the mask's Fisher information: always per sample
        criterion = sampled_label_loss(cfg.seed, temperature)
        source += ", labels drawn from its own output (Fisher)"
    return TaylorImportance(lambda: taylor_batches(data, batch_size, used, cfg.seed, device), criterion, space.groups,
                            device, taylor_per_sample(cfg), cfg.taylor_normalize, source), used


def taylor_per_sample(cfg: PruneConfig) -> bool:
    """Whether the Taylor importance averages each sample's squared gradient: ``prune.taylor_per_sample``,
    or always with ``prune.taylor_labels: sampled``."""
    return cfg.taylor_per_sample or cfg.taylor_labels == "sampled"


def val_cost(plain: nn.Module, space: PruneSpace, data: PreparedData, samples: int) -> Callable[[Masks], float]:
    """masks -> cross-entropy of ``plain`` hard-masked to them on the first ``samples`` validation
    images (the closed loop's price of a step)."""
    mean, std = data.norm()
    vx = normalize(data.val.take(torch.arange(min(samples, len(data.val)))), mean, std)
    vy = data.val.y[:samples]
    example = space.example

    def cost(masks: Masks) -> float:
        with torch.no_grad():
            return F.cross_entropy(apply_masks(plain, example, masks)(vx), vy).item()

    return cost


def decide_widths(net: SoftMaskedNet, space: PruneSpace, budget: Budget, cfg: PruneConfig, importance: Importance,
                  measure: Callable[[Masks], float], cost: Callable[[Masks], float], state: ResumeState,
                  key: str) -> LoopResult:
    """The closed loop's result for the searched ``net`` (``measure``: masks -> ms on the target;
    ``cost``: masks -> validation loss). An interrupted run's decision for ``key`` is taken as it
    was; a fresh one that met the budget is recorded in ``state``."""
    decided = state.read("decision.json", key)
    if decided is not None:  # the interrupted run's closed loop measured and decided already
        loop = LoopResult(masks_from_kept(space.groups, decided["kept"]), decided["measured_ms"], decided["status"],
                          decided["reason"], decided["history"])
        log.info("resuming with the widths the interrupted run's closed loop decided (%.4f ms measured)",
                 loop.measured_ms)
        return loop
    ranking = importance.rank(net)
    if budget.reference_ms is not None and budget.student_ms <= budget.bounds_ms()[1]:
        # the student in the deployed precision (int8) already meets a budget set against its fp32 self: the loop
        # starts from every channel, so a table that overprices the full network cannot prune what needs no pruning
        masks = masks_for_widths(ranking.keep, {g: max(a) for g, a in space.allowed.items()})
        log.info("the student measures %.4f ms in %s, under the band's top %.4f ms: the closed loop starts from the "
                 "unpruned network", budget.student_ms, "the deployed precision", budget.bounds_ms()[1])
    elif cfg.allocation == "knapsack":
        aim_ms = budget.aim_ms(cfg.aim)
        alloc, alloc_ms = allocate_widths(ranking.values, space.allowed, space.predict, aim_ms, space.inside)
        masks = masks_for_widths(ranking.keep, alloc)
        log.info("allocated widths for %.4f ms (predicted %.4f ms): %s", aim_ms, alloc_ms, alloc)
    else:
        masks = harden(net.keep_probs(), space.allowed)
    loop = closed_loop(masks, ranking.keep, space.allowed, budget.target_ms, measure, space.predict, cost,
                       budget.band_effective, cfg.max_iterations, space.inside)
    if loop.status != "unreachable":
        state.write("decision.json", key, {"kept": kept_indices(loop.masks), "measured_ms": loop.measured_ms,
                                           "status": loop.status, "reason": loop.reason, "history": loop.history})
    return loop
