"""Physical slimming: the slimmed network equals the masked one, for our archs and torchvision's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import build_model
from pipeline.checkpoint import load_model, save_checkpoint
from pipeline.errors import CheckpointError, ConfigError
from pipeline.slim import (
    SlimError,
    apply_masks,
    channel_groups,
    load_slimmed_model,
    magnitude_masks,
    random_masks,
    slim,
    validate_masks,
)
from tests.conftest import randomise_bn


def _check(arch: str, size: int, channels: int = 3, seed: int = 0, **cfg: object) -> None:
    torch.manual_seed(seed)
    model = randomise_bn(build_model(arch, num_classes=10, in_channels=channels, **cfg), seed)
    example = torch.zeros(1, channels, size, size)
    groups = channel_groups(model, example)
    assert groups, f"{arch}: no prunable groups found"
    masks = random_masks(groups, 0.3, 0.7, torch.Generator().manual_seed(seed))
    x = torch.randn(4, channels, size, size, generator=torch.Generator().manual_seed(seed + 1))
    result = slim(model, example, masks, check_inputs=x)
    assert result.max_abs_diff <= 1e-4
    masked = apply_masks(model, example, masks)
    with torch.no_grad():
        assert (masked(x) - result.model(x)).abs().max() <= 1e-4  # independent re-check
    n0 = sum(p.numel() for p in model.parameters())
    n1 = sum(p.numel() for p in result.model.parameters())
    assert n1 < 0.8 * n0, f"{arch}: {n0} -> {n1} parameters: slimming removed too little"
    for g in groups:  # the manifest keeps exactly the masked channels
        assert len(result.kept[g.name]) == int(masks[g.name].sum()) >= 1


@pytest.mark.parametrize(
    ("arch", "size", "channels", "cfg"),
    [
        ("resnet_tiny", 8, 1, {}),
        ("resnet20", 16, 1, {}),
        ("cifar_resnet", 8, 3, {"blocks": [2, 1], "stage_widths": [8, 16], "mid_widths": [[5, 7], [11]]}),
        ("mobilenetv2_tiny", 16, 1, {}),
        ("mobilenetv2", 32, 3, {"width_mult": 0.5}),
        ("resnet20", 64, 3, {"stem_stride": 4}),  # the downsampling stem: stride-2 conv and max-pool
        ("cifar_resnet", 40, 3, {"blocks": [2, 1], "stage_widths": [8, 16], "stem_stride": 2}),
    ],
)
def test_registry_archs_slim_equivalently(arch: str, size: int, channels: int, cfg: dict) -> None:
    for seed in (0, 1):
        _check(arch, size, channels, seed, **cfg)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "densenet121"]
)
def test_torchvision_models_slim_equivalently(name: str) -> None:
    _check(f"torchvision:{name}", 64)


@pytest.mark.parametrize(
    ("name", "reason"),
    [("regnet_x_400mf", "grouped convolution"), ("shufflenet_v2_x1_0", "Torch-Pruning cannot trace")],
)
def test_unsupported_models_fail_clearly(name: str, reason: str) -> None:
    model = build_model(f"torchvision:{name}", num_classes=10, in_channels=3)
    with pytest.raises(SlimError, match=reason):
        channel_groups(model, torch.zeros(1, 3, 64, 64))


def test_removed_channels_carry_exact_zeros() -> None:
    model = randomise_bn(build_model("resnet_tiny", num_classes=3, in_channels=1))
    example = torch.zeros(1, 1, 8, 8)
    groups = {g.name: g for g in channel_groups(model, example)}
    name = "stages.0.0.conv1"  # an inner group: conv1 -> bn1 -> relu
    assert name in groups
    keep = torch.tensor([True, False, True, False])
    masked = apply_masks(model, example, {name: keep})
    seen = {}
    masked.stages[0][0].relu1.register_forward_hook(lambda _m, _i, out: seen.setdefault("out", out.clone()))
    masked(torch.randn(2, 1, 8, 8))
    assert torch.all(seen["out"][:, ~keep] == 0)  # no BN shift leaks through ReLU
    assert seen["out"][:, keep].abs().sum() > 0


def test_bad_masks_are_clear_errors() -> None:
    model = build_model("resnet_tiny", num_classes=3, in_channels=1)
    groups = channel_groups(model, torch.zeros(1, 1, 8, 8))
    g = groups[0]
    with pytest.raises(ConfigError, match=f"mask {g.name!r} removes all {g.size} channels"):
        validate_masks(groups, {g.name: torch.zeros(g.size, dtype=torch.bool)})
    with pytest.raises(ConfigError, match=r"unknown channel group\(s\) \['nope'\]; groups are"):
        validate_masks(groups, {"nope": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ConfigError, match=f"has {g.size + 1} entries; group has {g.size} channels"):
        validate_masks(groups, {g.name: torch.ones(g.size + 1, dtype=torch.bool)})
    with pytest.raises(ConfigError, match="must be boolean"):
        validate_masks(groups, {g.name: torch.ones(g.size)})


def test_slimmed_checkpoint_rebuilds_from_manifest(tmp_path: Path) -> None:
    model = randomise_bn(build_model("resnet20", num_classes=5, in_channels=1, width_mult=0.5))
    example = torch.zeros(1, 1, 8, 8)
    masks = magnitude_masks(model, example, 0.5)
    result = slim(model, example, masks)
    cfg = {"num_classes": 5, "in_channels": 1, "width_mult": 0.5}
    save_checkpoint(tmp_path / "s.pt", "resnet20", cfg, result.model.state_dict(), {},
                    {"input_shape": [1, 8, 8], "kept": result.kept})
    loaded, ckpt = load_slimmed_model(tmp_path / "s.pt")
    with pytest.raises(CheckpointError, match="slimmed checkpoint"):
        load_model(tmp_path / "s.pt")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))
    raw = torch.load(tmp_path / "s.pt", weights_only=True)  # plain data only
    assert raw["channel_manifest"]["kept"] == result.kept


def test_magnitude_masks_keep_largest_filters_in_multiples() -> None:
    model = build_model("resnet_tiny", num_classes=3, in_channels=1)
    example = torch.zeros(1, 1, 8, 8)
    masks = magnitude_masks(model, example, 0.5, multiple=2)
    modules = dict(model.named_modules())
    for name, keep in masks.items():
        assert int(keep.sum()) % 2 == 0 or int(keep.sum()) == keep.numel()
        norms = modules[name].weight.detach().abs().flatten(1).sum(1)
        assert norms[keep].min() >= norms[~keep].max() if (~keep).any() else True
    with pytest.raises(ConfigError, match="keep_fraction"):
        magnitude_masks(model, example, 0.0)


def test_magnitude_rounding_never_collapses_a_group_to_one_channel() -> None:
    # resnet20 has 16-channel groups; half of 16 rounded to a multiple of 16 must not become 1
    model = build_model("resnet20", num_classes=3, in_channels=1)
    masks = magnitude_masks(model, torch.zeros(1, 1, 8, 8), 0.5, multiple=16)
    assert all(int(m.sum()) % 16 == 0 and int(m.sum()) >= 16 for m in masks.values())
    assert int(masks["stem.0"].sum()) == 16 and int(masks["stages.2.0.conv1"].sum()) == 32
