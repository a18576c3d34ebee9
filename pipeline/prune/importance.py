"""Pruning criteria: how much every channel (and removable block) of the prunable groups is worth
keeping. A criterion is one ``Importance`` subclass; the knapsack (``allocate_widths``) and the
closed loop take its ``Ranking`` and never look inside it.

* ``TaylorImportance`` (``prune.method: taylor``, the default): first-order Taylor importance of
  every channel and block in the trained student (HALP's criterion).
* ``SoftMaskImportance`` (``prune.method: scp``): the soft-mask search's own probabilities
  (``SoftMaskedNet.importance``), a block valued like the channels it takes away.
* ``L1Importance``: the L1 norm of each group's root filters (magnitude pruning; compare's
  uniform baseline keeps its channels by it).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from pipeline.blocks import is_block
from pipeline.data import PreparedData, normalize
from pipeline.prune.groups import PruneGroup, inner_groups
from pipeline.prune.soft import SoftMaskedNet
from pipeline.train import Criterion

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranking:
    """``keep``: per group, which channels it keeps first (``top_mask`` keeps the highest);
    ``values``: what the knapsack allocates widths by, comparable across groups (often the same)."""

    keep: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]


class Importance(ABC):
    """A pruning criterion. ``scores(net)``: group name -> (size,) float32 on the CPU, higher is
    more worth keeping, on one scale across the prunable groups of ``net`` (its ``groups``)."""

    @abstractmethod
    def scores(self, net: SoftMaskedNet) -> dict[str, torch.Tensor]:
        ...

    def rank(self, net: SoftMaskedNet) -> Ranking:
        scores = self.scores(net)
        return Ranking(scores, scores)


class SoftMaskImportance(Importance):
    """The SCP search's probabilities: a channel is kept first by the probability that it is in use
    (unsaturated, so without the ties of the sharpened keep probability); the knapsack values a
    block like the channels it takes away (``SoftMaskedNet.allocation_values``)."""

    def scores(self, net: SoftMaskedNet) -> dict[str, torch.Tensor]:
        return net.importance()

    def rank(self, net: SoftMaskedNet) -> Ranking:
        return Ranking(net.importance(), net.allocation_values())


class TaylorImportance(Importance):
    """``taylor_importance`` over the batches ``batches()`` yields, on ``device``, then
    ``normalize_importance`` with ``normalize`` (``groups``: every group of the network, fixed
    ones included). ``net`` is moved to ``device`` and back to the CPU, in eval mode."""

    def __init__(self, batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]], criterion: Criterion,
                 groups: list[PruneGroup], device: torch.device, per_sample: bool = False,
                 normalize: Literal["none", "group", "sqrt"] = "none", source: str = "the given batches") -> None:
        self.batches, self.criterion, self.groups, self.device = batches, criterion, groups, device
        self.per_sample, self.normalize, self.source = per_sample, normalize, source

    def scores(self, net: SoftMaskedNet) -> dict[str, torch.Tensor]:
        try:
            imp = taylor_importance(net.to(self.device), self.batches(), self.criterion, self.per_sample)
        finally:
            net.to(torch.device("cpu")).eval()
        log.info("Taylor importance of %d groups and blocks from %s", len(imp), self.source)
        return normalize_importance(imp, self.groups, self.normalize)


class L1Importance(Importance):
    """The L1 norm of each channel group's root filters (the group is named by its root layer);
    a block has no filters of its own and is not scored."""

    def scores(self, net: SoftMaskedNet) -> dict[str, torch.Tensor]:
        blocks = [g.name for g in net.groups if g.kind == "block"]
        if blocks:
            raise ValueError(f"L1 importance scores channels, not the blocks {blocks}")
        return filter_l1(net.net, [g.name for g in net.groups])


def filter_l1(model: nn.Module, roots: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per root layer named in ``roots``: the L1 norm of each output channel's weights, (out,)."""
    modules = dict(model.named_modules())
    return {g: modules[g].weight.detach().abs().flatten(1).sum(1) for g in roots}


def taylor_batches(data: PreparedData, batch_size: int, count: int, seed: int,
                   device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` training batches (the caller caps it at one epoch), in a seeded order, normalised,
    without augmentation: what the Taylor importance is averaged over."""
    mean, std = data.norm()
    order = torch.randperm(len(data.train.y), generator=torch.Generator().manual_seed(seed))
    for i in range(count):
        idx = order[i * batch_size: (i + 1) * batch_size]
        if len(idx) < 2:
            return
        yield normalize(data.train.take(idx), mean, std).to(device), data.train.y[idx].to(device)


def sampled_label_loss(seed: int, temperature: float = 1.0) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                                                         torch.Tensor]:
    """A criterion for ``taylor_importance`` (``prune.taylor_labels: sampled``): the cross-entropy of
    the softened output softmax(z / ``temperature``) against a label drawn from it (seeded), the
    data's labels unused. Per sample, the expected squared gradient of this loss with respect to a
    mask is the mask's Fisher information of the softened output: half of it is the second-order
    rise of KL(p_full || p_masked) at that temperature when the mask goes from 1 to 0, the
    distillation term's loss for removing that channel. Unlike the training loss of a network that
    fits its training set (near zero, its gradient left to the few misfits), it does not vanish on
    the training images."""
    generator = torch.Generator().manual_seed(seed)

    def loss(logits: torch.Tensor, labels: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        soft = logits / temperature
        drawn = torch.multinomial(torch.softmax(soft.detach().float(), 1).cpu(), 1, generator=generator)
        return torch.nn.functional.cross_entropy(soft, drawn.squeeze(1).to(logits.device))

    return loss


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
    form did not train to a better network (docs/history.md, section 23).

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
