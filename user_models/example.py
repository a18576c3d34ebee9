"""An example architecture of your own: ``arch: user_models.example:build`` in params.yaml.

A small plain CNN with one residual block, to copy from. What the pipeline needs from a model:
it takes ``(N, in_channels, H, W)`` and returns class logits ``(N, num_classes)``; its layers are
standard ``nn`` modules (Conv2d, BatchNorm2d, ReLU, pooling, Linear, additions), which is what
channel pruning, slimming and ONNX export trace; and everything that decides its shapes comes
from the arguments, so a checkpoint (``arch`` + ``arch_config``) rebuilds it exactly.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class TinyNet(nn.Module):
    """stem (width) -> residual block (width) -> strided conv (2 x width) -> global pool -> linear."""

    def __init__(self, num_classes: int, in_channels: int, width: int = 8) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(in_channels, width)
        self.conv1 = _conv_bn_relu(width, width)
        self.conv2 = nn.Sequential(nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width))
        self.relu = nn.ReLU(inplace=True)
        self.down = _conv_bn_relu(width, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.relu(x + self.conv2(self.conv1(x)))  # (N, width, H, W): the residual addition
        x = self.down(x)  # (N, 2 width, H/2, W/2)
        return self.fc(self.pool(x).flatten(1))


def build(num_classes: int, in_channels: int, width: int = 8) -> nn.Module:
    """The entry point params.yaml names: ``arch: user_models.example:build``,
    ``arch_config: {width: 16}``."""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    return TinyNet(num_classes, in_channels, width)
