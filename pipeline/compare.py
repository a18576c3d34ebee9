"""Baselines under the same protocol as ours: uniform width scaling and Torch-Pruning (L1 magnitude,
group L2 norm, group Taylor).

The protocol, fixed here and used by the `compare` stage and the benchmarks:

* **Same start.** Every method starts from the same trained student and its weights.
* **Same measured latency.** Every method is cut to the same band of the same ``Budget`` (the
  prune stage's, read back from its masks.json): ``Budget.bounds_ms``, the band the prune stage's
  closed loop aims at, measured on the target in a pair with the student, as the closed loop
  measures ours (interleaved windows; the ratio to the student times the student's latency, the
  median over ``compare.timing_readings`` readings). A baseline's one knob is continuous (uniform:
  the width ratio; Torch-Pruning: the global pruning ratio) and is swept finely; the largest
  resulting network that measures at most the band's top is taken (``match_budget``). Each of
  these readings, and the final ones, is timed with compare's own protocol
  (``compare.timing_passes`` windows over ``compare.timing_span_s``): the fastest of 10 windows
  over 0.5 s is one noisy extreme (docs/history.md, section 37).
* **Same verdict.** Every final network (ours, every baseline, the unpruned reference) is measured
  in a pair with the student, the pairs one after another (``judge``), in the composition each
  was chosen in: measured in one run of six networks, a pruned network read about 17% lower
  against the model than in a pair (docs/history.md, section 43). Each is judged by
  ``Budget.verdict`` on its reading, ours included: ``budget_status`` says in band, within (above
  the band by no more than the measured noise), below the band, or over. Two methods are compared at equal
  latency (``at_equal_latency``) only when both are at the budget (in band or within) there; a
  difference between networks of different latency is reported as such, never silently.
* **Same training.** Every method trains its final network with the same distillation loss and
  optimizer for the same total number of epochs (``prune.epochs``; ours spends part of them
  searching its masks): one ``FineTune`` trains them all.
"""

from __future__ import annotations

import copy
import logging
import statistics
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.config import OptimizerConfig, TrainConfig
from pipeline.data import PreparedData
from pipeline.flops import count_params
from pipeline.latency import LatencyPredictor
from pipeline.prune import Budget, BudgetReading, allowed_widths, filter_l1, top_mask
from pipeline.slim import ChannelGraph, prune_structure
from pipeline.train import Criterion, check_above_chance, test_accuracy, train_classifier

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
    (docs/history.md, section 30)."""
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
    widths = uniform_widths({g.name: g.size for g in graph.groups}, allowed, ratio)
    l1 = filter_l1(model, list(widths))
    masks = {g: top_mask(l1[g], w) for g, w in widths.items()}
    return Candidate(f"ratio {ratio:.3f}", prune_structure(model, example, masks), widths)


TP_IMPORTANCE = {  # compare.methods -> Torch-Pruning importance, each ranked globally across groups
    "l1": "MagnitudeImportance(p=1): each layer's filter L1 norm",
    "tp_norm": "GroupMagnitudeImportance(p=2): the L2 norm over every coupled parameter of a group",
    "tp_taylor": "GroupTaylorImportance: |weight x gradient| over every coupled parameter of a group",
}


def tp_candidate(model: nn.Module, example: torch.Tensor, ratio: float, round_to: int, max_ratio: float,
                 method: str = "l1", grads: dict[str, torch.Tensor] | None = None) -> Candidate:
    """Torch-Pruning's ``MetaPruner`` with ``method``'s importance (``TP_IMPORTANCE``), global
    ranking across groups, classifier ignored, ``round_to`` the latency table's channel step, at
    pruning ratio ``ratio``. ``tp_taylor`` needs ``grads`` (parameter name -> gradient of the
    training loss, ``taylor_grads``)."""
    import torch_pruning as tp

    net = copy.deepcopy(model).eval()
    if method == "tp_taylor":
        if grads is None:
            raise ValueError("tp_taylor needs the training loss's gradients")
        for name, p in net.named_parameters():
            p.grad = grads[name].clone() if name in grads else None
    importance = {"l1": lambda: tp.importance.MagnitudeImportance(p=1),
                  "tp_norm": lambda: tp.importance.GroupMagnitudeImportance(p=2),
                  "tp_taylor": lambda: tp.importance.GroupTaylorImportance()}[method]()
    classifier = ChannelGraph(net, example).classifier  # the last layer executed: never pruned
    with warnings.catch_warnings(), torch.enable_grad():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            net, example, importance=importance, global_pruning=True, pruning_ratio=ratio,
            max_pruning_ratio=max_ratio, ignored_layers=[classifier], round_to=round_to)
        pruner.step()
    for p in net.parameters():
        p.grad = None
    widths = {n: m.out_channels for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    return Candidate(f"ratio {ratio:.3f}", net, widths)


def taylor_grads(model: nn.Module, batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
                 ) -> dict[str, torch.Tensor]:
    """Gradients of the cross-entropy summed over ``batches`` (the training batches ours ranks its
    channels with, ``prune.taylor_batches``), on a copy of ``model`` in eval mode (BatchNorm as it
    will run): what Torch-Pruning's Taylor criterion multiplies with the weights."""
    net = copy.deepcopy(model).eval()
    net.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for x, y in batches():
            x, y = x.to("cpu"), y.to("cpu")
            nn.functional.cross_entropy(net(x), y).backward()
    return {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}


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


