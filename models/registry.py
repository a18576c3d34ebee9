"""Model registry: every architecture is built by name from plain-data arguments.

Three kinds of names: a registered one (``resnet20``), ``torchvision:<name>`` (any torchvision
classifier), and ``package.module:callable``, an architecture of the user's own: a callable
importable from the project, called as ``callable(num_classes=..., in_channels=..., **config)``
and returning an ``nn.Module``. Its module must live in ``user_models/`` (or ``models/``) when it
is a file of this project, because those are the folders dvc.yaml lists as dependencies of the
stages that build models; an installed package is the environment's, like torch.

A checkpoint stores ``arch`` and ``arch_config`` (including ``num_classes`` and ``in_channels``),
so ``build_model(arch, **arch_config)`` always rebuilds the exact module its weights belong to.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from models.errors import ConfigError

Builder = Callable[..., nn.Module]
_REGISTRY: dict[str, Builder] = {}
TORCHVISION_PREFIX = "torchvision:"
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
USER_ARCH = re.compile(rf"^(?P<module>{_IDENT}(?:\.{_IDENT})*):(?P<attr>{_IDENT}(?:\.{_IDENT})*)$")
PROJECT = Path(__file__).resolve().parents[1]
USER_FOLDERS = ("user_models", "models")  # the project folders dvc.yaml tracks for model code


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


def is_user_arch(arch: str) -> bool:
    """True for ``package.module:callable`` (checked by form only: nothing is imported)."""
    return not arch.startswith(TORCHVISION_PREFIX) and USER_ARCH.match(arch) is not None


def is_known(arch: str) -> bool:
    """A registered name, an existing torchvision classifier, or a well-formed
    ``package.module:callable`` (whether that imports is checked by ``build_model``)."""
    if arch.startswith(TORCHVISION_PREFIX):
        from models.torchvision_models import torchvision_classifier_names

        return arch[len(TORCHVISION_PREFIX) :] in torchvision_classifier_names()
    return arch in _REGISTRY or is_user_arch(arch)


def unknown_arch_message(arch: str) -> str:
    return (
        f"unknown architecture {arch!r}; registered: {', '.join(list_models())}, "
        f"or any torchvision classifier as '{TORCHVISION_PREFIX}<name>' (e.g. torchvision:resnet18), "
        "or your own as 'package.module:callable' (e.g. user_models.example:build)"
    )


def user_builder(arch: str) -> Builder:
    """Import the callable named by ``package.module:callable``. ConfigError when the module does
    not import (naming the import error), is a project file outside ``user_models/``, lacks the
    attribute, or the attribute is not callable."""
    m = USER_ARCH.match(arch)
    if m is None:
        raise ConfigError(unknown_arch_message(arch))
    module_name, attr = m["module"], m["attr"]
    _check_tracked(arch, module_name)
    try:
        obj: Any = importlib.import_module(module_name)
    except (ImportError, SyntaxError) as err:
        missing = getattr(err, "name", None)
        itself = isinstance(err, ModuleNotFoundError) and missing is not None and (
            module_name == missing or module_name.startswith(missing + "."))
        hint = ("put your model in user_models/<file>.py and name it user_models.<file>:<callable> (stages run from "
                "the project root)") if itself else "fix that import in the module (its own imports must work)"
        raise ConfigError(f"architecture {arch!r}: module {module_name!r} does not import: "
                          f"{type(err).__name__}: {err}; {hint}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"architecture {arch!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"architecture {arch!r}: {attr!r} is not callable (it is a {type(obj).__name__}); name a "
                          "function or nn.Module class taking num_classes, in_channels and the arch_config keys")
    return obj


def _check_tracked(arch: str, module_name: str) -> None:
    # a project file outside the tracked folders would change without re-running any stage
    top = module_name.split(".")[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return  # reported by the import itself
    if spec is None or not spec.has_location or not spec.origin or top in USER_FOLDERS:
        return  # not found (the import reports it), built in, or a tracked folder
    origin = Path(spec.origin).resolve()
    in_project = origin.parent == PROJECT or (origin.name == "__init__.py" and origin.parent.parent == PROJECT)
    if in_project:
        raise ConfigError(f"architecture {arch!r}: {origin.relative_to(PROJECT)} is a project file outside "
                          f"user_models/, which dvc.yaml does not list as a dependency (a change would not "
                          f"re-run the stages); move it to user_models/ and name it user_models.<file>:<callable>")


def build_model(arch: str, *, num_classes: int, in_channels: int, **config: Any) -> nn.Module:
    """Build ``arch`` for ``num_classes`` outputs and ``in_channels`` input planes.

    Raises ConfigError naming the architecture and the allowed keys when ``config`` does not fit.
    """
    user = False
    if arch.startswith(TORCHVISION_PREFIX):
        from models.torchvision_models import build_torchvision

        if not is_known(arch):
            raise ConfigError(unknown_arch_message(arch))
        builder: Builder = build_torchvision
        config = {"name": arch[len(TORCHVISION_PREFIX) :], **config}
    elif arch in _REGISTRY:
        builder = _REGISTRY[arch]
    elif is_user_arch(arch):
        builder, user = user_builder(arch), True
    else:
        raise ConfigError(unknown_arch_message(arch))
    _check_signature(arch, builder, config, user)
    try:
        model = builder(num_classes=num_classes, in_channels=in_channels, **config)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"arch_config for {arch!r} is invalid: {err}") from err
    if not isinstance(model, nn.Module):
        raise ConfigError(f"architecture {arch!r} returned a {type(model).__name__}, not a torch nn.Module")
    return model


def _check_signature(arch: str, builder: Builder, config: dict[str, Any], user: bool) -> None:
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):  # a builtin without a signature: the call itself will tell
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    if user:
        lacking = [k for k in ("num_classes", "in_channels") if k not in params]
        if lacking:
            raise ConfigError(f"architecture {arch!r} must accept the keyword arguments num_classes and in_channels "
                              f"(lacks {', '.join(lacking)})")
    allowed = [p for p in params if p not in ("num_classes", "in_channels", "name")]
    unknown = sorted(set(config) - set(params))
    if unknown:
        raise ConfigError(
            f"arch_config for {arch!r} has unknown key(s) {unknown}; allowed: {allowed}"
        )
