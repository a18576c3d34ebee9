"""CIFAR-style ResNet (He et al. 2016, section 4.2): 3x3 stem, three stages of BasicBlocks.

``stem_stride`` fits the stem to the input: 1 (CIFAR's, for images of about 32 px), 2 (the stem's
convolution at stride 2) or 4 (stride 2 and a 3x3 max-pool at stride 2, ImageNet-style), so the
same family works at 96-224 px without running its first stage at full resolution.

Every width is explicit so that searched or slimmed networks are ordinary registry models:
``stem_width``; per stage the output ``stage_widths[s]`` and the number of ``blocks[s]``; per block
the inner width ``mid_widths[s][b]`` (the channels between the two 3x3 convolutions, the ones
pruning removes inside the residual branch). Shortcuts are identity when shape is kept and a
1x1 convolution + BatchNorm when width or resolution changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.registry import register

STEM_STRIDES = (1, 2, 4)


def stem_stride_for(image_size: int) -> int:
    """The stem's stride for square inputs of ``image_size`` px: 1 up to 32 px (CIFAR), 2 up to
    64 px, 4 above (so the first stage runs at 16-56 px for inputs of 64-224 px)."""
    return 1 if image_size <= 32 else 2 if image_size <= 64 else 4


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
    ]


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU. Input (N, c_in, H, W)."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c_in, c_mid, 3, stride)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = _conv_bn(c_mid, c_out, 3, 1)
        self.shortcut: nn.Module
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(*_conv_bn(c_in, c_out, 1, stride))
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        blocks: Sequence[int],
        stage_widths: Sequence[int],
        stem_width: int | None = None,
        mid_widths: Sequence[Sequence[int]] | None = None,
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        if stem_stride not in STEM_STRIDES:
            raise ValueError(f"stem_stride must be one of {STEM_STRIDES}, got {stem_stride!r}")
        if len(blocks) != len(stage_widths) or not blocks:
            raise ValueError(
                f"blocks ({list(blocks)}) and stage_widths ({list(stage_widths)}) need the same "
                "non-zero length"
            )
        if any(b < 1 for b in blocks) or any(w < 1 for w in stage_widths):
            raise ValueError("every stage needs at least 1 block and width >= 1")
        stem_width = stem_width or stage_widths[0]
        if mid_widths is None:
            mid_widths = [[w] * b for w, b in zip(stage_widths, blocks)]
        if [len(m) for m in mid_widths] != list(blocks) or any(
            c < 1 for m in mid_widths for c in m
        ):
            raise ValueError(
                f"mid_widths must give one width >= 1 per block, shaped like blocks={list(blocks)}"
            )
        stem = [*_conv_bn(in_channels, stem_width, 3, min(stem_stride, 2)), nn.ReLU(inplace=True)]
        if stem_stride == 4:
            stem.append(nn.MaxPool2d(3, stride=2, padding=1))
        self.stem = nn.Sequential(*stem)
        stages: list[nn.Module] = []
        c_in = stem_width
        for s, (n, c_out) in enumerate(zip(blocks, stage_widths)):
            layers = []
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                layers.append(BasicBlock(c_in, mid_widths[s][b], c_out, stride))
                c_in = c_out
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # Zero-init the last BN of each residual branch: every block starts as identity.
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _depth_to_blocks(depth: int, num_stages: int = 3) -> list[int]:
    if (depth - 2) % (2 * num_stages) != 0 or depth < 2 + 2 * num_stages:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, 110, ...), got {depth}")
    return [(depth - 2) // (2 * num_stages)] * num_stages


@register("cifar_resnet")
def cifar_resnet(
    num_classes: int,
    in_channels: int,
    blocks: Sequence[int] = (3, 3, 3),
    stage_widths: Sequence[int] = (16, 32, 64),
    stem_width: int | None = None,
    mid_widths: Sequence[Sequence[int]] | None = None,
    stem_stride: int = 1,
) -> CifarResNet:
    """Fully explicit CIFAR ResNet; the form searched and slimmed networks are saved in."""
    return CifarResNet(num_classes, in_channels, blocks, stage_widths, stem_width, mid_widths, stem_stride)


def _preset(depth: int):  # noqa: ANN202 - returns a registry builder
    def build(
        num_classes: int,
        in_channels: int,
        stage_widths: Sequence[int] = (16, 32, 64),
        width_mult: float = 1.0,
        stem_stride: int = 1,
    ) -> CifarResNet:
        if width_mult <= 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")
        widths = [max(1, round(w * width_mult)) for w in stage_widths]
        return CifarResNet(num_classes, in_channels, _depth_to_blocks(depth), widths, stem_stride=stem_stride)

    build.__doc__ = f"ResNet-{depth} for CIFAR-sized inputs (3 stages of {(depth - 2) // 6} blocks)."
    return build


for _depth in (20, 32, 44, 56, 110):
    register(f"resnet{_depth}")(_preset(_depth))


@register("resnet_tiny")
def resnet_tiny(num_classes: int, in_channels: int) -> CifarResNet:
    """One block per stage, widths 4/8/8: for tests, runs in milliseconds."""
    return CifarResNet(num_classes, in_channels, (1, 1, 1), (4, 8, 8))
