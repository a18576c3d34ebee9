"""Channel and block pruning under a latency budget measured on the target.

Two rankings of what to cut share the width allocation and the closed loop below:

* ``taylor_importance`` (the stage's default, ``method: taylor``): first-order Taylor importance
  of every channel and block in the trained student (HALP's criterion); the widths are decided at
  once and every epoch trains the decided network.
* Soft channel pruning (SCP, Kang & Han, ICML 2020) extended with a latency lookup table
  (``method: scp``), the rest of this docstring:

* Every channel group (``pipeline.slim``) gets a per-channel *keep probability*.
  - ``scp`` groups, whose every output-side BatchNorm feeds a ReLU directly (e.g. the inner
    channels of a residual block, MobileNetV2 expansions): derived from BatchNorm's own
    parameters, q_c = P(BN output < eps) = Phi((eps - beta_c) / |gamma_c|) (the probability that
    the ReLU zeroes the channel), sharpened to a pruning probability
    pi_c = sigmoid(k (q_c - c0)); keep_c = 1 - pi_c. No extra parameters. With several such
    BatchNorms in a group, q_c is their maximum (a channel dead at one of them is dead).
  - ``gate`` groups: any other group, typically channels coupled through residual additions,
    where a BatchNorm is summed with other branches before the ReLU and no single (gamma, beta)
    tells whether the channel is used. Those get a learnable logit per channel,
    keep_c = sigmoid(logit_c), initialised near 1 (``gate_init``). ``coupled: keep`` leaves them
    at full width instead (SCP's own choice: the identity path keeps its width).
* ``block`` groups (``depth``): a removable residual block (``pipeline.slim.residual_blocks``),
  one learnable keep logit, its mask multiplying the residual branch's last BatchNorm (0: the
  block computes the identity). The latency table prices it from its own units.
* Training draws a 2-class Gumbel-softmax (Concrete) mask m_c from (keep_c, 1 - keep_c) at
  temperature ``mask_tau`` per sample and channel, and multiplies it into the output of every
  output-side BatchNorm of the group (or the convolution itself when no BatchNorm follows).
  For a ReLU after the BatchNorm that is the same as masking the ReLU output (m >= 0 commutes
  with ReLU); gradients reach gamma/beta (scp) or the logits (gate) through the mask.
* Budget: expected kept channels E[c_g] = sum_c keep_c feed the differentiable lookup-table
  predictor; the loss adds lambda * (E[latency] / budget - 1), with lambda >= 0 updated by dual
  ascent after every step, lambda += (dual_lr / steps per epoch) * (E[latency] / budget - 1), so
  the expected latency is driven to the budget and released below it, at a rate per epoch that
  does not depend on the dataset's size. With ``allocation: threshold``, after every epoch the
  network as it would be hardened is measured on the target and the penalty rescaled by measured
  / expected (calibration); training aims at the middle of the closed loop's band. The sharpened sigmoid has a derivative of ~1e-8
  for a healthy channel, so the budget term's gradient is taken straight through the
  sharpening (through 1 - q_c, whose derivative is the normal density): its value is the
  sharpened expectation, its gradient ranks channels by how close BatchNorm is to switching them
  off. The SCP sparsity regulariser sum_c (beta_c + 2|gamma_c|) is optional (``sparsity``).
* Widths (``allocate_widths``, the default ``allocation: knapsack``): from full width, the cut
  with the least channel importance lost per predicted ms saved, until the prediction is at the
  target (HALP's latency-aware knapsack, greedy, on the measured table). ``harden`` (``allocation:
  threshold``, SCP's rule): per group the count of channels with keep > 0.5. Either way widths are
  on the latency table's lattice (multiples of the measured staircase step, and the full width),
  never zero; the channels kept are the most important ones.
* Closed loop (``closed_loop``): the hard network is slimmed and measured end to end on the
  target; over budget, the group whose next smaller width costs the least validation loss per
  millisecond saved shrinks; under ``band[0]`` of the budget, the group whose missing channels
  are most probable grows. Moves expected to jump over the band are taken last (expected
  landing: the table's prediction rescaled by the current measured / predicted ratio). Every iteration is recorded. It stops inside the band, or
  says why it cannot (smallest network over budget, widths oscillating across the band,
  iteration cap), keeping the best network under budget.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from pipeline.errors import SlimdeployError
from pipeline.latency.table import grid_values
from pipeline.slim import BLOCK, ChannelGraph, groups_inside_blocks, is_block, residual_blocks, tensor_consumers

log = logging.getLogger(__name__)

_RELUS = (nn.ReLU, nn.ReLU6)
_LEARNED = ("gate", "block")  # kinds whose keep probability is a learned logit


class BudgetError(SlimdeployError):
    """The latency budget cannot be met (before training, or after the closed loop)."""


@dataclass(frozen=True)
class PruneGroup:
    """A channel group and how its keep probability is obtained.

    ``bns``: output-side BatchNorms (their gamma/beta give the scp probability);
    ``sites``: modules whose output the soft mask multiplies."""

    name: str
    size: int
    kind: Literal["scp", "gate", "fixed", "block"]
    bns: tuple[str, ...]
    sites: tuple[str, ...]


def prune_groups(model: nn.Module, example: torch.Tensor, coupled: Literal["gate", "keep"] = "gate",
                 graph: ChannelGraph | None = None, depth: bool = False) -> list[PruneGroup]:
    """Classify the channel groups of ``model`` (see module docstring); with ``depth``, one
    ``block`` group per removable residual block after them."""
    graph = graph or ChannelGraph(model, example)
    modules = dict(model.named_modules())
    consumers = tensor_consumers(model, example)
    out = []
    for g in graph.groups:
        outs = [n for n, kind in g.members if kind == "out" and n in modules]
        bns = [n for n in outs if isinstance(modules[n], nn.BatchNorm2d)]
        sites = list(bns)
        for n in outs:  # a conv/linear whose output does not go through one of the group's BNs
            if isinstance(modules[n], (nn.Conv2d, nn.Linear)) and not (consumers.get(n, set()) & set(bns)):
                sites.append(n)
        bn_relu = bool(bns) and all(
            consumers.get(b) and all(isinstance(modules[c], _RELUS) for c in consumers[b]) for b in bns)
        if bn_relu and sites == bns:
            kind = "scp"
        else:
            kind = "gate" if coupled == "gate" else "fixed"
        out.append(PruneGroup(g.name, g.size, kind, tuple(bns), tuple(sites)))
    if depth:
        out += [PruneGroup(BLOCK + b, 1, "block", (bn,), (bn,)) for b, bn in residual_blocks(model).items()]
    return out


def allowed_for(groups: list[PruneGroup], multiple: int, min_fraction: float) -> dict[str, list[int]]:
    """The widths every prunable group may take: the latency table's lattice for channel groups,
    [0, 1] (removed, kept) for blocks. Fixed groups are absent (full width)."""
    return {g.name: [0, 1] if g.kind == "block" else allowed_widths(g.size, multiple, min_fraction)
            for g in groups if g.kind != "fixed"}


def blocks_only(allowed: Mapping[str, list[int]]) -> dict[str, list[int]]:
    """``prune.channels: false``: every channel group fixed at its full width, blocks still [0, 1],
    so the knapsack and the closed loop can only remove whole blocks."""
    return {g: list(a) if is_block(g) else [max(a)] for g, a in allowed.items()}


def deactivation_prob(gamma: torch.Tensor, beta: torch.Tensor, eps: float = 0.05) -> torch.Tensor:
    """q = P(gamma * z + beta < eps), z ~ N(0, 1): how often BatchNorm then ReLU switches a
    channel off."""
    return torch.special.ndtr((eps - beta) / gamma.abs().clamp_min(1e-8))


def gumbel_keep_mask(keep: torch.Tensor, shape: tuple[int, ...], tau: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Relaxed Bernoulli (2-class Gumbel-softmax) sample of the "keep" coordinate, ``shape``
    broadcasting over ``keep`` (C,) as (..., C, 1, 1) for feature maps."""
    u = torch.rand(shape, generator=generator, device=keep.device, dtype=keep.dtype).clamp(1e-6, 1 - 1e-6)
    logistic = torch.log(u) - torch.log1p(-u)  # difference of two Gumbel(0, 1) draws
    k = keep.clamp(1e-6, 1 - 1e-6)
    return torch.sigmoid((torch.log(k) - torch.log1p(-k) + logistic) / tau)


