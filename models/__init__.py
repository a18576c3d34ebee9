"""Architectures and their registry. Importing this package registers every built-in model."""

from models import mobilenetv2_cifar, resnet_cifar  # noqa: F401  (registration side effects)
from models.registry import build_model, is_known, list_models, register

__all__ = ["build_model", "is_known", "list_models", "register"]
