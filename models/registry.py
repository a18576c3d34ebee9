"""Model registry: every architecture is built by name from plain-data arguments.

A checkpoint stores ``arch`` and ``arch_config`` (including ``num_classes`` and ``in_channels``),
so ``build_model(arch, **arch_config)`` always rebuilds the exact module its weights belong to.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from models.errors import ConfigError

Builder = Callable[..., nn.Module]
_REGISTRY: dict[str, Builder] = {}
TORCHVISION_PREFIX = "torchvision:"


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``fn(num_classes, in_channels, **config) -> nn.Module`` as ``name``."""

    def wrap(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    """Registered names; any torchvision classifier is also accepted as ``torchvision:<name>``."""
    return sorted(_REGISTRY)


def is_known(arch: str) -> bool:
    if arch.startswith(TORCHVISION_PREFIX):
        from models.torchvision_models import torchvision_classifier_names

        return arch[len(TORCHVISION_PREFIX) :] in torchvision_classifier_names()
    return arch in _REGISTRY


def unknown_arch_message(arch: str) -> str:
    return (
        f"unknown architecture {arch!r}; registered: {', '.join(list_models())}, "
        f"or any torchvision classifier as '{TORCHVISION_PREFIX}<name>' (e.g. torchvision:resnet18)"
    )


def build_model(arch: str, *, num_classes: int, in_channels: int, **config: Any) -> nn.Module:
    """Build ``arch`` for ``num_classes`` outputs and ``in_channels`` input planes.

    Raises ConfigError naming the architecture and the allowed keys when ``config`` does not fit.
    """
    if arch.startswith(TORCHVISION_PREFIX):
        from models.torchvision_models import build_torchvision

        if not is_known(arch):
            raise ConfigError(unknown_arch_message(arch))
        builder: Builder = build_torchvision
        config = {"name": arch[len(TORCHVISION_PREFIX) :], **config}
    else:
        if arch not in _REGISTRY:
            raise ConfigError(unknown_arch_message(arch))
        builder = _REGISTRY[arch]
    params = inspect.signature(builder).parameters
    allowed = [p for p in params if p not in ("num_classes", "in_channels", "name")]
    unknown = sorted(set(config) - set(params))
    if unknown:
        raise ConfigError(
            f"arch_config for {arch!r} has unknown key(s) {unknown}; allowed: {allowed}"
        )
    try:
        return builder(num_classes=num_classes, in_channels=in_channels, **config)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"arch_config for {arch!r} is invalid: {err}") from err
