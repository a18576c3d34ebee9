"""Checkpoints rebuild their model from the registry and load strictly, without pickled code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import build_model
from pipeline.checkpoint import load_checkpoint, load_model, save_checkpoint, unwrap
from pipeline.errors import CheckpointError


def test_round_trip_strict(tmp_path: Path) -> None:
    cfg = {"num_classes": 5, "in_channels": 1, "blocks": [1, 1], "stage_widths": [4, 6], "mid_widths": [[3], [2]]}
    torch.manual_seed(0)
    model = build_model("cifar_resnet", **cfg).eval()
    with torch.no_grad():  # make BN running stats non-trivial so buffers are checked too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    save_checkpoint(tmp_path / "m.pt", "cifar_resnet", cfg, model.state_dict(), {"note": "x"})
    loaded, ckpt = load_model(tmp_path / "m.pt")
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(model(x), loaded(x))
    assert ckpt["meta"] == {"note": "x"} and ckpt["arch_config"] == cfg
    # weights_only: the file holds tensors and plain data only
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert set(raw) == {"arch", "arch_config", "state_dict", "meta"}


def test_mismatched_weights_are_refused(tmp_path: Path) -> None:
    small = build_model("resnet_tiny", num_classes=3, in_channels=1)
    save_checkpoint(tmp_path / "m.pt", "resnet20", {"num_classes": 3, "in_channels": 1}, small.state_dict())
    with pytest.raises(CheckpointError, match="weights do not match resnet20"):
        load_model(tmp_path / "m.pt")
    state = build_model("resnet_tiny", num_classes=3, in_channels=1).state_dict()
    state.pop("fc.bias")
    save_checkpoint(tmp_path / "m2.pt", "resnet_tiny", {"num_classes": 3, "in_channels": 1}, state)
    with pytest.raises(CheckpointError, match="fc.bias"):
        load_model(tmp_path / "m2.pt")


def test_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a slimdeploy checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="num_classes"):
        save_checkpoint(tmp_path / "x.pt", "resnet_tiny", {"in_channels": 1}, {})


def test_unwrap_ddp_like_wrappers() -> None:
    inner = torch.nn.Linear(2, 2)

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = inner

    assert unwrap(Wrapper()) is inner and unwrap(inner) is inner


def test_user_arch_goes_through_checkpoint_slim_and_export(tmp_path: Path) -> None:
    """An architecture of the user's own (user_models/example.py) is an ordinary model downstream:
    the checkpoint stores its ``module:callable`` name and rebuilds it, the slimmed network equals
    the masked one and reloads from its channel manifest, and ONNX matches PyTorch."""
    from pipeline.runtimes import export_onnx, ort_logits, ort_session
    from pipeline.slim import channel_groups, load_slimmed_model, random_masks, slim
    from tests.conftest import randomise_bn

    arch, cfg = "user_models.example:build", {"num_classes": 4, "in_channels": 1, "width": 8}
    torch.manual_seed(0)
    model = randomise_bn(build_model(arch, **cfg))
    save_checkpoint(tmp_path / "m.pt", arch, cfg, model.state_dict())
    loaded, ckpt = load_model(tmp_path / "m.pt")
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert ckpt["arch"] == arch and torch.equal(model(x), loaded(x))

    example = torch.zeros(1, 1, 8, 8)
    groups = channel_groups(loaded, example)
    residual = next(g for g in groups if ("stem.0", "out") in g.members)
    assert ("conv2.0", "out") in residual.members  # the addition couples the stem and the block's output
    assert {g.name for g in groups} >= {"conv1.0", "down.0"}
    masks = random_masks(groups, 0.3, 0.6, torch.Generator().manual_seed(0))
    result = slim(loaded, example, masks, check_inputs=x)
    assert result.max_abs_diff <= 1e-4
    assert sum(p.numel() for p in result.model.parameters()) < 0.7 * sum(p.numel() for p in model.parameters())
    save_checkpoint(tmp_path / "s.pt", arch, cfg, result.model.state_dict(),
                    channel_manifest={"input_shape": [1, 8, 8], "kept": result.kept})
    slimmed, _ = load_slimmed_model(tmp_path / "s.pt")
    with torch.no_grad():
        assert torch.equal(slimmed(x), result.model(x))
        onnx = export_onnx(slimmed, (1, 8, 8), tmp_path / "m.onnx")
        diff = (ort_logits(ort_session(onnx), x) - slimmed(x)).abs().max().item()
    assert diff <= 1e-4, f"ONNX differs from PyTorch by {diff}"