def containing_max(cands: Sequence[Candidate], predicted: Sequence[float]) -> list[float]:
    """Each candidate's ranking key: the largest prediction among the candidates it contains (the
    same groups, each width at least as large; itself included). A network that contains another is
    at least as slow on any target, but a table's error can predict it faster, and on a tiny network,
    whose table is mostly noise, a sub-network can be predicted slowest of all: ranked by the raw
    prediction, a budget every candidate meets would hand a baseline that sub-network instead of the
    whole network (the CI failure of 1b8f5f6, docs/history.md section 46). The keys keep the table's
    order wherever it respects containment."""
    keys = list(predicted)
    by_groups: dict[tuple[str, ...], list[int]] = {}
    for i, c in enumerate(cands):
        by_groups.setdefault(tuple(sorted(c.widths)), []).append(i)
    for groups, idx in by_groups.items():
        w = torch.tensor([[cands[i].widths[g] for g in groups] for i in idx], dtype=torch.float64)
        p = torch.tensor([predicted[i] for i in idx], dtype=torch.float64)
        contains = (w[:, None, :] >= w[None, :, :]).all(dim=-1)  # [a, b]: a contains b
        best = torch.where(contains, p[None, :], torch.tensor(float("-inf"), dtype=torch.float64)).amax(dim=1)
        for i, k in zip(idx, best.tolist()):
            keys[i] = k
    return keys


def match_budget(cands: list[Candidate], predict: Callable[[Candidate], float],
                 measure: Callable[[list[nn.Module]], list[float]], high_ms: float, batch: int = 4) -> Match:
    """The largest candidate that *measures* at most ``high_ms``. Candidates are ranked by the
    latency table's prediction, raised to the prediction of any candidate they contain
    (``containing_max``: a network with every width at least another's is ranked above it, however
    the table errs; ties: by the sum of their widths, the larger first); measuring
    starts at the one predicted just under ``high_ms``
    (allowing the prediction 10% of error upwards) and walks down until one fits, then back up
    past where it started until one does not, so a predictor that errs either way cannot hand a
    baseline a smaller network than it could have had. When none fits, the smallest is returned
    with its measurement (the budget is out of the method's reach).

    ``measure`` times a list of networks (``paired_measure``: each in a pair with the student); the
    walk asks for ``batch`` of them at a time (the next ones it would visit) and decides exactly as
    a walk of one at a time over the same readings would."""
    keys = dict(zip(map(id, cands), containing_max(cands, [predict(c) for c in cands])))
    # equal keys (a staircase table, a flat one on a tiny network, a network containing another):
    # the larger network first
    ranked = sorted(cands, key=lambda c: (keys[id(c)], sum(c.widths.values())), reverse=True)
    probes: list[dict[str, Any]] = []

    def fits(order: list[int]) -> list[bool]:
        for i, ms in zip(order, measure([ranked[i].model for i in order])):
            ranked[i].measured_ms = ms
            probes.append({"label": ranked[i].label, "predicted_ms": predict(ranked[i]), "measured_ms": ms})
        return [ranked[i].measured_ms <= high_ms for i in order]

    start = next((i for i, c in enumerate(ranked) if keys[id(c)] <= 1.1 * high_ms), len(ranked) - 1)
    best = None
    for lo in range(start, len(ranked), batch):  # down: the first that fits
        order = list(range(lo, min(lo + batch, len(ranked))))
        best = next((i for i, ok in zip(order, fits(order)) if ok), None)
        if best is not None:
            break
    if best is None:
        return Match(ranked[-1], probes)
    if best == start:  # the start fitted: larger ones (predicted over the start) may fit too
        while best > 0:
            order = list(range(best - 1, max(best - 1 - batch, -1), -1))
            ok = fits(order)
            fitted = 0
            while fitted < len(order) and ok[fitted]:
                fitted += 1
            best = order[fitted - 1] if fitted else best
            if fitted < len(order):
                break
    return Match(ranked[best], probes)


