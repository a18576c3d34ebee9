"""The supernet of the differentiable width and depth search over the CIFAR ResNet family (TAS,
Dong & Yang 2019); the search loop is ``pipeline.search``.

The supernet has the largest member's shape. Every searchable convolution computes its full
width once; candidate width ``C_j`` uses the first ``C_j`` output channels with its own
BatchNorm, and an alignment brings every candidate back to the full width so candidates can be
mixed: channel-wise interpolation (``align="cwi"``, TAS: adaptive average pooling along the
channel axis) or zero padding (``align="pad"``, the default; see docs/history.md for why: on
short searches the CWI supernet barely trains, because a channel's meaning changes with the width
drawn). Per forward pass two
candidates are drawn from ``softmax((log_softmax(alpha) + Gumbel) / tau)`` without gradient
through the draw; their mixing weights are the softmax of those logits restricted to the two, so
the gradient reaches ``alpha``. A stage's output mixes the outputs after each candidate depth
with Gumbel-softmax weights over ``beta``. The expected parameter count is differentiable in
``alpha`` and ``beta`` and drives the TAS cost loss toward the budget.

Searched widths: each block's inner width (``mid_widths``) and each stage's output width (shared
by the blocks of the stage and the stem, which the residual additions couple). Searched depth:
blocks per stage, 1..max.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.resnet_cifar import STEM_STRIDES
from pipeline.errors import ConfigError

WIDTH_RATIOS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def cwi(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Channel-wise interpolation of (B, C, H, W) to (B, channels, H, W) by average pooling."""
    if x.shape[1] == channels:
        return x
    return F.adaptive_avg_pool3d(x.unsqueeze(1), (channels, x.shape[2], x.shape[3])).squeeze(1)


