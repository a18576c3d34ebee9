"""Soft channel pruning (SCP, Kang & Han, ICML 2020) extended with a latency lookup table: the
network with soft masks, and the budget penalty that drives its expected latency to the target.

* Every prunable group (``pipeline.prune.groups``) gets a per-channel *keep probability*:

  - ``scp`` groups: from BatchNorm's own parameters, q_c = P(BN output < eps) =
    Phi((eps - beta_c) / |gamma_c|) (the probability that the ReLU zeroes the channel), sharpened
    to a pruning probability pi_c = sigmoid(k (q_c - c0)); keep_c = 1 - pi_c. No extra
    parameters. With several such BatchNorms in a group, q_c is their maximum (a channel dead at
    one of them is dead).
  - ``gate`` and ``block`` groups: a learnable logit per channel (per block),
    keep_c = sigmoid(logit_c), initialised near 1 (``gate_init``).

* Training draws a 2-class Gumbel-softmax (Concrete) mask m_c from (keep_c, 1 - keep_c) at
  temperature ``mask_tau`` per sample and channel, and multiplies it into the output of every
  output-side BatchNorm of the group (or the convolution itself when no BatchNorm follows).
  For a ReLU after the BatchNorm that is the same as masking the ReLU output (m >= 0 commutes
  with ReLU); gradients reach gamma/beta (scp) or the logits (gate) through the mask.
* Budget (``BudgetPenalty``): expected kept channels E[c_g] = sum_c keep_c feed the
  differentiable lookup-table predictor; the loss adds lambda * (E[latency] / target - 1), with
  lambda >= 0 updated by dual ascent after every step, lambda += (dual_lr / steps per epoch) *
  (E[latency] / target - 1), so the expected latency is driven to the target and released below
  it, at a rate per epoch that does not depend on the dataset's size. The sharpened sigmoid has a
  derivative of ~1e-8 for a healthy channel, so the budget term's gradient is taken straight
  through the sharpening (through 1 - q_c, whose derivative is the normal density): its value is
  the sharpened expectation, its gradient ranks channels by how close BatchNorm is to switching
  them off. The SCP sparsity regulariser sum_c (beta_c + 2|gamma_c|) is optional (``sparsity``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from pipeline.prune.groups import PruneGroup, inner_groups

LEARNED = ("gate", "block")  # kinds whose keep probability is a learned logit


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
            _key(g.name): nn.Parameter(torch.full((g.size,), init)) for g in self.groups if g.kind in LEARNED})
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
        if g.kind in LEARNED:
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
            return {g.name: (self.keep_prob(g) if g.kind in LEARNED else 1 - self.deactivation(g)).float().cpu()
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