class SoftMaskedNet(nn.Module):
    """The network being pruned, with its soft masks.

    ``forward`` runs ``net`` with the masks applied by forward hooks: Gumbel soft masks in
    training; in eval the ``fixed`` masks when set, else the *expected* mask (the keep
    probability: what the network computes on average, which a validation figure should show,
    rather than a hard cut that can empty a group mid-search). Mask arithmetic is float32 even
    under bf16 autocast (1 - 1e-6 rounds to 1 in bf16 and the Gumbel logits become infinite).
    Holds the gate logits, the dual multiplier ``lam`` and the budget calibration as buffers, so
    all are in ``state_dict`` (resume).
    """

    def __init__(self, net: nn.Module, groups: list[PruneGroup], eps: float = 0.05, sharpness: float = 20.0,
                 threshold: float = 0.95, mask_tau: float = 0.5, gate_init: float = 0.95) -> None:
        super().__init__()
        self.net = net
        self.groups = [g for g in groups if g.kind != "fixed"]  # fixed groups keep every channel
        self.eps, self.sharpness, self.threshold, self.mask_tau = eps, sharpness, threshold, mask_tau
        init = math.log(gate_init / (1 - gate_init))
        self.gates = nn.ParameterDict({
            _key(g.name): nn.Parameter(torch.full((g.size,), init)) for g in self.groups if g.kind in _LEARNED})
        self.register_buffer("lam", torch.zeros(()))
        self.register_buffer("budget_scale", torch.ones(()))  # BudgetPenalty's calibration, resumed with the weights
        self.fixed: dict[str, torch.Tensor] | None = None
        self._modules_by_name = dict(net.named_modules())
        self._cache: dict[str, torch.Tensor] = {}
        self._site_groups: dict[str, list[PruneGroup]] = {}  # a block's last BN is also a site of its stream group
        for g in self.groups:
            for s in g.sites:
                self._site_groups.setdefault(s, []).append(g)
        for s in self._site_groups:
            self._modules_by_name[s].register_forward_hook(self._hook(s))

    def _hook(self, site: str):  # noqa: ANN202
        def hook(_mod: nn.Module, _inp: Any, output: torch.Tensor) -> torch.Tensor:
            out = output.float()
            for g in self._site_groups[site]:
                if g.name not in self._cache:
                    self._cache[g.name] = self._mask(g, output)
                out = out * self._cache[g.name]
            return out.to(output.dtype)
        return hook

    def _mask(self, g: PruneGroup, output: torch.Tensor) -> torch.Tensor:
        """The float32 mask for ``output`` (N, C[, H, W]) of group ``g``."""
        view = (1, g.size, 1, 1) if output.ndim == 4 else (1, g.size)
        if self.fixed is not None and g.name in self.fixed:
            fixed = self.fixed[g.name].to(output.device, torch.float32)
            if fixed.ndim == 2:  # one mask per sample (N, C): per-sample gradients in one backward pass
                view = (fixed.shape[0], *view[1:])
            return fixed.view(view)
        keep = self.keep_prob(g).float()
        if not self.training:
            return keep.view(view)
        shape = (output.shape[0], g.size, 1, 1) if output.ndim == 4 else (output.shape[0], g.size)
        return gumbel_keep_mask(keep.view(view), shape, self.mask_tau)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._cache = {}
        try:
            return self.net(x)
        finally:
            self._cache = {}

    def deactivation(self, g: PruneGroup) -> torch.Tensor:
        """q_c of an scp group (max over its BatchNorms)."""
        qs = [deactivation_prob(self._modules_by_name[b].weight, self._modules_by_name[b].bias, self.eps)
              for b in g.bns]
        return torch.stack(qs).amax(0)

    def keep_prob(self, g: PruneGroup, straight_through: bool = False) -> torch.Tensor:
        """Per-channel keep probability (float32). ``straight_through``: the value of the sharpened
        probability with the gradient of 1 - q (scp groups only; see module docstring)."""
        if g.kind in _LEARNED:
            return torch.sigmoid(self.gates[_key(g.name)].float())
        q = self.deactivation(g).float()
        keep = 1 - torch.sigmoid(self.sharpness * (q - self.threshold))
        if straight_through:
            keep = keep.detach() + ((1 - q) - (1 - q).detach())
        return keep

    def keep_probs(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {g.name: self.keep_prob(g).detach().float().cpu() for g in self.groups}

    def importance(self) -> dict[str, torch.Tensor]:
        """Per-channel importance for width allocation, comparable across groups: the probability
        that the channel is in use, without the sharpening (which saturates at 0 or 1): 1 - q for
        scp groups (BatchNorm then ReLU passes it), the keep probability for gated groups."""
        with torch.no_grad():
            return {g.name: (self.keep_prob(g) if g.kind in _LEARNED else 1 - self.deactivation(g)).float().cpu()
                    for g in self.groups}

    def allocation_values(self) -> dict[str, torch.Tensor]:
        """``importance`` for width allocation, a block valued like the channels it takes away:
        its keep probability times the summed importance of the channel groups inside it (the
        block's inner widths)."""
        imp = self.importance()
        out = dict(imp)
        inside = inner_groups(self.groups)
        for g in self.groups:
            if g.kind == "block":
                inner = [h for h, b in inside.items() if b == g.name]
                out[g.name] = imp[g.name] * max(1.0, sum(float(imp[h].sum()) for h in inner))
        return out

    def expected_widths(self, straight_through: bool = True) -> dict[str, torch.Tensor]:
        return {g.name: self.keep_prob(g, straight_through).sum() for g in self.groups}

    def sparsity(self) -> torch.Tensor:
        """SCP's regulariser sum_c (beta_c + 2 |gamma_c|) over the scp groups' BatchNorms."""
        total = self.lam.new_zeros(())
        for g in self.groups:
            if g.kind == "scp":
                for b in g.bns:
                    bn = self._modules_by_name[b]
                    total = total + (bn.bias + 2 * bn.weight.abs()).sum()
        return total


def taylor_importance(net: SoftMaskedNet, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                      criterion: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                      per_sample: bool = False) -> dict[str, torch.Tensor]:
    """First-order Taylor importance of every channel and block: a mask m = 1 multiplies each
    group's outputs (the block's residual branch for a block), and a channel's importance is the
    mean squared first-order change of the loss when it is removed, (dL/dm_c)^2.

    By default the mean over ``batches`` of the squared batch gradient (Molchanov et al., CVPR
    2019, as HALP uses it). ``per_sample``: the mean over the samples of each one's squared
    gradient, the diagonal empirical Fisher of the mask (Theis et al. 2018; Group Fisher pruning,
    Liu et al., ICML 2021); each sample gets its own mask, so one backward pass per batch gives
    every sample's gradient. In a batch gradient the samples' gradients can cancel, which matters
    where the student's loss is near zero (digits), but on the measured benchmarks the per-sample
    form did not train to a better network (docs/BENCHMARKS.md, section 23).

    Every group, coupled or not, and every block is on that one scale, so the knapsack compares
    them directly. BatchNorm runs on its running statistics (a sample's loss depends on its own
    mask only) and nothing in ``net`` changes. ``batches``: (normalised inputs, labels) on the
    network's device; ``criterion(logits, labels, inputs)`` is the training loss, a mean over the
    batch."""
    was = net.training
    net.eval()
    device = next(net.parameters()).device
    total = {g.name: torch.zeros(g.size, device=device) for g in net.groups}  # on the device: one transfer
    seen = 0
    try:
        for x, y in batches:
            n = len(x) if per_sample else 1
            ones = {g.name: torch.ones((len(x), g.size) if per_sample else g.size, device=device,
                                       requires_grad=True) for g in net.groups}
            net.fixed = ones
            grads = torch.autograd.grad(criterion(net(x), y, x), list(ones.values()))
            for g, grad in zip(ones, grads):
                # the batch mean's gradient is each sample's over n
                sq = (grad.detach().float() * n) ** 2
                total[g] += sq.sum(0) if per_sample else sq
            seen += n
    finally:
        net.fixed = None
        net.train(was)
    if not seen:
        raise ValueError("taylor_importance: no batches")
    return {g: (t / seen).cpu() for g, t in total.items()}


def normalize_importance(importance: Mapping[str, torch.Tensor], groups: list[PruneGroup],
                         how: Literal["none", "group", "sqrt"] = "group") -> dict[str, torch.Tensor]:
    """``prune.taylor_normalize``: ``none`` leaves the importance as it is; ``sqrt`` takes its square
    root, |dL/dm| as an RMS (the scale Molchanov et al., ICLR 2017, rank by); ``group`` divides
    each channel group's importance by its own mean, so every group's channels average 1 and
    the knapsack compares groups by latency saved and by how the importance is spread inside each
    (Molchanov et al., ICLR 2017, normalise per layer; Torch-Pruning's ``normalizer="mean"``). A
    block is divided by the mean of the normalisers of the channel groups inside it, so it stays
    on the scale of its own channels (a block with none inside: the mean over all groups). A group
    whose importance is all zero stays zero."""
    if how == "none":
        return dict(importance)
    if how == "sqrt":
        return {g: v.sqrt() for g, v in importance.items()}
    inside = inner_groups(groups)
    scale = {g: float(v.mean()) for g, v in importance.items() if not is_block(g)}
    overall = sum(scale.values()) / len(scale) if scale else 0.0
    out = {}
    for g, v in importance.items():
        if is_block(g):
            inner = [scale[c] for c, b in inside.items() if b == g and c in scale]
            s = sum(inner) / len(inner) if inner else overall
        else:
            s = scale[g]
        out[g] = v / s if s > 0 else v.clone()
    return out


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys may not contain dots


class BudgetPenalty:
    """lambda * (scale * E[latency] / target - 1), dual ascent on lambda (stored in ``net.lam``).

    ``scale`` calibrates the penalty against the target: the stage sets it after every epoch to
    the measured latency of the network hardened at that point over the prediction at the
    expected widths (1 until then), which folds in both the table's error and the gap between
    expected (soft) and hardened (rounded) widths.

    The dual step is ``dual_lr / steps_per_epoch`` per optimiser step, so ``dual_lr`` is the
    multiplier's rise per *epoch* of relative excess: the same on 1,000 images as on 50,000 (per
    step, the CIFAR-10 preset's multiplier reached 72 within its first epoch)."""

    def __init__(self, net: SoftMaskedNet, predictor: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
                 target_ms: float, dual_lr: float, sparsity: float = 0.0, steps_per_epoch: int = 1) -> None:
        self.net, self.predictor, self.target, self.dual_lr, self.sparsity = net, predictor, target_ms, dual_lr, sparsity
        self.step = dual_lr / max(1, steps_per_epoch)
        self.last_expected_ms = float("nan")

    @property
    def scale(self) -> float:
        """Stored in the network's ``budget_scale`` buffer, so a resumed run continues with it."""
        return float(self.net.budget_scale)

    @scale.setter
    def scale(self, value: float) -> None:
        self.net.budget_scale.fill_(value)

    def __call__(self) -> torch.Tensor:
        widths = {g: w.to("cpu", torch.float64) for g, w in self.net.expected_widths(straight_through=True).items()}
        expected = self.scale * self.predictor(widths)
        excess = expected / self.target - 1
        loss = (float(self.net.lam) * excess).to(self.net.lam.device, torch.float32)
        if self.sparsity:
            loss = loss + self.sparsity * self.net.sparsity()
        with torch.no_grad():  # dual ascent: lambda grows while over budget, shrinks (to 0) under it
            self.last_expected_ms = float(expected)
            self.net.lam.add_(self.step * float(excess)).clamp_(min=0.0)
        return loss


# ---------------------------------------------------------------------------------------------
# Hard masks


def inner_groups(groups: list[PruneGroup]) -> dict[str, str]:
    """Channel group -> the block (``"block:<name>"``) holding all its output-side BatchNorms."""
    return groups_inside_blocks({g.name: g.bns for g in groups if g.kind != "block"},
                                [g.name[len(BLOCK):] for g in groups if g.kind == "block"])


def _live(g: str, widths: Mapping[str, int], inside: Mapping[str, str]) -> bool:
    """False for a channel group inside a removed block (its width changes nothing)."""
    return not (g in inside and widths.get(inside[g], 1) == 0)


def allocate_widths(importance: Mapping[str, torch.Tensor], allowed: Mapping[str, list[int]],
                    predict: Callable[[dict[str, int]], float], target_ms: float,
                    inside: Mapping[str, str] | None = None) -> tuple[dict[str, int], float]:
    """Latency-aware width allocation, a greedy knapsack (HALP's idea: remove what costs the least
    importance per millisecond saved). From full widths, every move shrinks one group to any
    smaller width of its lattice; the move with the least importance lost per predicted ms saved
    is taken, until the prediction is at most ``target_ms``. Keeping w channels of a group is worth
    the sum of its w largest channel importances. Moves predicted to save nothing are never taken
    (on the staircase a narrower layer can cost the same). Returns (widths, predicted ms); when the
    target cannot be predicted reachable, where the greedy stopped: every cut that saves anything
    taken (a group whose cuts save nothing keeps its width). ``inside`` (``inner_groups``): groups
    inside a removed block are left alone (never cut further, never grown back)."""
    inside = inside or {}
    widths = {g: max(a) for g, a in allowed.items()}
    kept_value = {g: torch.cat([torch.zeros(1), importance[g].sort(descending=True).values.cumsum(0)]).tolist()
                  for g in allowed}
    current = predict(widths)
    while current > target_ms:
        best: tuple[float, str, int, float] | None = None
        for g, a in allowed.items():
            if not _live(g, widths, inside):
                continue
            for w in (x for x in a if x < widths[g]):
                ms = predict({**widths, g: w})
                saved = current - ms
                if saved <= 1e-12:
                    continue
                per_ms = (kept_value[g][widths[g]] - kept_value[g][w]) / saved
                # among equally cheap moves prefer the one that saves more (fewer, larger cuts)
                if best is None or (per_ms, -saved) < (best[0], -(current - best[3])):
                    best = (per_ms, g, w, ms)
        if best is None:
            return widths, current
        _, g, w, current = best
        widths[g] = w
    # the last cut may overshoot (lattice steps are coarse): give back what fits, the most
    # importance per ms added first, while the prediction stays within the target
    while True:
        best = None
        for g, a in allowed.items():
            if not _live(g, widths, inside):
                continue
            for w in (x for x in a if x > widths[g]):
                ms = predict({**widths, g: w})
                if ms > target_ms:
                    continue
                gain = (kept_value[g][w] - kept_value[g][widths[g]]) / max(ms - current, 1e-12)
                if best is None or gain > best[0]:
                    best = (gain, g, w, ms)
        if best is None:
            return widths, current
        _, g, w, current = best
        widths[g] = w


def masks_for_widths(keep: Mapping[str, torch.Tensor], widths: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """The ``widths[g]`` most probable channels of every group."""
    return {g: top_mask(keep[g], widths[g]) for g in widths}


def effective_band(band: tuple[float, float], noise: float) -> tuple[float, float]:
    """The closed loop's target band, its top lowered by the measured ``noise`` (relative), so a
    network it accepts stays under the budget when measured again; the band keeps at least 0.05
    of width (its bottom moves down if it must)."""
    hi = band[1] * (1 - noise)
    return min(band[0], hi - 0.05), hi


def allowed_widths(size: int, multiple: int, min_fraction: float) -> list[int]:
    """Widths a group may be pruned to: the latency table's lattice (never empty, never 0)."""
    return grid_values(size, multiple, min_fraction)


def nearest_allowed(count: int, allowed: list[int]) -> int:
    """The allowed width nearest to ``count`` (ties go to the larger one)."""
    return min(allowed, key=lambda a: (abs(a - count), -a))


def top_mask(keep: torch.Tensor, n: int) -> torch.Tensor:
    """Boolean mask of the ``n`` most probable channels (ties broken by index, deterministic)."""
    order = sorted(range(keep.numel()), key=lambda i: (-float(keep[i]), i))
    m = torch.zeros(keep.numel(), dtype=torch.bool)
    m[order[:n]] = True
    return m


def harden(keep_probs: Mapping[str, torch.Tensor], allowed: Mapping[str, list[int]]) -> dict[str, torch.Tensor]:
    """Per group: count of keep > 0.5, rounded to the nearest allowed width, the most probable
    channels kept. Groups missing from ``allowed`` keep their full width."""
    out = {}
    for name, keep in keep_probs.items():
        n = int((keep > 0.5).sum())
        width = nearest_allowed(n, allowed[name]) if name in allowed else keep.numel()
        out[name] = top_mask(keep, width if is_block(name) else max(1, width))  # a block may go, a group not
    return out


def widths_of(masks: Mapping[str, torch.Tensor]) -> dict[str, int]:
    return {g: int(m.sum()) for g, m in masks.items()}


# ---------------------------------------------------------------------------------------------
# Closed loop


@dataclass
class LoopResult:
    masks: dict[str, torch.Tensor]
    measured_ms: float
    status: Literal["in_band", "below_band", "unreachable", "full"]
    reason: str
    history: list[dict[str, Any]] = field(default_factory=list)


def _step(masks: dict[str, torch.Tensor], keep: Mapping[str, torch.Tensor], group: str, width: int) -> dict[str, torch.Tensor]:
    new = dict(masks)
    new[group] = top_mask(keep[group], width)
    return new


def closed_loop(
    masks: Mapping[str, torch.Tensor],
    keep_probs: Mapping[str, torch.Tensor],
    allowed: Mapping[str, list[int]],
    budget_ms: float,
    measure: Callable[[dict[str, torch.Tensor]], float],
    predict: Callable[[dict[str, int]], float],
    cost: Callable[[dict[str, torch.Tensor]], float],
    band: tuple[float, float] = (0.9, 1.0),
    max_iterations: int = 20,
    inside: Mapping[str, str] | None = None,
) -> LoopResult:
    """Measure, adjust, measure again until ``band[0] * budget <= measured <= band[1] * budget``.

    ``measure(masks)``: end-to-end latency (ms) of the slimmed network on the target.
    ``predict(widths)``: the table's prediction (ms), to rank candidate steps.
    ``cost(masks)``: validation loss of the hard-masked network (lower is better).
    Only groups in ``allowed`` change. Terminates: every iteration either reaches the band,
    stops, or moves to a width configuration not visited before, and at most ``max_iterations``
    measurements are made. ``status``: in_band; below_band (the band could not be hit, the best
    network under budget is returned, ``reason`` says why); full (nothing to prune: the unpruned
    network is under the band); unreachable (no measured network met the budget). ``inside``
    (``inner_groups``): a group inside a removed block is not moved (it changes nothing).
    """
    inside = inside or {}
    state = {g: m.clone() for g, m in masks.items()}
    lo, hi = band[0] * budget_ms, band[1] * budget_ms
    history: list[dict[str, Any]] = []
    seen: set[tuple[tuple[str, int], ...]] = set()
    feasible: list[tuple[float, float, dict[str, torch.Tensor]]] = []  # (cost, -ms, masks) under budget
    status, reason = "max_iterations", f"no width configuration in the band after {max_iterations} measurements"
    last_ms = float("nan")
    for it in range(max_iterations):
        widths = widths_of(state)
        key = tuple(sorted(widths.items()))
        ms = measure(state)
        last_ms = ms
        c = cost(state)
        rec = {"iteration": it, "widths": widths, "predicted_ms": predict(widths), "measured_ms": ms,
               "budget_ms": budget_ms, "ratio": ms / budget_ms, "val_loss": c, "action": ""}
        history.append(rec)
        if ms <= hi:
            feasible.append((c, -ms, state))
        if lo <= ms <= hi:
            status, reason = "in_band", f"measured {ms:.4f} ms is {ms / budget_ms:.3f} of the budget"
            break
        if key in seen:
            status = "oscillating"
            reason = (f"widths returned to a configuration already measured: the smallest width steps "
                      f"available move latency across the [{band[0]:.2f}, {band[1]:.2f}] band")
            break
        seen.add(key)
        # Predictions rank the moves, rescaled by this state's measured / predicted ratio so that
        # a move is judged by where it should land on the target.
        scale = ms / rec["predicted_ms"] if rec["predicted_ms"] > 0 else 1.0
        if ms > hi:
            options = []
            mid = (lo + hi) / 2
            for g, a in allowed.items():
                smaller = [w for w in a if w < widths[g]]
                if not smaller or not _live(g, widths, inside):
                    continue
                landing_of = {w: scale * predict({**widths, g: w}) for w in smaller}
                # the next smaller width, and the one predicted to land nearest the band's middle (one
                # measurement instead of many small steps on a fine lattice)
                for w in {max(smaller), min(smaller, key=lambda v: (abs(landing_of[v] - mid), -v))}:
                    cand = _step(state, keep_probs, g, w)
                    landing = landing_of[w]
                    saving = ms - landing  # on the staircase a narrower layer can be predicted no faster
                    per_ms = (cost(cand) - c) / saving if saving > 0 else float("nan")
                    # prefer moves predicted to land in the band, then moves still over it, then those
                    # overshooting below it (the least); among them the cheapest in validation loss per
                    # ms saved; moves predicted to save nothing last
                    where = 0 if landing <= hi and landing >= lo else (1 if landing > hi else 2)
                    options.append((saving <= 0, where, per_ms if where < 2 and saving > 0 else -landing,
                                    g, -w, cand, per_ms))
            if not options:
                status = "unreachable"
                reason = (f"every prunable group is at its smallest allowed width and the network measures "
                          f"{ms:.4f} ms > budget {budget_ms:.4f} ms")
                break
            *_, g, _w, state, per_ms = min(options, key=lambda o: o[:5])
            why = "predicted to save nothing" if math.isnan(per_ms) else f"val loss {per_ms:+.3g} per ms saved"
            rec["action"] = f"shrink {g} to {widths_of(state)[g]} ({why})"
        else:
            options = []
            for g, a in allowed.items():
                larger = [w for w in a if w > widths[g]]
                if not larger or not _live(g, widths, inside):
                    continue
                cand = _step(state, keep_probs, g, min(larger))
                landing = scale * predict(widths_of(cand))
                prob = float(keep_probs[g][cand[g] & ~state[g]].mean())
                # prefer moves expected to stay under budget; then the most probable channels
                options.append((landing > hi, -prob if landing <= hi else landing, g, cand, prob))
            if not options:
                status, reason = "full", "every group is at full width: the unpruned network is already under the band"
                break
            _, _, g, state, prob = min(options, key=lambda o: (o[0], o[1], o[2]))
            rec["action"] = f"grow {g} to {widths_of(state)[g]} (mean keep probability of added channels {prob:.3f})"
    if status == "in_band":
        return LoopResult(state, last_ms, status, reason, history)
    if not feasible:  # the caller decides (the prune stage writes the record, then fails)
        return LoopResult(state, last_ms, "unreachable",
                          f"{reason}; no measured network met the budget {budget_ms:.4f} ms", history)
    _c, neg_ms, best = min(feasible, key=lambda f: (f[0], f[1]))
    if status == "full":
        return LoopResult(best, -neg_ms, "full", reason, history)
    return LoopResult(best, -neg_ms, "below_band",
                      f"{reason}; kept the measured network under budget with the lowest validation loss", history)
