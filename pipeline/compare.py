"""Baselines under the same protocol as ours: uniform width scaling and Torch-Pruning L1 magnitude.

The protocol, fixed here and used by the `compare` stage and the benchmarks:

* **Same start.** Every method starts from the same trained student and its weights.
* **Same measured latency.** Every method is cut to the same band of the budget that the prune
  stage's closed loop aims at ([low, high] x budget, the top lowered by the measured noise),
  measured on the target paired with the student (interleaved windows; the ratio to the student
  times the student's latency). A baseline's one knob is continuous (uniform: the width ratio;
  L1: the global pruning ratio) and is swept finely; the largest resulting network that measures
  at most ``high`` x budget is taken (``match_budget``); where the knob's steps are too coarse to
  land in the band, the metrics say how far below it the baseline landed. Each of these
  verdicts, and the final joint run, is timed with compare's own protocol (``compare.timing_passes``
  windows over ``compare.timing_span_s``): the fastest of 10 windows over 0.5 s is one noisy
  extreme (docs/BENCHMARKS.md, section 37).
* **Same training.** Every method trains its final network with the same distillation loss and
  optimizer for the same total number of epochs (``prune.epochs``; ours spends part of them
  searching its masks).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.prune import top_mask
from pipeline.slim import ChannelGraph, prune_structure

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    label: str  # e.g. "ratio 0.55"
    model: nn.Module  # the physically smaller network
    widths: dict[str, int]
    measured_ms: float = float("nan")


def uniform_widths(sizes: dict[str, int], allowed: dict[str, list[int]], ratio: float) -> dict[str, int]:
    """Every prunable group scaled by ``ratio``, on its lattice, with the rounding balanced out
    (largest remainder). Each group takes the allowed width just under ``ratio`` x its size or
    the one just over it, and as many groups take the upper one as their fractions add up to,
    the nearest to it first (ties: the order of ``sizes``). Rounded to the nearest width instead,
    every group of one size steps at the same ratio, so the sweep jumps over latencies that one
    group's step would reach; balanced, the groups step one at a time as ``ratio`` grows. A
    single step can still be large: a residual stream's step changes every block of its stage
    (docs/BENCHMARKS.md, section 30)."""
    lo: dict[str, int] = {}
    hi: dict[str, int] = {}
    frac: dict[str, float] = {}
    for g, n in sizes.items():
        if g not in allowed:
            continue
        target, a = ratio * n, allowed[g]
        lo[g] = max((w for w in a if w <= target), default=min(a))
        hi[g] = min((w for w in a if w >= target), default=max(a))
        frac[g] = (target - lo[g]) / (hi[g] - lo[g]) if hi[g] > lo[g] else 0.0
    up = set(sorted(frac, key=lambda g: -frac[g])[:round(sum(frac.values()))])  # sorted is stable
    return {g: hi[g] if g in up else lo[g] for g in lo}


def uniform_candidate(model: nn.Module, example: torch.Tensor, allowed: dict[str, list[int]], ratio: float,
                      graph: ChannelGraph | None = None) -> Candidate:
    """``uniform_widths``, channels kept by the L1 norm of each group's root filters."""
    graph = graph or ChannelGraph(model, example)
    modules = dict(model.named_modules())
    widths = uniform_widths({g.name: g.size for g in graph.groups}, allowed, ratio)
    masks = {g: top_mask(modules[g].weight.detach().abs().flatten(1).sum(1), w) for g, w in widths.items()}
    return Candidate(f"ratio {ratio:.3f}", prune_structure(model, example, masks), widths)


def l1_candidate(model: nn.Module, example: torch.Tensor, ratio: float, round_to: int, max_ratio: float) -> Candidate:
    """Torch-Pruning ``MagnitudePruner`` (L1, global ranking across groups, classifier ignored) at
    pruning ratio ``ratio``."""
    import torch_pruning as tp

    net = copy.deepcopy(model).eval()
    classifier = ChannelGraph(net, example).classifier  # the last layer executed: never pruned
    with warnings.catch_warnings(), torch.enable_grad():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MagnitudePruner(
            net, example, importance=tp.importance.MagnitudeImportance(p=1), global_pruning=True,
            pruning_ratio=ratio, max_pruning_ratio=max_ratio, ignored_layers=[classifier], round_to=round_to)
        pruner.step()
    widths = {n: m.out_channels for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    return Candidate(f"ratio {ratio:.3f}", net, widths)


@dataclass
class Match:
    chosen: Candidate
    probes: list[dict[str, Any]] = field(default_factory=list)  # every candidate measured, in order


def candidates(make: Callable[[float], Candidate], knobs: list[float],
               key: Callable[[float], Any] | None = None) -> list[Candidate]:
    """``make(knob)`` over a fine grid of the method's continuous knob, one per distinct network
    (Torch-Pruning's global ratio is not monotone in the size it gives once ``round_to`` and
    ``max_pruning_ratio`` bite, so the knob is swept, not bisected). ``key(knob)``, when cheap,
    skips building a network already built."""
    out: dict[Any, Candidate] = {}
    for k in knobs:
        if key is not None and key(k) in out:
            continue
        c = make(k)
        out.setdefault(key(k) if key is not None else tuple(sorted(c.widths.items())), c)
    return list(out.values())


def match_budget(cands: list[Candidate], predict: Callable[[Candidate], float],
                 measure: Callable[[nn.Module], float], high_ms: float) -> Match:
    """The largest candidate that *measures* at most ``high_ms``. Candidates are ranked by the
    latency table's prediction (ties: by the sum of their widths, the larger first); measuring
    starts at the one predicted just under ``high_ms``
    (allowing the prediction 10% of error upwards) and walks down until one fits, then back up
    past where it started until one does not, so a predictor that errs either way cannot hand a
    baseline a smaller network than it could have had. When none fits, the smallest is returned
    with its measurement (the budget is out of the method's reach)."""
    # equal predictions (a staircase table, or a flat one on a tiny network): the larger network first
    ranked = sorted(cands, key=lambda c: (predict(c), sum(c.widths.values())), reverse=True)
    probes: list[dict[str, Any]] = []

    def fits(i: int) -> bool:
        c = ranked[i]
        c.measured_ms = measure(c.model)
        probes.append({"label": c.label, "predicted_ms": predict(c), "measured_ms": c.measured_ms})
        return c.measured_ms <= high_ms

    start = next((i for i, c in enumerate(ranked) if predict(c) <= 1.1 * high_ms), len(ranked) - 1)
    best = next((i for i in range(start, len(ranked)) if fits(i)), None)
    if best is None:
        return Match(ranked[-1], probes)
    if best == start:  # the start fitted: larger ones (predicted over the start) may fit too
        for i in range(start - 1, -1, -1):
            if not fits(i):
                break
            best = i
    return Match(ranked[best], probes)


def describe(c: Candidate, acc_before: float, acc_after: float, params: int, extra: dict[str, Any]) -> dict[str, Any]:
    return {"choice": c.label, "measured_ms": c.measured_ms, "test_acc_before_finetune": acc_before,
            "test_acc": acc_after, "params": params, "widths": c.widths, **extra}
