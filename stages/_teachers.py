"""Loading trained teachers and the trained student (shared by the stages that distil or prune)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from pipeline.checkpoint import load_model
from pipeline.errors import CheckpointError


def load_teachers(teachers_dir: str | Path, names: list[str], data_meta: dict[str, Any]) -> dict[str, nn.Module]:
    """name -> eval-mode model; refuses teachers trained on other data."""
    out = {}
    for name in names:
        model, ckpt = load_model(Path(teachers_dir) / f"{name}.pt")
        if ckpt["meta"].get("data_hash") != data_meta["split_hashes"]["train"]:
            raise CheckpointError(f"teacher {name} was trained on other data; re-run train_teacher@{name}")
        out[name] = model.eval()
    return out


def load_student(path: str | Path, data_meta: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """The trained student (eval mode) and its checkpoint; refuses one trained on other data."""
    model, ckpt = load_model(path)
    if ckpt["meta"].get("data_hash") != data_meta["split_hashes"]["train"]:
        raise CheckpointError(f"student {path} was trained on other data; re-run train_student")
    return model.eval(), ckpt