def describe(c: Candidate, acc_before: float, acc_after: float, params: int, extra: dict[str, Any]) -> dict[str, Any]:
    return {"choice": c.label, "measured_ms": c.measured_ms, "test_acc_before_finetune": acc_before,
            "test_acc": acc_after, "params": params, "widths": c.widths, **extra}


# ---------------------------------------------------------------------------------------------
# The protocol, method by method


@dataclass
class BaselineSpace:
    """Where the baselines' knobs sweep: the student's channel groups (``graph``, ``sizes``) and the
    widths each may take on the latency table's lattice (``allowed``: multiples of ``multiple``
    from ``low`` of the full width, Torch-Pruning's ``round_to`` and ``max_pruning_ratio``)."""

    student: nn.Module
    example: torch.Tensor
    graph: ChannelGraph
    allowed: dict[str, list[int]]
    sizes: dict[str, int]
    multiple: int
    low: float
    batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]] | None = None  # tp_taylor's gradients


def baseline_space(student: nn.Module, example: torch.Tensor, multiple: int, low: float,
                   batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]] | None = None) -> BaselineSpace:
    graph = ChannelGraph(student, example)
    allowed = {g.name: allowed_widths(g.size, multiple, low) for g in graph.groups}
    return BaselineSpace(student, example, graph, allowed, {g.name: g.size for g in graph.groups}, multiple, low,
                         batches)


def sweep(method: str, space: BaselineSpace) -> list[Candidate]:
    """Every distinct network of ``method``'s knob over a fine grid: ``uniform``'s width ratio from
    ``low`` to 1 (fine: groups step one at a time), ``l1``'s global pruning ratio from 0 to 1 - low."""
    s, low = space, space.low
    if method == "uniform":
        knobs = [low + (1 - low) * i / 1000 for i in range(1001)]
        return candidates(lambda k: uniform_candidate(s.student, s.example, s.allowed, k, s.graph), knobs,
                          key=lambda k: tuple(sorted(uniform_widths(s.sizes, s.allowed, k).items())))
    if method in TP_IMPORTANCE:
        grads = taylor_grads(s.student, s.batches) if method == "tp_taylor" and s.batches is not None else None
        knobs = [(1 - low) * i / 60 for i in range(61)]
        return candidates(lambda k: tp_candidate(s.student, s.example, k, s.multiple, 1.0 - low, method, grads),
                          knobs)
    raise ValueError(f"no knob to sweep for method {method!r}")


def table_predict(predictor: LatencyPredictor, groups: Sequence[str]) -> Callable[[Candidate], float]:
    """A candidate's latency predicted by the table (ms); groups are named by their root
    convolution, so a candidate's widths are its layers' output widths."""
    return lambda c: predictor({g: float(c.widths[g]) for g in groups}).item()


def paired_measure(reading: BudgetReading) -> Callable[[list[nn.Module]], list[float]]:
    """models -> ms each: every model measured in a pair with the budget's reference (``reading``:
    the student, or the student in fp32 when the budget is a fraction of it), one pair after
    another, as the prune stage's closed loop measures ours. Pairs, not one run of them all:
    measured together with four more networks, a pruned network read about 17% lower against the
    model than in a pair (benchmarks/paired_readings.py), so a baseline matched in a crowd and ours
    decided in a pair would not be at the same latency."""
    return lambda models: [reading(m) for m in models]


