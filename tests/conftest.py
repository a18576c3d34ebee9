"""Shared fixtures: tiny prepared digits, image-folder factories, a CPU-only torch setup."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pipeline.config import PrepareConfig
from pipeline.data import PreparedData, load_prepared, load_source, prepare_splits, save_prepared

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(1)


def prepare_cfg(**overrides: object) -> PrepareConfig:
    base = {"source": "digits", "image_size": 8}
    return PrepareConfig.model_validate({**base, **overrides})


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = prepare_cfg()
    out = tmp_path_factory.mktemp("digits") / "prepared"
    splits, meta = prepare_splits(load_source(cfg), cfg)
    save_prepared(out, splits, meta)
    return out


@pytest.fixture(scope="session")
def digits(digits_dir: Path) -> PreparedData:
    return load_prepared(digits_dir)


def write_image(path: Path, size: int = 12, seed: int = 0, fmt: str = "PNG", channels: int = 3) -> None:
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if channels == 3 else (size, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path, format=fmt)


def make_imagefolder(
    root: Path, classes: tuple[str, ...] = ("cat", "dog", "eel"), per_class: int = 8,
    splits: tuple[str, ...] = ("train",), size: int = 12, fmt: str = "JPEG",
) -> Path:
    """root/<split>/<class>/NNN.jpg with random pixels."""
    ext = "jpg" if fmt == "JPEG" else fmt.lower()
    for s in splits:
        for ci, c in enumerate(classes):
            for i in range(per_class):
                write_image(root / s / c / f"{i:03d}.{ext}", size, seed=zlib.crc32(f"{s}/{ci}/{i}".encode()), fmt=fmt)
    return root


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and shifts, so a removed channel would carry a constant (BN shift
    through ReLU) if masking did not zero it, and a residual branch is not the identity its
    zero-initialised last BN makes it: equivalence then really is tested. Returns ``model.eval()``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(torch.rand(n, generator=gen) - 0.3)
                m.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
    return model.eval()
