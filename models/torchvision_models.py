"""Any torchvision classifier by name, with random weights (nothing is downloaded), adapted to
the dataset's number of input channels and classes."""

from __future__ import annotations

from functools import cache

from torch import nn

from models.tvcompat import import_torchvision


@cache
def torchvision_classifier_names() -> frozenset[str]:
    tv = import_torchvision()
    return frozenset(tv.models.list_models(module=tv.models))


def _first_conv(model: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            parent_name, _, child = name.rpartition(".")
            return model.get_submodule(parent_name) if parent_name else model, child, module
    raise ValueError("model has no Conv2d to adapt to the input channels")


def build_torchvision(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, num_classes=...)`` with the first
    convolution rebuilt for ``in_channels`` when it is not 3."""
    tv = import_torchvision()
    model = tv.models.get_model(name, weights=None, num_classes=num_classes)
    if in_channels != 3:
        parent, child, conv = _first_conv(model)
        if conv.groups != 1:
            raise ValueError(f"torchvision:{name}: first convolution is grouped; cannot adapt")
        new = nn.Conv2d(
            in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
        )
        setattr(parent, child, new)
    return model
