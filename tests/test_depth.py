"""Depth pruning: removable residual blocks through masks, slimming, the latency table and the
soft-mask training wrapper."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from models import build_model
from pipeline.blocks import BLOCK, block_masks, dropped_blocks, residual_blocks
from pipeline.checkpoint import save_checkpoint
from pipeline.errors import ConfigError
from pipeline.latency import build_table, make_backend
from pipeline.latency.calibrate import random_width_sets
from pipeline.prune import (
    SoftMaskedNet,
    allocate_widths,
    allowed_for,
    blocks_only,
    closed_loop,
    harden,
    prune_groups,
    widths_of,
)
from pipeline.slim import apply_masks, channel_groups, load_slimmed_model, masks_from_kept, random_masks, slim
from tests.conftest import randomise_bn
from tests.test_latency import FAST

# The searched student of the default pipeline has this form: uneven blocks, widths and inner widths.
STUDENT = {"blocks": [3, 2, 2], "stage_widths": [12, 24, 40], "stem_width": 12,
           "mid_widths": [[8, 12, 5], [20, 9], [33, 17]]}



def test_removable_blocks_are_the_identity_shortcut_ones() -> None:
    model = build_model("resnet20", num_classes=10, in_channels=3)
    blocks = residual_blocks(model)
    # 3 stages of 3 blocks; the first block of stages 1 and 2 has a projection shortcut (stride 2)
    assert sorted(blocks) == sorted(f"stages.{s}.{b}" for s in range(3) for b in range(3) if (s, b) not in
                                    ((1, 0), (2, 0)))
    assert blocks["stages.0.0"] == "stages.0.0.bn2"
    mnv2 = residual_blocks(build_model("mobilenetv2", num_classes=10, in_channels=3))
    assert mnv2 and all(isinstance(v, str) and v.split(".")[-2] == "conv" for v in mnv2.values())


@pytest.mark.parametrize(("arch", "cfg", "size"), [
    ("resnet20", {}, 16),
    ("resnet56", {}, 16),
    ("cifar_resnet", STUDENT, 16),
    ("mobilenetv2", {"width_mult": 0.5}, 32),
])
def test_slimming_with_blocks_removed_equals_the_masked_network(arch: str, cfg: dict, size: int, tmp_path: Path) -> None:
    model = randomise_bn(build_model(arch, num_classes=10, in_channels=3, **cfg))
    example = torch.zeros(1, 3, size, size)
    blocks = sorted(residual_blocks(model))
    dropped = blocks[::2]  # every other removable block, with random channel masks on top
    masks = {**random_masks(channel_groups(model, example), 0.3, 0.8, torch.Generator().manual_seed(0)),
             **block_masks(model, dropped)}
    x = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(1))
    result = slim(model, example, masks, check_inputs=x)
    assert result.max_abs_diff <= 1e-4
    with torch.no_grad():
        kept_blocks = apply_masks(model, example, {k: v for k, v in masks.items() if not k.startswith(BLOCK)})
        # the removal is not a no-op: the network without it computes something else
        assert (kept_blocks(x) - result.model(x)).abs().max() > 1e-3
    assert all(isinstance(result.model.get_submodule(b), nn.Identity) for b in dropped)
    assert not any(isinstance(result.model.get_submodule(b), nn.Identity) for b in set(blocks) - set(dropped))
    assert sorted(dropped_blocks(masks)) == dropped
    # the channel manifest records the removal and rebuilds the same weights (strict load)
    assert all(result.kept[BLOCK + b] == [] for b in dropped)
    save_checkpoint(tmp_path / "s.pt", arch, {"num_classes": 10, "in_channels": 3, **cfg}, result.model.state_dict(),
                    {}, {"input_shape": [3, size, size], "kept": result.kept})
    loaded, _ = load_slimmed_model(tmp_path / "s.pt")
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))


def test_bad_block_masks_are_clear_errors() -> None:
    model = build_model("resnet20", num_classes=10, in_channels=1)
    example = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ConfigError, match=r"'stages.1.0'\] are not removable blocks.*removable: \['stages.0.0'"):
        block_masks(model, ["stages.1.0"])  # a projection shortcut: not removable
    with pytest.raises(ConfigError, match=r"unknown channel group\(s\) \['block:stages.2.0'\].*removable blocks"):
        apply_masks(model, example, {"block:stages.2.0": torch.tensor([False])})
    with pytest.raises(ConfigError, match="exactly one entry"):
        apply_masks(model, example, {"block:stages.0.1": torch.tensor([False, True])})
    with pytest.raises(ConfigError, match=r"must be \[0\] \(kept\) or \[\] \(removed\)"):
        masks_from_kept(channel_groups(model, example), {"block:stages.0.1": [3]})


@pytest.fixture(scope="module")
def table_model():  # noqa: ANN201
    torch.manual_seed(0)
    model = build_model("cifar_resnet", num_classes=4, in_channels=1, blocks=[2, 2], stage_widths=[8, 16]).eval()
    table = build_table(model, (1, 8, 8), make_backend("onnxruntime", batch_size=1, threads=1, protocol=FAST),
                        {"arch": "cifar_resnet"}, step=4, min_fraction=0.25, max_points=6, progress=False)
    return model, table


def test_table_prices_a_removed_block_as_its_units(table_model) -> None:  # noqa: ANN001
    model, table = table_model
    assert set(table.blocks) == {"stages.0.0", "stages.0.1", "stages.1.1"}
    assert table.blocks["stages.0.1"] == ["stages.0.1.conv1", "stages.0.1.conv2"]
    pred = table.predictor()
    full = pred.raw({})
    units = {layer["name"]: pred.layer_ms(layer["key"], torch.tensor(float(layer["in_max"]), dtype=torch.float64),
                                          torch.tensor(float(layer["out_max"]), dtype=torch.float64))
             for layer in table.layers}
    removed = pred.raw({"block:stages.0.1": 0.0})
    assert removed.item() == pytest.approx((full - units["stages.0.1.conv1"] - units["stages.0.1.conv2"]).item())
    # a removed block's inner width no longer matters; a soft keep value interpolates
    inner = "stages.0.1.conv1"
    assert pred.raw({"block:stages.0.1": 0.0, inner: 2.0}).item() == pytest.approx(removed.item())
    assert pred.raw({"block:stages.0.1": 0.5}).item() == pytest.approx(((full + removed) / 2).item())
    w = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    pred({"block:stages.0.1": w}).backward()
    # the gradient is the block's units' measured ms (scaled): exact, whatever this machine measured
    assert w.grad is not None and w.grad.item() == pytest.approx(pred.scale * (full - removed).item())
    with pytest.raises(ConfigError, match="no such removable block"):
        pred.raw({"block:stages.1.0": 0.0})
    lattice = table.lattice(blocks=True)
    assert lattice["block:stages.1.1"] == [0, 1] and "block:stages.1.1" not in table.lattice()
    # calibration sub-networks remove blocks too, at the configured rate, never all of them
    sets = random_width_sets(lattice, 40, torch.Generator().manual_seed(0))
    drops = [w[b] == 0 for w in sets for b in lattice if b.startswith(BLOCK)]
    assert 0.1 < sum(drops) / len(drops) < 0.45


def test_block_gates_train_and_a_fixed_removal_equals_the_masked_network() -> None:
    model = randomise_bn(build_model("cifar_resnet", num_classes=4, in_channels=1, **STUDENT))
    example = torch.zeros(1, 1, 8, 8)
    groups = prune_groups(model, example, depth=True)
    blocks = [g for g in groups if g.kind == "block"]
    assert {g.name for g in blocks} == {BLOCK + b for b in residual_blocks(model)}
    net = SoftMaskedNet(model, groups).train()
    x = torch.randn(6, 1, 8, 8)
    net(x).square().mean().backward()
    gate = net.gates["block:stages__0__1"]
    assert gate.grad is not None and gate.grad.abs().item() > 0  # the distillation loss reaches the gate
    # a block whose branch meets both its stream gate and its block gate: masks multiply
    masks = {**random_masks(channel_groups(model, example), 0.4, 0.9, torch.Generator().manual_seed(2)),
             **block_masks(model, ["stages.0.1", "stages.2.1"])}
    net.eval().fixed = masks
    with torch.no_grad():
        assert torch.allclose(net(x), apply_masks(model, example, masks)(x), atol=1e-5)
    # a block is valued like the channels it takes away: with hand-set importances (every channel
    # 0.25, every block gate 0.5), a block whose inner group has 8 channels is worth 0.5 * 8 * 0.25
    real = net.importance()
    net.importance = lambda: {k: torch.full_like(v, 0.5 if k.startswith(BLOCK) else 0.25)  # type: ignore[method-assign]
                              for k, v in real.items()}
    values = net.allocation_values()
    width = real["stages.0.1.conv1"].numel()
    assert values["block:stages.0.1"].item() == pytest.approx(0.5 * max(1.0, 0.25 * width))
    assert values["stages.0.1.conv1"].sum().item() == pytest.approx(0.25 * width)  # channel groups unchanged


def test_allocation_harden_and_closed_loop_remove_and_restore_blocks() -> None:
    model = randomise_bn(build_model("cifar_resnet", num_classes=4, in_channels=1, **STUDENT))
    example = torch.zeros(1, 1, 8, 8)
    groups = prune_groups(model, example, depth=True)
    allowed = allowed_for(groups, 4, 0.25)
    assert allowed["block:stages.0.1"] == [0, 1]
    # a block worth little and costing much goes first; a removed block's inner width is then left alone
    values = {g.name: torch.ones(g.size) for g in groups if g.name in allowed}
    values["block:stages.2.1"] = torch.tensor([0.5])

    def predict(w: dict) -> float:
        return 10.0 - 4.0 * (w.get("block:stages.2.1", 1) == 0)  # only that block's removal saves time

    widths, ms = allocate_widths(values, allowed, predict, target_ms=7.0)
    assert widths["block:stages.2.1"] == 0 and ms == 6.0
    assert widths["stages.2.1.conv1"] == max(allowed["stages.2.1.conv1"])  # saves nothing once the block is gone
    # harden: a block gate under 0.5 removes the block (a channel group is never emptied)
    keep = {g.name: torch.full((g.size,), 0.9) for g in groups if g.name in allowed}
    keep["block:stages.0.2"] = torch.tensor([0.2])
    hard = harden(keep, allowed)
    assert widths_of(hard)["block:stages.0.2"] == 0 and all(v >= 1 for k, v in widths_of(hard).items()
                                                            if not k.startswith(BLOCK))
    # the closed loop removes a block when that is the cheapest way down, and restores one when under
    state = {g: torch.ones(len(keep[g]), dtype=torch.bool) for g in keep}

    def ms_of(w: dict) -> float:
        return 10.0 - sum(3.0 for k, v in w.items() if k.startswith(BLOCK) and v == 0)

    loop = closed_loop(state, keep, {"block:stages.0.2": [0, 1], "block:stages.2.1": [0, 1]}, budget_ms=7.5,
                       measure=lambda m: ms_of(widths_of(m)), predict=ms_of,
                       cost=lambda m: float(sum(1 - int(v.any()) for k, v in m.items() if k.startswith(BLOCK))),
                       band=(0.9, 1.0))
    assert loop.status == "in_band" and sum(widths_of(loop.masks)[b] == 0 for b in
                                            ("block:stages.0.2", "block:stages.2.1")) == 1
    under = {**state, "block:stages.0.2": torch.tensor([False]), "block:stages.2.1": torch.tensor([False])}
    loop = closed_loop(under, keep, {"block:stages.0.2": [0, 1], "block:stages.2.1": [0, 1]}, budget_ms=7.5,
                       measure=lambda m: ms_of(widths_of(m)), predict=ms_of, cost=lambda m: 0.0, band=(0.9, 1.0))
    assert loop.status == "in_band" and "grow block:stages.2.1" in loop.history[0]["action"]  # keep 0.9 over 0.2


def test_groups_inside_a_removed_block_are_left_alone() -> None:
    """A removed block prices its inner convolutions at zero, so growing its inner group looks
    free: the knapsack's give-back and the closed loop must not spend moves (or measurements) on it."""
    allowed = {"i": [8, 16], "block:b": [0, 1], "s": [8, 16]}
    inside = {"i": "block:b"}
    values = {"i": torch.full((16,), 0.01), "block:b": torch.tensor([1.0]), "s": torch.ones(16)}

    def predict(w: dict) -> float:
        return 1 + w["block:b"] * (2 + 0.1 * w["i"]) + 0.05 * w["s"]

    # cut i first (cheapest per ms), then the block; the give-back would regrow i "for free"
    widths, ms = allocate_widths(values, allowed, predict, target_ms=3.0, inside=inside)
    assert widths == {"i": 8, "block:b": 0, "s": 16} and ms == pytest.approx(1.8)
    regrown, _ = allocate_widths(values, allowed, predict, target_ms=3.0)  # without the block map: the old bug
    assert regrown["i"] == 16
    keep = {k: v.clamp(max=1.0) for k, v in values.items()}
    state = {"i": torch.arange(16) < 8, "block:b": torch.tensor([False]), "s": torch.ones(16, dtype=torch.bool)}
    loop = closed_loop(state, keep, allowed, budget_ms=3.0, measure=lambda m: predict(widths_of(m)),
                       predict=predict, cost=lambda m: 0.0, band=(0.9, 1.0), max_iterations=3, inside=inside)
    assert all("grow i " not in h["action"] for h in loop.history)


def test_blocks_only_keeps_every_channel_group_at_full_width() -> None:
    """``prune.channels: false``: cutting the channel group ``s`` is the cheapest way to the target,
    and the knapsack takes it; restricted to blocks it removes the block instead and no width moves."""
    allowed = {"i": [8, 16], "block:b": [0, 1], "s": [8, 16]}
    values = {"i": torch.ones(16), "block:b": torch.tensor([50.0]), "s": torch.full((16,), 0.01)}

    def predict(w: dict) -> float:
        return 1 + w["block:b"] * (1 + 0.1 * w["i"]) + 0.1 * w["s"]

    widths, _ = allocate_widths(values, allowed, predict, target_ms=4.5)
    assert widths["s"] == 8 and widths["block:b"] == 1  # the channels, when they may move
    only = blocks_only(allowed)
    assert only == {"i": [16], "block:b": [0, 1], "s": [16]} and allowed["s"] == [8, 16]  # a copy
    widths, ms = allocate_widths(values, only, predict, target_ms=4.5)
    assert widths == {"i": 16, "block:b": 0, "s": 16} and ms == pytest.approx(2.6)
