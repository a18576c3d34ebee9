"""What the prune stage prunes (``PruneSpace``): the student's prunable groups, the widths each may
take, and how the latency table prices them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.blocks import BLOCK
from pipeline.config import PruneConfig
from pipeline.errors import ConfigError
from pipeline.latency import LatencyPredictor, LatencyTable
from pipeline.prune.groups import PruneGroup, allowed_for, blocks_only, inner_groups, prune_groups


@dataclass
class PruneSpace:
    """What the prune stage prunes: the student's groups (``prune_groups``), the widths each may
    take (``allowed``, on the latency table's lattice), the channel groups inside each removable
    block (``inside``), and the table's predictor. ``shape``: one input (C, H, W)."""

    groups: list[PruneGroup]
    allowed: dict[str, list[int]]
    inside: dict[str, str]
    predictor: LatencyPredictor
    multiple: int
    min_fraction: float
    shape: tuple[int, ...]

    @property
    def example(self) -> torch.Tensor:
        return torch.zeros(1, *self.shape)

    @property
    def blocks(self) -> list[str]:
        return [g.name for g in self.groups if g.kind == "block"]

    def predict(self, widths: dict[str, int]) -> float:
        """The table's prediction (ms) for ``widths``."""
        return self.predictor(widths).item()


def prune_space(student: nn.Module, arch: dict[str, Any], table: LatencyTable, table_name: str, cfg: PruneConfig,
                shape: tuple[int, ...]) -> PruneSpace:
    """The student's ``PruneSpace``; a ConfigError when ``table`` profiles another network
    (``arch``: the student checkpoint's ``arch`` and ``arch_config``) or prices no removal of a
    block that ``prune.depth`` would remove. ``table_name`` names the table in messages."""
    profiled = {"arch": table.model.get("arch"), "arch_config": table.model.get("arch_config")}
    if json.dumps(profiled, sort_keys=True) != json.dumps(arch, sort_keys=True):
        raise ConfigError(f"latency table {table_name} profiles {profiled}, not the student "
                          f"{arch['arch']} {arch['arch_config']}; set profile.arch: student and re-run profile")
    predictor = table.predictor()
    groups = prune_groups(student, torch.zeros(1, *shape), cfg.coupled, depth=cfg.depth)
    unpriced = sorted({g.name for g in groups if g.kind == "block"} - predictor.blocks)
    if unpriced:
        raise ConfigError(f"prune.depth: true, but the latency table {table_name} prices no removal of the blocks "
                          f"{[b[len(BLOCK):] for b in unpriced]} (a table from an older profile stage); re-run "
                          f"profile, or set prune.depth: false")
    multiple = cfg.multiple or table.step
    allowed = allowed_for(groups, multiple, table.meta["min_fraction"])
    if not cfg.channels:  # blocks only: every channel group keeps the student's width
        allowed = blocks_only(allowed)
    # inner_groups: channel groups that stop mattering when their block is removed
    return PruneSpace(groups, allowed, inner_groups(groups), predictor, multiple, table.meta["min_fraction"], shape)
