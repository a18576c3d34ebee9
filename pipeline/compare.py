"""Baselines at a given measured latency: uniform width scaling and Torch-Pruning L1 magnitude.

Both start from the same trained student as the prune stage, are cut until their latency
*measured on the target* matches the pruned model's, then fine-tuned with the same loss for the
same number of epochs. The channel counts they may take are the latency table's lattice for
uniform scaling (our own constraint, so the comparison isolates *which* channels and *how many
per layer*), and Torch-Pruning's ``round_to`` for L1.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.prune import nearest_allowed, top_mask
from pipeline.slim import ChannelGraph, prune_structure

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    label: str  # e.g. "ratio 0.55"
    model: nn.Module  # the physically smaller network
    widths: dict[str, int]
    measured_ms: float = float("nan")


def uniform_candidates(model: nn.Module, example: torch.Tensor, allowed: dict[str, list[int]],
                       ratios: list[float]) -> list[Candidate]:
    """Every prunable group scaled by the same ratio (nearest allowed width), channels kept by
    the L1 norm of the group's root filters. Distinct width configurations only."""
    graph = ChannelGraph(model, example)
    modules = dict(model.named_modules())
    out: list[Candidate] = []
    seen: set[tuple[tuple[str, int], ...]] = set()
    for r in ratios:
        masks = {}
        for g in graph.groups:
            if g.name not in allowed:
                continue
            score = modules[g.name].weight.detach().abs().flatten(1).sum(1)
            masks[g.name] = top_mask(score, nearest_allowed(max(1, round(r * g.size)), allowed[g.name]))
        widths = {g: int(m.sum()) for g, m in masks.items()}
        key = tuple(sorted(widths.items()))
        if key not in seen:
            seen.add(key)
            out.append(Candidate(f"ratio {r:.2f}", prune_structure(model, example, masks), widths))
    return out


def l1_candidates(model: nn.Module, example: torch.Tensor, ratios: list[float], round_to: int,
                  max_ratio: float) -> list[Candidate]:
    """Torch-Pruning ``MagnitudePruner`` (L1, global ranking across groups, classifier ignored)
    at each pruning ratio. Distinct architectures only."""
    import torch_pruning as tp

    out: list[Candidate] = []
    seen: set[tuple[int, ...]] = set()
    for r in ratios:
        net = copy.deepcopy(model).eval()
        classifier = ChannelGraph(net, example).classifier  # the last layer executed: never pruned
        with warnings.catch_warnings(), torch.enable_grad():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MagnitudePruner(
                net, example, importance=tp.importance.MagnitudeImportance(p=1), global_pruning=True,
                pruning_ratio=r, max_pruning_ratio=max_ratio, ignored_layers=[classifier], round_to=round_to)
            pruner.step()
        shape = tuple(m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d))
        if shape in seen:
            continue
        seen.add(shape)
        widths = {n: m.out_channels for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
        out.append(Candidate(f"ratio {r:.2f}", net, widths))
    return out


def match_latency(cands: list[Candidate], measure: Callable[[nn.Module], float], target_ms: float,
                  tolerance: float) -> Candidate:
    """Measure every candidate; the one with the largest latency at most ``target_ms * (1 +
    tolerance)``, or the fastest when none is that fast."""
    for c in cands:
        c.measured_ms = measure(c.model)
    ok = [c for c in cands if c.measured_ms <= target_ms * (1 + tolerance)]
    return max(ok, key=lambda c: c.measured_ms) if ok else min(cands, key=lambda c: c.measured_ms)


def describe(c: Candidate, acc_before: float, acc_after: float, params: int, extra: dict[str, Any]) -> dict[str, Any]:
    return {"choice": c.label, "measured_ms": c.measured_ms, "test_acc_before_finetune": acc_before,
            "test_acc": acc_after, "params": params, "widths": c.widths, **extra}
