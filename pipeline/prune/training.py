"""The prune stage's training: the soft-mask search (``method: scp``), trained jointly with the
distillation loss and the budget penalty, and the settling epochs that train the decided network
with its masks fixed (all of them with ``method: taylor``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed
from torch import nn

from models import build_model
from pipeline.config import PruneConfig, TrainConfig
from pipeline.data import PreparedData
from pipeline.prune.budget import Budget
from pipeline.prune.groups import harden, widths_of
from pipeline.prune.soft import BudgetPenalty, SoftMaskedNet
from pipeline.prune.space import PruneSpace
from pipeline.prune.state import ResumeState
from pipeline.runtime import DistContext
from pipeline.train import Criterion, epoch_steps, train_classifier

Masks = dict[str, torch.Tensor]
SETTLE_PHASES = ("settle", "recovery fine-tune")


def schedule(cfg: PruneConfig) -> tuple[int, int]:
    """(soft-mask search epochs, settle epochs) out of ``prune.epochs``. Taylor has no search:
    every epoch trains the decided network."""
    if cfg.method == "taylor":
        return 0, cfg.epochs
    settle = round(cfg.settle_fraction * cfg.epochs)
    soft = max(1, cfg.epochs - settle)
    return soft, cfg.epochs - soft


def joint_training(net: SoftMaskedNet, space: PruneSpace, budget: Budget, cfg: PruneConfig, data: PreparedData,
                   train_cfg: TrainConfig, distil: Criterion, *, epochs: int, device: torch.device, ctx: DistContext,
                   measure: Callable[[Masks], float], resume_path: str | Path, fingerprint: str,
                   ) -> tuple[list[dict[str, float]], BudgetPenalty]:
    """``epochs`` of the soft-mask search on ``net`` (modified): oracle distillation plus the budget
    penalty with dual ascent, aimed at ``budget.aim_ms(prune.aim)``. With ``allocation:
    threshold``, after every epoch the network as it would be hardened is measured (``measure``,
    rank 0) and the penalty rescaled by measured / expected (calibration). Returns the epoch
    history and the penalty (its multiplier and calibration are in ``net``)."""
    steps_per_epoch = epoch_steps(len(data.train.y), train_cfg.batch_size, ctx.world_size)
    penalty = BudgetPenalty(net, space.predictor, budget.aim_ms(cfg.aim), cfg.dual_lr, cfg.sparsity, steps_per_epoch)
    if not epochs:
        return [], penalty

    def criterion(logits: torch.Tensor, labels: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        return distil(logits, labels, inputs) + penalty()

    on_epoch_end = _calibration(net, penalty, space, cfg.allocation, measure, ctx, device)
    history = train_classifier(
        net, data, train_cfg, cfg.optimizer, epochs=epochs, seed=cfg.seed, device=device, ctx=ctx,
        criterion=criterion, resume_path=resume_path, fingerprint=fingerprint, on_epoch_end=on_epoch_end,
        desc="prune", graphable=False).history  # the dual step reads the multiplier on the host
    return history, penalty


def _calibration(net: SoftMaskedNet, penalty: BudgetPenalty, space: PruneSpace, allocation: str,
                 measure: Callable[[Masks], float], ctx: DistContext,
                 device: torch.device) -> Callable[[dict[str, float]], None]:
    def on_epoch_end(record: dict[str, float]) -> None:
        record.update(expected_ms=penalty.last_expected_ms, lam=float(net.lam),
                      expected_channels=float(sum(w.item() for w in net.expected_widths(False).values())))
        if allocation == "knapsack":  # widths are allocated from the table at the end: nothing to calibrate
            return
        # calibrate the predictor on the target: measure the network as it would be hardened now
        # and rescale what the penalty sees (the predictor at the expected widths) to that
        # (on rank 0 only under DDP, then broadcast, so every rank uses the same penalty)
        hard = harden(net.keep_probs(), space.allowed)
        predicted = space.predict(widths_of(hard))
        measured = float("nan")
        if ctx.is_main:
            measured = measure(hard)
            with torch.no_grad():
                soft = space.predictor({g: w.to("cpu", torch.float64) for g, w in net.expected_widths(False).items()})
            penalty.scale = min(2.0, max(0.5, measured / soft.item()))
        if ctx.enabled:
            scale = torch.tensor([penalty.scale], dtype=torch.float64, device=device)
            torch.distributed.broadcast(scale, 0)
            penalty.scale = scale.item()
        record.update(hardened_measured_ms=measured, hardened_predicted_ms=predicted, calibration=penalty.scale)

    return on_epoch_end


def rebuild(arch: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """A plain eval-mode network of ``arch`` (checkpoint ``arch``, ``arch_config``) with ``state_dict``."""
    plain = build_model(arch["arch"], **arch["arch_config"])
    plain.load_state_dict(state_dict)
    return plain.eval()


def settle(plain: nn.Module, masks: Masks, space: PruneSpace, cfg: PruneConfig, data: PreparedData,
           train_cfg: TrainConfig, distil: Criterion, arch: Mapping[str, Any], *, epochs: int,
           history: list[dict[str, Any]], device: torch.device, state: ResumeState,
           fingerprints: Mapping[str, str]) -> tuple[nn.Module, list[dict[str, Any]]]:
    """The decided network trained with ``masks`` fixed: ``epochs`` of settling, then
    ``prune.finetune_epochs`` of recovery fine-tune (``SETTLE_PHASES``; each resumable under
    ``fingerprints[phase]``). ``plain`` is trained in place and keeps the masks' hooks: use the
    returned network, a plain copy of the trained weights, and ``history`` with the phases' epochs
    appended."""
    history = list(history)
    cpu = torch.device("cpu")
    for n, what in zip((epochs, cfg.finetune_epochs), SETTLE_PHASES):
        if not n:
            continue
        fixed = SoftMaskedNet(plain, space.groups)
        fixed.fixed = masks
        extra = train_classifier(fixed, data, train_cfg, cfg.optimizer.model_copy(update={"warmup_epochs": 0}),
                                 epochs=n, seed=cfg.seed + len(history), device=device, criterion=distil,
                                 desc=what, resume_path=state.path(f"{what.split()[0]}.pt"),
                                 fingerprint=fingerprints[what],
                                 graphable=False)  # the fixed masks are copied to the device in the hooks
        history += [{**h, "epoch": len(history) + i + 1, "phase": what} for i, h in enumerate(extra.history)]
        fixed.to(cpu)
        plain = rebuild(arch, fixed.net.state_dict())
    return plain, history