@dataclass(frozen=True)
class FineTune:
    """The one training every method's final network gets (the protocol's *same training*):
    ``train_classifier`` with ``criterion`` (the distillation loss), ``optimizer``, ``epochs`` and
    ``seed``. Calling it trains ``model`` in place (left on the CPU, eval mode) and returns its test
    accuracy (before, after); a network no better than chance after it is an error."""

    data: PreparedData
    train_cfg: TrainConfig
    optimizer: OptimizerConfig
    epochs: int
    seed: int
    device: torch.device
    criterion: Criterion

    def __call__(self, model: nn.Module, method: str) -> tuple[float, float]:
        cpu = torch.device("cpu")
        before = test_accuracy(model, self.data, cpu)
        train_classifier(model, self.data, self.train_cfg, self.optimizer, epochs=self.epochs, seed=self.seed,
                         device=self.device, criterion=self.criterion, desc=f"{method} fine-tune")
        model.to(cpu).eval()
        after = test_accuracy(model, self.data, cpu)  # last epoch's weights, as for ours
        check_above_chance(after, self.data.num_classes, len(self.data.test.y),
                           f"compare: {method} baseline (test split)")
        return before, after


def run_methods(methods: Sequence[str], space: BaselineSpace, budget: Budget, predict: Callable[[Candidate], float],
                measure: Callable[[list[nn.Module]], list[float]],
                fine_tune: Callable[[nn.Module, str], tuple[float, float]],
                ) -> tuple[dict[str, dict], dict[str, nn.Module]]:
    """Every method's network cut to the budget's band (``match_budget`` at ``budget.bounds_ms()``'s
    top; ``unpruned``: the whole student, not cut) and trained by ``fine_tune``. Returns each
    method's record and its final network, in ``methods``' order."""
    records: dict[str, dict] = {}
    finals: dict[str, nn.Module] = {}
    for method in methods:
        probes: list[dict[str, Any]] = []
        if method == "unpruned":  # nothing to match: the same training on the whole student
            chosen = Candidate("unpruned student", copy.deepcopy(space.student), dict(space.sizes), budget.student_ms)
        else:
            match = match_budget(sweep(method, space), predict, measure, budget.bounds_ms()[1])
            chosen, probes = match.chosen, match.probes
        before, after = fine_tune(chosen.model, method)
        records[method] = describe(chosen, before, after, count_params(chosen.model), {"probes": probes})
        finals[method] = chosen.model
        log.info("%s: %s, %.4f ms (%.3f of the budget), test acc %.4f -> %.4f", method, chosen.label,
                 chosen.measured_ms, chosen.measured_ms / budget.target_ms, before, after)
    return records, finals


def judge(finals: dict[str, nn.Module], budget: Budget, reading: BudgetReading) -> dict[str, dict[str, Any]]:
    """Every final network measured in a pair with the budget's reference (``reading``; the median
    over its readings), the pairs one after another, as each network was chosen; each judged by
    ``budget.verdict`` on its reading (the protocol's *same verdict*)."""
    out = {}
    for name, model in finals.items():
        pairs = reading.pairs(model)
        values = reading.scaled(pairs)
        ms = statistics.median(values)
        status, verdict = budget.verdict(ms)
        out[name] = {"measured_ms": ms, "measured_spread": statistics.median(s.spread for s, _ in pairs),
                     "measured_over_budget": ms / budget.target_ms, "paired_with": reading.reference,
                     "readings_over_budget": [v / budget.target_ms for v in values],
                     "in_band": status == "in_band", "budget_status": status, "budget_verdict": verdict}
    return out


def versus_ours(result: dict[str, Any], methods: Sequence[str]) -> dict[str, Any]:
    """``ours_minus_<method>`` (test accuracy) for every method, and ``at_equal_latency``: whether
    ours and that method were both at the budget (in band or within) in the final readings; where
    not, the difference compares networks of different latency."""
    at = ("in_band", "within")
    ours = result["ours"]
    out: dict[str, Any] = {f"ours_minus_{m}": ours["test_acc"] - result[m]["test_acc"] for m in methods}
    out["at_equal_latency"] = {m: ours["budget_status"] in at and result[m]["budget_status"] in at for m in methods}
    return out


def protocol_record(budget: Budget, epochs: int, loss: str, seed: int, passes: int, span_s: float,
                    readings: int = 1) -> dict[str, Any]:
    """compare.json's ``protocol``: what every method was held to."""
    return {"budget_ms": budget.target_ms, "band": list(budget.band_effective), "budget": budget.to_dict(),
            "epochs": epochs, "loss": loss, "seed": seed,
            "measured": f"each network in a pair with the student, interleaved windows: the fastest of {passes} over "
                        f"at least {span_s:g} s; the median ratio to the student over {readings} such reading(s)",
            "verdict": "Budget.verdict on the final paired readings, every method alike (pipeline/prune/budget.py)"}
