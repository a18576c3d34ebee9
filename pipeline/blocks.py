"""Removable residual blocks (depth pruning): which blocks of a network can be removed whole,
and their masks.

A block's mask is keyed ``"block:<module name>"``, one entry, False = removed; ``pipeline.slim``
describes how the masked and the slimmed model treat a removed block.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from pipeline.errors import ConfigError

Masks = Mapping[str, torch.Tensor]


BLOCK = "block:"  # mask key prefix of a removable residual block


def is_block(key: str) -> bool:
    return key.startswith(BLOCK)


def residual_blocks(model: nn.Module) -> dict[str, str]:
    """Residual blocks that can be removed whole: module name -> name of the residual branch's
    last BatchNorm. A block qualifies when its shortcut is the identity (same width and
    resolution in and out) and the branch ends in a BatchNorm: the CIFAR ResNet and MobileNetV2
    blocks of ``models``, torchvision's ResNet BasicBlock and Bottleneck without a downsample,
    and its MobileNetV2 InvertedResidual with a residual connection. ``slim`` checks the removal
    numerically, so a block this misjudges fails loudly, never silently."""
    out = {}
    for name, m in model.named_modules():
        kind, module = type(m).__name__, type(m).__module__
        branch = None
        if module == "models.resnet_cifar" and kind == "BasicBlock" and isinstance(m.shortcut, nn.Identity):
            branch = "bn2"
        elif module == "models.mobilenetv2_cifar" and kind == "InvertedResidual" and m.use_residual:
            branch = f"conv.{len(m.conv) - 1}"
        elif module.startswith("torchvision.models") and kind in ("BasicBlock", "Bottleneck") and m.downsample is None:
            branch = "bn2" if kind == "BasicBlock" else "bn3"
        elif module == "torchvision.models.mobilenetv2" and kind == "InvertedResidual" and m.use_res_connect:
            branch = f"conv.{len(m.conv) - 1}"
        if branch is not None and isinstance(m.get_submodule(branch), nn.BatchNorm2d):
            out[name] = f"{name}.{branch}" if name else branch
    return out


def groups_inside_blocks(outputs: Mapping[str, Iterable[str]], blocks: Iterable[str]) -> dict[str, str]:
    """Channel group -> ``"block:<name>"`` of the block that holds every module producing the
    group (``outputs``: group -> its output-side module names; ``blocks``: block module names).
    Such a group stops mattering once its block is removed."""
    out = {}
    for g, names in outputs.items():
        names = list(names)
        for b in blocks:
            if names and all(n.startswith(b + ".") for n in names):
                out[g] = BLOCK + b
    return out


def block_masks(model: nn.Module, dropped: list[str] = ()) -> dict[str, torch.Tensor]:
    """Block masks for every removable block of ``model``, False for those in ``dropped``."""
    blocks = residual_blocks(model)
    unknown = sorted(set(dropped) - set(blocks))
    if unknown:
        raise ConfigError(f"{unknown} are not removable blocks of this network; removable: {sorted(blocks)}")
    return {BLOCK + b: torch.tensor([b not in dropped]) for b in blocks}


def dropped_blocks(masks: Masks) -> list[str]:
    """Module names of the blocks ``masks`` removes."""
    return [k[len(BLOCK):] for k, m in masks.items() if is_block(k) and not bool(torch.as_tensor(m).any())]