def pad_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Zero-padding alignment: the candidate's channels first, zeros after (slimmable-network
    style), so channel k means the same thing whichever width was drawn."""
    return x if x.shape[1] == channels else F.pad(x, (0, 0, 0, 0, 0, channels - x.shape[1]))


ALIGN = {"cwi": cwi, "pad": pad_channels}


def candidate_widths(full: int, ratios: Sequence[float]) -> list[int]:
    return sorted({max(1, round(r * full)) for r in ratios})


class WidthChoice(nn.Module):
    """Architecture logits over candidate widths of one (or several coupled) convolutions."""

    def __init__(self, full: int, ratios: Sequence[float]) -> None:
        super().__init__()
        self.widths = candidate_widths(full, ratios)
        self.full = full
        self.alpha = nn.Parameter(torch.zeros(len(self.widths)))
        self.tau = 1.0
        self.mode = "sample"  # "sample" | "argmax"
        self._draw: tuple[torch.Tensor, torch.Tensor] | None = None

    def probs(self) -> torch.Tensor:
        return F.softmax(self.alpha, dim=0)

    def expected(self) -> torch.Tensor:
        return self.probs() @ torch.tensor(self.widths, dtype=self.alpha.dtype, device=self.alpha.device)

    def argmax_width(self) -> int:
        return self.widths[int(self.alpha.argmax())]

    def resample(self) -> None:
        """Draw two distinct candidates for the next forward pass (shared by coupled convs)."""
        if self.mode == "argmax" or len(self.widths) == 1:
            self._draw = None
            return
        g = (F.log_softmax(self.alpha, 0) - torch.log(-torch.log(torch.rand_like(self.alpha).clamp(1e-9, 1 - 1e-9)))) / self.tau
        # At small tau the softmax underflows to one non-zero entry and multinomial cannot draw two
        # distinct candidates; the floor only changes entries that underflowed.
        idx = torch.multinomial(F.softmax(g.detach(), 0).clamp_min(1e-12), 2, replacement=False)
        self._draw = (idx, F.softmax(g[idx], 0))

    def choices(self) -> list[tuple[int, torch.Tensor | None]]:
        """[(candidate index, mixing weight or None for weight 1)]."""
        if self._draw is None:
            return [(int(self.alpha.argmax()), None)]
        idx, w = self._draw
        return [(int(i), w[k]) for k, i in enumerate(idx)]


class SearchConv(nn.Module):
    """Shared full-width convolution + one BatchNorm per candidate width; output full width."""

    def __init__(self, c_in: int, choice: WidthChoice, kernel: int, stride: int, align: str = "cwi") -> None:
        super().__init__()
        self.choice = choice
        self.align = ALIGN[align]
        self.conv = nn.Conv2d(c_in, choice.full, kernel, stride, kernel // 2, bias=False)
        self.bns = nn.ModuleList(nn.BatchNorm2d(w) for w in choice.widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        out = 0
        for j, w in self.choice.choices():
            z = self.align(self.bns[j](y[:, : self.choice.widths[j]]), self.choice.full)
            out = out + (z if w is None else w * z)
        return out


class SearchBlock(nn.Module):
    def __init__(self, c_in: int, mid: WidthChoice, out: WidthChoice, stride: int, align: str) -> None:
        super().__init__()
        self.conv1 = SearchConv(c_in, mid, 3, stride, align)
        self.conv2 = SearchConv(mid.full, out, 3, 1, align)
        self.shortcut = SearchConv(c_in, out, 1, stride, align) if (stride != 1 or c_in != out.full) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.relu(self.conv1(x)))
        return F.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class DepthChoice(nn.Module):
    def __init__(self, max_blocks: int) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.zeros(max_blocks))  # candidate depths 1..max_blocks
        self.tau = 1.0
        self.mode = "sample"

    def probs(self) -> torch.Tensor:
        return F.softmax(self.beta, 0)

    def weights(self) -> torch.Tensor | int:
        if self.mode == "argmax":
            return int(self.beta.argmax())
        return F.gumbel_softmax(self.beta, tau=self.tau, hard=False)

    def exists(self) -> torch.Tensor:
        """P(block b exists) = P(depth >= b + 1), for b = 0..max-1."""
        p = self.probs()
        return torch.flip(torch.cumsum(torch.flip(p, [0]), 0), [0])


class SuperNet(nn.Module):
    """CIFAR ResNet supernet: widths and depths are distributions, see module docstring."""

    def __init__(self, num_classes: int, in_channels: int, blocks: Sequence[int], stage_widths: Sequence[int],
                 ratios: Sequence[float] = WIDTH_RATIOS, align: str = "cwi", stem_stride: int = 1) -> None:
        super().__init__()
        if align not in ALIGN:
            raise ConfigError(f"align must be one of {sorted(ALIGN)}, got {align!r}")
        if stem_stride not in STEM_STRIDES:
            raise ConfigError(f"stem_stride must be one of {STEM_STRIDES}, got {stem_stride!r}")
        self.stem_stride = stem_stride  # as models.resnet_cifar: 4 = stride-2 conv, then a stride-2 max-pool
        self.num_classes, self.in_channels = num_classes, in_channels
        self.stage_choice = nn.ModuleList(WidthChoice(w, ratios) for w in stage_widths)
        self.mid_choice = nn.ModuleList(
            nn.ModuleList(WidthChoice(w, ratios) for _ in range(n)) for w, n in zip(stage_widths, blocks))
        self.depth = nn.ModuleList(DepthChoice(n) for n in blocks)
        self.stem = SearchConv(in_channels, self.stage_choice[0], 3, min(stem_stride, 2), align)
        self.stages = nn.ModuleList()
        c_in = stage_widths[0]
        for s, (n, w) in enumerate(zip(blocks, stage_widths)):
            self.stages.append(nn.ModuleList(
                SearchBlock(c_in if b == 0 else w, self.mid_choice[s][b], self.stage_choice[s], 2 if (s and not b) else 1,
                            align)
                for b in range(n)))
            c_in = w
        self.fc = nn.Linear(stage_widths[-1], num_classes)

    def choices(self) -> list[WidthChoice]:
        return [*self.stage_choice, *(c for stage in self.mid_choice for c in stage)]

    def arch_parameters(self) -> list[nn.Parameter]:
        return [c.alpha for c in self.choices()] + [d.beta for d in self.depth]

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def set_mode(self, mode: str, tau: float) -> None:
        for m in [*self.choices(), *self.depth]:
            m.mode, m.tau = mode, tau

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c in self.choices():
            c.resample()
        h = F.relu(self.stem(x))
        if self.stem_stride == 4:
            h = F.max_pool2d(h, 3, stride=2, padding=1)
        for stage, depth in zip(self.stages, self.depth):
            outs = []
            for block in stage:
                h = block(h)
                outs.append(h)
            w = depth.weights()
            h = outs[w] if isinstance(w, int) else sum(wi * o for wi, o in zip(w, outs))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))

    # --- cost -----------------------------------------------------------------------------------
    def expected_params(self) -> torch.Tensor:
        """Expected parameter count of the sampled architecture (differentiable)."""
        def conv(c_in: Any, c_out: Any, k: int) -> Any:
            return k * k * c_in * c_out + 2 * c_out  # weights + BN scale/shift

        stage_w = [c.expected() for c in self.stage_choice]
        total = conv(self.in_channels, stage_w[0], 3)
        c_prev = stage_w[0]
        for s, (mids, depth) in enumerate(zip(self.mid_choice, self.depth)):
            exist = depth.exists()
            for b, mid in enumerate(mids):
                c_in = c_prev if b == 0 else stage_w[s]
                block = conv(c_in, mid.expected(), 3) + conv(mid.expected(), stage_w[s], 3)
                if b == 0 and s > 0:
                    block = block + conv(c_in, stage_w[s], 1)
                total = total + exist[b] * block
            c_prev = stage_w[s]
        return total + stage_w[-1] * self.num_classes + self.num_classes

    def derive(self) -> dict[str, Any]:
        """The argmax architecture as a ``cifar_resnet`` arch_config."""
        depths = [int(d.beta.argmax()) + 1 for d in self.depth]
        widths = [c.argmax_width() for c in self.stage_choice]
        mids = [[self.mid_choice[s][b].argmax_width() for b in range(n)] for s, n in enumerate(depths)]
        arch = {"blocks": depths, "stage_widths": widths, "stem_width": widths[0], "mid_widths": mids}
        return arch if self.stem_stride == 1 else {**arch, "stem_stride": self.stem_stride}

    def entropy(self) -> float:
        """Mean entropy (nats) over all width and depth distributions."""
        with torch.no_grad():
            ps = [c.probs() for c in self.choices()] + [d.probs() for d in self.depth]
            return float(sum(-(p * p.clamp_min(1e-12).log()).sum() for p in ps) / len(ps))
