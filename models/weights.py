"""Weights from outside the pipeline, loaded into a model built by the registry.

Two sources:

- a **file**: a plain state_dict (``torch.save(model.state_dict(), path)``), a torchvision
  ``.pth`` (also a state_dict), or a checkpoint that wraps one under ``state_dict`` (ours:
  ``{arch, arch_config, state_dict, meta}``) or ``model`` (torchvision's reference scripts);
- a **torchvision weights name** (``IMAGENET1K_V1``, ``DEFAULT``, ``ResNet18_Weights.IMAGENET1K_V1``)
  of a ``torchvision:<name>`` architecture, resolved by torchvision's own weights enum and read
  from the torch hub cache (``torch.hub.get_dir()/checkpoints/<file>``) through
  ``load_state_dict_from_url``. Nothing is downloaded: a file missing from the cache is an error
  that says where to put it.

Every file is read with ``torch.load(weights_only=True)``: a pickle that needs code to load (a
whole pickled ``nn.Module``) is refused, never executed.

``fit_state_dict`` loads the weights strictly except for two documented adaptations: the
classifier head (the last ``nn.Linear``, or the last ``nn.Conv2d`` of a model without one) is
replaced by the model's own fresh initialisation when only its number of outputs differs (other
classes), and the first convolution is adapted when only its input channels differ (grey images:
the RGB kernels are summed, which is exact for a grey image repeated on three channels; any other
count: fresh initialisation). Anything else that does not fit is an error naming the first
mismatched keys. This module imports nothing from ``pipeline``.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from models.errors import ConfigError
from models.registry import TORCHVISION_PREFIX

# "IMAGENET1K_V1", "DEFAULT" or "ResNet18_Weights.IMAGENET1K_V1": never a file path (no "/", no
# lower-case extension), so a weights value is one or the other without a second key
_NAME = re.compile(r"^(?:(?P<enum>[A-Za-z][A-Za-z0-9_]*_Weights)\.)?(?P<member>[A-Z][A-Z0-9_]*)$")
_WRAPPERS = ("state_dict", "model")  # our checkpoints / torchvision's reference training scripts
_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel / torch.compile wrappers
SHOW = 5  # mismatched keys named in an error, per kind


class WeightsError(ConfigError):
    """The weights a model entry names cannot be read, or do not fit its architecture."""


def is_weights_name(value: str) -> bool:
    """True for a torchvision weights name (``IMAGENET1K_V1``, ``ResNet18_Weights.DEFAULT``),
    False for anything else (a file path)."""
    return _NAME.match(value) is not None


def torchvision_weights(arch: str, name: str) -> Any:
    """The torchvision ``WeightsEnum`` member ``name`` of ``arch`` (``torchvision:<model>``).
    WeightsError names the allowed values when ``arch`` has no such weights."""
    m = _NAME.match(name)
    if m is None:
        raise WeightsError(f"{name!r} is not a torchvision weights name such as IMAGENET1K_V1")
    if not arch.startswith(TORCHVISION_PREFIX):
        raise WeightsError(f"weights name {name!r} needs a torchvision:<name> architecture (got {arch!r}); for "
                           f"{arch!r} give a weights file instead")
    from models.tvcompat import import_torchvision

    tv = import_torchvision()
    model_name = arch[len(TORCHVISION_PREFIX):]
    try:
        enum = tv.models.get_model_weights(model_name)
    except (ValueError, KeyError) as err:
        raise WeightsError(f"torchvision has no pretrained weights for {arch}: {err}") from None
    members = list(enum.__members__)
    if m["enum"] is not None and m["enum"] != enum.__name__:
        raise WeightsError(f"{name!r} names {m['enum']}, but the weights of {arch} are {enum.__name__} "
                           f"({', '.join(members)})")
    if m["member"] not in enum.__members__:
        raise WeightsError(f"{arch} has no weights {m['member']!r}; available: {', '.join(members)}")
    return enum[m["member"]]


def hub_cache_file(weights: Any) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` looks for ``weights.url``: the hub directory
    (``$TORCH_HOME/hub``, default ``~/.cache/torch/hub``) + ``checkpoints/`` + the URL's file name."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def load_torchvision_state_dict(weights: Any) -> tuple[dict[str, torch.Tensor], Path]:
    """State dict of a torchvision weights enum member, from the hub cache only (offline), and
    the cached file it came from. WeightsError says where to place the file when it is missing."""
    path = hub_cache_file(weights)
    if not path.is_file():
        raise WeightsError(
            f"torchvision weights {weights} are not in the torch hub cache: expected {path}. Nothing is downloaded "
            f"here; on a machine with internet download {weights.url} (e.g. `python -c \"import torch; "
            f"torch.hub.load_state_dict_from_url('{weights.url}')\"`, which fills that machine's cache) and copy the "
            f"file to {path}, or set TORCH_HOME to a folder whose hub/checkpoints/ holds it")
    try:  # torchvision's own loading path: finds the cached file and reads it
        state = weights.get_state_dict(progress=False, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightsError(_pickle_message(path, err)) from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise WeightsError(f"cannot read torchvision weights {path}: {err}") from None
    return _as_state_dict(state, path), path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a weights file (see the module docstring for the accepted forms), read
    with ``weights_only=True``; DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) prefixes
    are stripped."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightsError(_pickle_message(path, err)) from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise WeightsError(f"cannot read weights file {path}: {err}") from None
    if isinstance(obj, Mapping) and "channel_manifest" in obj:
        raise WeightsError(f"{path} is a slimmed checkpoint (it has a channel manifest): its layers are narrower "
                           "than the architecture it names; give the unpruned model's weights")
    return _as_state_dict(obj, path)


def _pickle_message(path: Path, err: Exception) -> str:
    # torch names the class the pickle needs ("Unsupported global: GLOBAL pkg.mod.Net was not ..."):
    # worth showing; its advice to allowlist that class is exactly what is not done here
    needs = re.search(r"GLOBAL (\S+)", str(err))
    what = f" ({needs.group(1)})" if needs else ""
    return (f"weights file {path} is a pickle that needs code to load{what}, e.g. a whole model saved with "
            "torch.save(model); it is refused rather than run. Save the weights alone: "
            "torch.save(model.state_dict(), path)")


def _as_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _WRAPPERS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        what = f"keys {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping) else type(obj).__name__
        raise WeightsError(f"{path} holds no state_dict (a mapping of parameter names to tensors); found {what}")
    state = {str(k): v for k, v in obj.items()}
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


@dataclass
class WeightsFit:
    """What ``fit_state_dict`` changed. ``replaced``: keys left at the model's fresh
    initialisation (head of another class count); ``adapted``: keys converted (first conv)."""

    replaced: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)


def _last(model: nn.Module, kind: type[nn.Module]) -> str | None:
    names = [n for n, m in model.named_modules() if isinstance(m, kind)]
    return names[-1] if names else None


def _first_conv(model: nn.Module) -> str | None:
    return next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


def fit_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> WeightsFit:
    """Load ``state`` into ``model`` (modified in place) by the rule in the module docstring.

    ``source`` names the weights in messages. WeightsError lists the first missing, unexpected
    and shape-mismatched keys (file shape against model shape) when anything else differs.
    A missing ``*.num_batches_tracked`` (older BatchNorm files) keeps the model's value.
    """
    own = model.state_dict()
    head = _last(model, nn.Linear) or _last(model, nn.Conv2d)
    head_keys = {f"{head}.weight", f"{head}.bias"} if head else set()
    conv = _first_conv(model)
    conv_key = f"{conv}.weight" if conv else None
    fit = WeightsFit()
    merged = dict(own)
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = []
    for key, theirs in state.items():
        mine = own.get(key)
        if mine is None:
            continue
        if theirs.shape == mine.shape:
            merged[key] = theirs.to(mine.dtype)
        elif key in head_keys and theirs.shape[1:] == mine.shape[1:]:
            fit.replaced.append(key)  # other classes: the model's own fresh head
        elif key == conv_key and theirs.dim() == 4 and (theirs.shape[0], *theirs.shape[2:]) == (
                mine.shape[0], *mine.shape[2:]):
            if mine.shape[1] == 1:  # grey input: exact for a grey image repeated on every channel
                merged[key] = theirs.sum(1, keepdim=True).to(mine.dtype)
                fit.adapted.append(key)
            else:
                fit.replaced.append(key)
        else:
            shapes.append(f"{key} {tuple(theirs.shape)} vs {tuple(mine.shape)}")
    if missing or unexpected or shapes:
        parts = [f"{what} ({len(keys)}): {', '.join(keys[:SHOW])}{', ...' if len(keys) > SHOW else ''}"
                 for what, keys in (("missing in the weights", missing), ("unexpected in the weights", unexpected),
                                    ("shape differs (weights vs model)", shapes)) if keys]
        raise WeightsError(f"{source} does not fit the model: " + "; ".join(parts)
                           + ". Weights of another architecture (or other arch_config) cannot be loaded; only the "
                           "classifier head's class count and the first convolution's input channels may differ")
    model.load_state_dict(merged, strict=True)
    return fit

