"""Checkpoints are plain data: ``{arch, arch_config, state_dict, meta}``.

``arch_config`` holds every constructor argument (``num_classes`` and ``in_channels`` included),
so loading rebuilds the module from the registry and loads the weights strictly. Nothing is
pickled: loading uses ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models import build_model
from pipeline.errors import CheckpointError
from pipeline.io import torch_save, write_json

REQUIRED_KEYS = ("arch", "arch_config", "state_dict", "meta")


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(
    path: str | Path,
    arch: str,
    arch_config: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    meta: dict[str, Any] | None = None,
    channel_manifest: dict[str, Any] | None = None,
) -> None:
    """Write atomically. ``arch_config`` must contain ``num_classes`` and ``in_channels``.

    ``channel_manifest`` (slimmed models): ``{"input_shape": [C, H, W], "kept": {group: [idx]}}``;
    the model is then rebuilt as ``arch`` with those channels removed before the weights load.
    """
    for key in ("num_classes", "in_channels"):
        if key not in arch_config:
            raise ValueError(f"arch_config needs {key!r} to rebuild the model")
    state = {k: v.detach().cpu() for k, v in state_dict.items()}
    ckpt = {"arch": arch, "arch_config": dict(arch_config), "state_dict": state, "meta": meta or {}}
    if channel_manifest is not None:
        ckpt["channel_manifest"] = channel_manifest
    torch_save(ckpt, path)


def arch_file(checkpoint: str | Path) -> Path:
    """``<stem>.arch.json`` next to the checkpoint ``<stem>.pt``: its architecture alone, which the
    latency table is built from (a DVC dependency that does not change when only the weights do)."""
    return Path(checkpoint).with_suffix(".arch.json")


def write_arch_file(checkpoint: str | Path, arch: str, arch_config: dict[str, Any]) -> None:
    write_json(arch_file(checkpoint), {"arch": arch, "arch_config": dict(arch_config)})


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; run the stage that writes it")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    missing = [k for k in REQUIRED_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a slimdeploy checkpoint (missing {missing})")
    return ckpt


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the checkpoint's model from the registry and load its weights strictly (eval mode).
    Slimmed checkpoints (with a channel manifest) load through ``pipeline.slim.load_slimmed_model``."""
    ckpt = load_checkpoint(path)
    if "channel_manifest" in ckpt:
        raise CheckpointError(f"{path} is a slimmed checkpoint; load it with pipeline.slim.load_slimmed_model")
    model = build_model(ckpt["arch"], **ckpt["arch_config"])
    return load_weights(model, ckpt, path)


def load_weights(model: nn.Module, ckpt: dict[str, Any], path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not match {ckpt['arch']} {ckpt['arch_config']}: {err}") from err
    return model.eval(), ckpt


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
