"""MobileNetV2 (Sandler et al. 2018) adapted to 32x32 inputs: stride-1 stem and first stride-2
stage moved to stride 1, so a 32x32 image reaches the head at 4x4 instead of 1x1."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.registry import register

# (expansion t, output channels c, repeats n, first stride s), CIFAR variant.
CIFAR_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Round to a multiple of ``divisor`` without dropping more than 10% (as in the paper)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 project (linear), identity added when shapes match."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(True),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2Cifar(nn.Module):
    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        width_mult: float = 1.0,
        settings: Sequence[Sequence[int]] = CIFAR_SETTINGS,
        last_channels: int = 1280,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")
        c = _make_divisible(32 * width_mult)
        last = _make_divisible(last_channels * max(1.0, width_mult))
        features: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(in_channels, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU6(True))
        ]
        for t, ch, n, s in settings:
            c_out = _make_divisible(ch * width_mult)
            for i in range(n):
                features.append(InvertedResidual(c, c_out, s if i == 0 else 1, t))
                c = c_out
        features.append(
            nn.Sequential(nn.Conv2d(c, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(True))
        )
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


@register("mobilenetv2")
def mobilenetv2(
    num_classes: int,
    in_channels: int,
    width_mult: float = 1.0,
    last_channels: int = 1280,
    dropout: float = 0.0,
) -> MobileNetV2Cifar:
    """CIFAR MobileNetV2 with a width multiplier (channels rounded to multiples of 8)."""
    return MobileNetV2Cifar(num_classes, in_channels, width_mult, CIFAR_SETTINGS, last_channels, dropout)


@register("mobilenetv2_tiny")
def mobilenetv2_tiny(num_classes: int, in_channels: int) -> MobileNetV2Cifar:
    """Three short stages at width 0.25: for tests."""
    settings = ((1, 16, 1, 1), (6, 24, 1, 2), (6, 32, 2, 2))
    return MobileNetV2Cifar(num_classes, in_channels, 0.25, settings, last_channels=64)
