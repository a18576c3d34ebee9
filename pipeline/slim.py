"""Channel groups, masks and physical slimming, on any CNN that Torch-Pruning can trace.

A *channel group* is a set of channels that must be removed together: the output channels of a
convolution plus everything coupled to them (its BatchNorm, the input channels of every consumer,
the other branches of a residual addition, depthwise convolutions, concatenation slices). The
dependency graph comes from Torch-Pruning (DepGraph, CVPR 2023). A group is named by its *root*,
the first layer whose output channels define it; masks index the root's output channels.

Masks are ``{group name: BoolTensor(group size)}``, True = keep. The *masked model* keeps every
shape and zeroes, for each removed channel, every output-side parameter of every layer in the
group (convolution filters and bias, BatchNorm scale and shift, linear rows and bias). A removed
channel therefore carries exactly zero wherever it flows (ReLU, addition, pooling and
concatenation keep a zero a zero), so no constant (e.g. a BatchNorm shift through ReLU) is left
to fold into a consumer's bias, and the slimmed model (the same layers without those channels)
computes the same function. ``slim`` checks that claim numerically.

*Blocks* (depth): a residual block whose shortcut is the identity can be removed whole. Its mask
is keyed ``"block:<module name>"``, one entry, False = removed. In the masked model the residual
branch's last BatchNorm is zeroed (scale and shift), so the block computes ``x + 0`` (then a ReLU
for the ResNet block, whose input is already a ReLU output: ``x`` again); the slimmed model
replaces the block with ``nn.Identity``. ``pipeline.blocks.residual_blocks`` says which blocks qualify.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.blocks import BLOCK, Masks, dropped_blocks, is_block, residual_blocks
from pipeline.errors import ConfigError, SlimdeployError

log = logging.getLogger(__name__)


class SlimError(SlimdeployError):
    """A model or mask that cannot be slimmed correctly; never silently produces a wrong model."""


@dataclass(frozen=True)
class ChannelGroup:
    """Coupled channels removed together. ``members``: (module name, "out" | "in") for every
    layer whose parameters lose channels when the group shrinks."""

    name: str
    size: int
    members: tuple[tuple[str, str], ...]

    def layers(self, kind: str) -> list[str]:
        return [n for n, k in self.members if k == kind]


def _tp() -> Any:
    import torch_pruning as tp

    return tp


def trace_forward(model: nn.Module, example: torch.Tensor, types: tuple[type, ...], hook: Any,
                  leaves_only: bool = False) -> None:
    """One eval-mode forward pass of ``model`` on ``example``, calling
    ``hook(name, module, inputs, output)`` after every module of ``types`` (only modules without
    children when ``leaves_only``) in execution order. Hooks are removed afterwards."""
    names = {m: n for n, m in model.named_modules()}
    handles = [m.register_forward_hook(lambda mod, inp, out: hook(names[mod], mod, inp, out))
               for m in model.modules() if isinstance(m, types) and not (leaves_only and any(True for _ in m.children()))]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in handles:
            h.remove()


def tensor_consumers(model: nn.Module, example: torch.Tensor) -> dict[str, set[str]]:
    """Leaf module name -> names of the leaf modules that take its output tensor directly as
    their first input (one eval forward pass; functional ops in between are not seen)."""
    produced: dict[int, str] = {}
    keep_alive: list[torch.Tensor] = []  # ids stay unique while the tensors live
    out: dict[str, set[str]] = {}

    def hook(name: str, _mod: nn.Module, inp: tuple[Any, ...], output: Any) -> None:
        if inp and isinstance(inp[0], torch.Tensor) and id(inp[0]) in produced:
            out.setdefault(produced[id(inp[0])], set()).add(name)
        if isinstance(output, torch.Tensor):  # an in-place op's output is its input: now its own
            keep_alive.append(output)
            produced[id(output)] = name

    trace_forward(model, example, (nn.Module,), hook, leaves_only=True)
    return out


def _classifier(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """The last Conv/Linear executed in a forward pass: the class logits, never pruned."""
    order: list[nn.Module] = []
    trace_forward(model, example, (nn.Conv2d, nn.Linear), lambda _n, mod, _i, _o: order.append(mod))
    if not order:
        raise SlimError("model has no Conv2d or Linear layer to prune")
    return order[-1]


class ChannelGraph:
    """The dependency graph of one model instance: its groups, and pruning operations on them."""

    def __init__(self, model: nn.Module, example: torch.Tensor) -> None:
        tp = _tp()
        _check_supported(model)
        self.model = model
        self.example = example
        self._names = {m: n for n, m in model.named_modules()}
        self.classifier = _classifier(model, example)
        with warnings.catch_warnings(), torch.enable_grad():  # DepGraph traces through autograd
            warnings.simplefilter("ignore")
            try:
                self.dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
            except (RuntimeError, ValueError, ZeroDivisionError, KeyError, IndexError, AssertionError) as err:
                raise SlimError(
                    f"Torch-Pruning cannot trace the channel dependencies of {type(model).__name__}: "
                    f"{type(err).__name__}: {err}"
                ) from err
        self._roots: dict[str, nn.Module] = {}
        self.groups: list[ChannelGroup] = []
        for group in self.dg.get_all_groups(ignored_layers=[self.classifier], root_module_types=(nn.Conv2d, nn.Linear)):
            root = group[0].dep.target.module
            name = self._names[root]
            members = []
            for dep, _idxs in group:
                mod = dep.target.module
                if isinstance(mod, nn.Module) and mod in self._names:
                    kind = "out" if self.dg.is_out_channel_pruning_fn(dep.handler) else "in"
                    if (self._names[mod], kind) not in members:
                        members.append((self._names[mod], kind))
            self._roots[name] = root
            self.groups.append(ChannelGroup(name, len(group[0].idxs), tuple(members)))

    def by_name(self) -> dict[str, ChannelGroup]:
        return {g.name: g for g in self.groups}

    def pruning_group(self, name: str, idxs: list[int]) -> Any:
        root = self._roots[name]
        return self.dg.get_pruning_group(root, self.dg.get_pruner_of_module(root).prune_out_channels, idxs)


def _check_supported(model: nn.Module) -> None:
    """Refuse grouped (not depthwise) convolutions: their per-group channel counts must stay equal,
    which random or learned masks do not respect (Torch-Pruning 1.6 then builds an invalid model,
    seen on torchvision's regnet_x_400mf)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels:
            raise SlimError(
                f"{name} is a grouped convolution (groups={m.groups}, {m.in_channels} -> {m.out_channels} "
                "channels); slimming grouped (non-depthwise) convolutions is not supported"
            )


def channel_groups(model: nn.Module, example: torch.Tensor) -> list[ChannelGroup]:
    """Prunable channel groups of ``model`` (traced on ``example``, e.g. zeros of (1, C, H, W)).
    The classifier's outputs are never a group. ``model`` is not modified."""
    return ChannelGraph(model, example).groups


def validate_masks(groups: list[ChannelGroup], masks: Masks, blocks: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Check names, lengths and that no group is emptied; returns bool CPU masks. Block masks
    (``"block:<name>"``, one entry) must name one of ``blocks`` (``residual_blocks``)."""
    known = {g.name: g for g in groups}
    blocks = blocks or {}
    unknown = sorted(k for k in masks if k not in known and not (is_block(k) and k[len(BLOCK):] in blocks))
    if unknown:
        raise ConfigError(f"mask for unknown channel group(s) {unknown}; groups are: {sorted(known)}; "
                          f"removable blocks: {sorted(BLOCK + b for b in blocks) or 'none'}")
    out = {}
    for name, m in masks.items():
        m = torch.as_tensor(m).to("cpu")
        if m.dtype != torch.bool:
            raise ConfigError(f"mask {name!r} must be boolean (True = keep), got {m.dtype}")
        if is_block(name):
            if m.numel() != 1:
                raise ConfigError(f"block mask {name!r} must have exactly one entry (False = remove the block), got {m.numel()}")
            out[name] = m.reshape(1)
            continue
        if m.ndim != 1 or m.numel() != known[name].size:
            raise ConfigError(f"mask {name!r} has {m.numel()} entries; group has {known[name].size} channels")
        if not m.any():
            raise ConfigError(f"mask {name!r} removes all {known[name].size} channels; keep at least one")
        out[name] = m
    return out


_ZEROABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm)


def apply_masks(model: nn.Module, example: torch.Tensor, masks: Masks) -> nn.Module:
    """The masked model: a copy of ``model`` with the output-side parameters of every removed
    channel zeroed (see module docstring). ``model`` is not modified."""
    masked = copy.deepcopy(model).eval()
    graph = ChannelGraph(masked, example)
    blocks = residual_blocks(masked)
    masks = validate_masks(graph.groups, masks, blocks)
    names = {m: n for n, m in masked.named_modules()}
    with torch.no_grad():
        _zero_masked(graph, {k: m for k, m in masks.items() if not is_block(k)}, names)
        for b in dropped_blocks(masks):  # the residual branch adds exactly zero
            bn = masked.get_submodule(blocks[b])
            bn.weight.zero_()
            bn.bias.zero_()
    return masked


def _zero_masked(graph: ChannelGraph, masks: dict[str, torch.Tensor], names: dict[nn.Module, str]) -> None:
    for name, keep in masks.items():
        drop = (~keep).nonzero().flatten().tolist()
        if not drop:
            continue
        for dep, idxs in graph.pruning_group(name, drop):
            mod = dep.target.module
            if not graph.dg.is_out_channel_pruning_fn(dep.handler) or not isinstance(mod, nn.Module):
                continue
            if not any(True for _ in mod.parameters(recurse=False)):
                continue  # parameter-free (activation, pooling, addition, concatenation): 0 stays 0
            if not isinstance(mod, _ZEROABLE) or isinstance(mod, nn.modules.conv._ConvTransposeNd):
                raise SlimError(
                    f"cannot mask output channels of {type(mod).__name__} at {names.get(mod, '?')} "
                    "(supported: Conv, Linear, BatchNorm); this model cannot be slimmed"
                )
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and not mod.affine:
                raise SlimError(f"BatchNorm without affine parameters at {names.get(mod, '?')} cannot be masked")
            idx = torch.as_tensor(idxs, dtype=torch.long)
            mod.weight[idx] = 0
            if mod.bias is not None:
                mod.bias[idx] = 0


@dataclass
class SlimResult:
    model: nn.Module
    masked: nn.Module  # the same-shape network it was checked against
    kept: dict[str, list[int]]  # group -> kept channel indices of the root (the channel manifest)
    max_abs_diff: float


def slim(model: nn.Module, example: torch.Tensor, masks: Masks, check_inputs: torch.Tensor | None = None,
         atol: float = 1e-4) -> SlimResult:
    """Physically remove the masked channels: a smaller dense copy of ``model``.

    ``check_inputs`` (default: 8 random inputs shaped like ``example``) are run through the masked
    and the slimmed model in eval mode; a max abs difference above ``atol`` raises SlimError.
    ``model`` is not modified.
    """
    masked = apply_masks(model, example, masks)
    slimmed, kept = _prune(model, example, masks)
    gen = torch.Generator().manual_seed(0)
    x = check_inputs if check_inputs is not None else torch.randn((8, *example.shape[1:]), generator=gen)
    with torch.no_grad():
        diff = (masked(x) - slimmed(x)).abs().max().item()
    if not diff <= atol:
        raise SlimError(f"slimmed model differs from the masked model by {diff:.3g} (allowed {atol:g})")
    return SlimResult(slimmed, masked, kept, diff)


def prune_structure(model: nn.Module, example: torch.Tensor, masks: Masks) -> nn.Module:
    """A copy of ``model`` with the masked channels removed (no equivalence check)."""
    return _prune(model, example, masks)[0]


def _prune(model: nn.Module, example: torch.Tensor, masks: Masks) -> tuple[nn.Module, dict[str, list[int]]]:
    slimmed = copy.deepcopy(model).eval()
    graph = ChannelGraph(slimmed, example)
    masks = validate_masks(graph.groups, masks, residual_blocks(slimmed))
    with torch.no_grad():
        for name, keep in masks.items():
            drop = (~keep).nonzero().flatten().tolist()
            if drop and not is_block(name):
                try:
                    graph.pruning_group(name, drop).prune()
                except (RuntimeError, ValueError, IndexError) as err:
                    raise SlimError(f"Torch-Pruning failed to remove channels of group {name}: {err}") from err
    # blocks last: channel pruning has kept the widths on both sides of a removed block equal
    for b in dropped_blocks(masks):
        parent, _, child = b.rpartition(".")
        setattr(slimmed.get_submodule(parent) if parent else slimmed, child, nn.Identity())
    return slimmed.eval(), {n: m.nonzero().flatten().tolist() for n, m in masks.items()}


def masks_from_kept(groups: list[ChannelGroup], kept: Mapping[str, list[int]]) -> dict[str, torch.Tensor]:
    """Inverse of ``SlimResult.kept``: boolean masks from kept indices."""
    sizes = {g.name: g.size for g in groups}
    out = {}
    for name, idx in kept.items():
        if is_block(name):  # the block name is checked against the network where the masks are used
            if not isinstance(idx, list) or any(i != 0 for i in idx):
                raise ConfigError(f"channel manifest entry {name!r} must be [0] (kept) or [] (removed), got {idx!r}")
            out[name] = torch.tensor([bool(idx)])
            continue
        if name not in sizes:
            raise ConfigError(f"channel manifest names unknown channel group {name!r}; this network's groups: "
                              f"{', '.join(sorted(sizes))}")
        m = torch.zeros(sizes[name], dtype=torch.bool)
        m[torch.as_tensor(idx, dtype=torch.long)] = True
        out[name] = m
    return out


def magnitude_masks(model: nn.Module, example: torch.Tensor, keep_fraction: float, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Keep the ``keep_fraction`` channels of each group with the largest L1 norm of the root's
    filters (rounded to ``multiple``, at least one)."""
    if not 0.0 < keep_fraction <= 1.0:
        raise ConfigError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    graph = ChannelGraph(model, example)
    modules = dict(model.named_modules())
    out = {}
    for g in graph.groups:
        w = modules[g.name].weight.detach()
        score = w.abs().flatten(1).sum(1)
        # round half up to a multiple, never below one multiple (or the whole group if smaller)
        k = min(g.size, max(min(multiple, g.size), multiple * math.floor(keep_fraction * g.size / multiple + 0.5)))
        keep = torch.zeros(g.size, dtype=torch.bool)
        keep[score.topk(k).indices] = True
        out[g.name] = keep
    return out


def random_masks(groups: list[ChannelGroup], low: float, high: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Keep a uniformly random fraction in [low, high] of each group (at least one channel)."""
    out = {}
    for g in groups:
        frac = low + (high - low) * torch.rand((), generator=generator).item()
        k = max(1, min(g.size, round(frac * g.size)))
        keep = torch.zeros(g.size, dtype=torch.bool)
        keep[torch.randperm(g.size, generator=generator)[:k]] = True
        out[g.name] = keep
    return out


def load_slimmed_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint with or without a channel manifest: rebuild the registry model, remove
    the manifest's channels, then load the weights strictly (``weights_only=True``)."""
    from models import build_model
    from pipeline.checkpoint import load_checkpoint, load_model, load_weights

    ckpt = load_checkpoint(path)
    manifest = ckpt.get("channel_manifest")
    if manifest is None:
        return load_model(path)
    model = build_model(ckpt["arch"], **ckpt["arch_config"])
    example = torch.zeros(1, *manifest["input_shape"])
    masks = masks_from_kept(channel_groups(model, example), manifest["kept"])
    return load_weights(prune_structure(model, example, masks), ckpt, path)
