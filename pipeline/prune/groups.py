"""What can be pruned and how a decision is written down: prunable groups, the widths each may
take, and hard masks (per group, a boolean per channel; per block, one boolean).

* ``prune_groups`` classifies every channel group (``pipeline.slim``) by how its keep probability
  is obtained (``PruneGroup.kind``):

  - ``scp``: every output-side BatchNorm feeds a ReLU directly (the inner channels of a residual
    block, MobileNetV2 expansions): BatchNorm's own (gamma, beta) say how often the channel is
    switched off (``pipeline.prune.soft``);
  - ``gate``: any other group, typically channels coupled through residual additions, where a
    BatchNorm is summed with other branches before the ReLU; a learnable keep logit per channel.
    ``coupled: keep`` makes them ``fixed`` instead (full width: SCP's own choice);
  - ``block`` (``depth``): a removable residual block (``pipeline.blocks.residual_blocks``), one
    keep logit; its mask multiplies the residual branch's last BatchNorm (0: the identity).

* Widths live on the latency table's lattice (multiples of the measured staircase step, and the
  full width), never zero for a channel group; a block's are [0, 1].
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from pipeline.blocks import BLOCK, groups_inside_blocks, is_block, residual_blocks
from pipeline.latency.table import grid_values
from pipeline.slim import ChannelGraph, tensor_consumers

RELUS = (nn.ReLU, nn.ReLU6)
Kind = Literal["scp", "gate", "fixed", "block"]


@dataclass(frozen=True)
class PruneGroup:
    """A channel group and how its keep probability is obtained.

    ``bns``: output-side BatchNorms (their gamma/beta give the scp probability);
    ``sites``: modules whose output the soft mask multiplies."""

    name: str
    size: int
    kind: Kind
    bns: tuple[str, ...]
    sites: tuple[str, ...]


def prune_groups(model: nn.Module, example: torch.Tensor, coupled: Literal["gate", "keep"] = "gate",
                 graph: ChannelGraph | None = None, depth: bool = False) -> list[PruneGroup]:
    """Classify the channel groups of ``model`` (module docstring); with ``depth``, one ``block``
    group per removable residual block after them."""
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
            consumers.get(b) and all(isinstance(modules[c], RELUS) for c in consumers[b]) for b in bns)
        if bn_relu and sites == bns:
            kind = "scp"
        else:
            kind = "gate" if coupled == "gate" else "fixed"
        out.append(PruneGroup(g.name, g.size, kind, tuple(bns), tuple(sites)))
    if depth:
        out += [PruneGroup(BLOCK + b, 1, "block", (bn,), (bn,)) for b, bn in residual_blocks(model).items()]
    return out


def allowed_widths(size: int, multiple: int, min_fraction: float) -> list[int]:
    """Widths a group may be pruned to: the latency table's lattice (never empty, never 0)."""
    return grid_values(size, multiple, min_fraction)


def allowed_for(groups: list[PruneGroup], multiple: int, min_fraction: float) -> dict[str, list[int]]:
    """The widths every prunable group may take: the latency table's lattice for channel groups,
    [0, 1] (removed, kept) for blocks. Fixed groups are absent (full width)."""
    return {g.name: [0, 1] if g.kind == "block" else allowed_widths(g.size, multiple, min_fraction)
            for g in groups if g.kind != "fixed"}


def blocks_only(allowed: Mapping[str, list[int]]) -> dict[str, list[int]]:
    """``prune.channels: false``: every channel group fixed at its full width, blocks still [0, 1],
    so the knapsack and the closed loop can only remove whole blocks."""
    return {g: list(a) if is_block(g) else [max(a)] for g, a in allowed.items()}


def inner_groups(groups: list[PruneGroup]) -> dict[str, str]:
    """Channel group -> the block (``"block:<name>"``) holding all its output-side BatchNorms."""
    return groups_inside_blocks({g.name: g.bns for g in groups if g.kind != "block"},
                                [g.name[len(BLOCK):] for g in groups if g.kind == "block"])


def is_live(group: str, widths: Mapping[str, int], inside: Mapping[str, str]) -> bool:
    """False for a channel group inside a removed block (its width changes nothing)."""
    return not (group in inside and widths.get(inside[group], 1) == 0)


def nearest_allowed(count: int, allowed: list[int]) -> int:
    """The allowed width nearest to ``count`` (ties go to the larger one)."""
    return min(allowed, key=lambda a: (abs(a - count), -a))


def top_mask(keep: torch.Tensor, n: int) -> torch.Tensor:
    """Boolean mask of the ``n`` most probable channels (ties broken by index, deterministic)."""
    order = sorted(range(keep.numel()), key=lambda i: (-float(keep[i]), i))
    m = torch.zeros(keep.numel(), dtype=torch.bool)
    m[order[:n]] = True
    return m


def masks_for_widths(keep: Mapping[str, torch.Tensor], widths: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """The ``widths[g]`` most probable channels of every group."""
    return {g: top_mask(keep[g], widths[g]) for g in widths}


def harden(keep_probs: Mapping[str, torch.Tensor], allowed: Mapping[str, list[int]]) -> dict[str, torch.Tensor]:
    """SCP's rule (``allocation: threshold``). Per group: count of keep > 0.5, rounded to the
    nearest allowed width, the most probable channels kept. Groups missing from ``allowed`` keep
    their full width."""
    out = {}
    for name, keep in keep_probs.items():
        n = int((keep > 0.5).sum())
        width = nearest_allowed(n, allowed[name]) if name in allowed else keep.numel()
        out[name] = top_mask(keep, width if is_block(name) else max(1, width))  # a block may go, a group not
    return out


def widths_of(masks: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Kept channels (blocks: 0 or 1) per group."""
    return {g: int(m.sum()) for g, m in masks.items()}


def smallest_masks(groups: list[PruneGroup], allowed: Mapping[str, list[int]]) -> dict[str, torch.Tensor]:
    """Every prunable group at its smallest allowed width (every removable block removed)."""
    sizes = {g.name: g.size for g in groups}
    return {g: top_mask(torch.ones(sizes[g]), a[0]) for g, a in allowed.items()}


def kept_indices(masks: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
    """The kept channels' indices per group (masks.json's ``kept``; ``pipeline.slim.masks_from_kept``
    reads them back)."""
    return {g: m.nonzero().flatten().tolist() for g, m in masks.items()}
