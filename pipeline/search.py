"""Differentiable width and depth search over the CIFAR ResNet family (TAS, Dong & Yang 2019).

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
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models import build_model
from pipeline.errors import ConfigError, TrainingDiverged
from pipeline.train import diverged_message

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
                 ratios: Sequence[float] = WIDTH_RATIOS, align: str = "cwi") -> None:
        super().__init__()
        if align not in ALIGN:
            raise ConfigError(f"align must be one of {sorted(ALIGN)}, got {align!r}")
        self.num_classes, self.in_channels = num_classes, in_channels
        self.stage_choice = nn.ModuleList(WidthChoice(w, ratios) for w in stage_widths)
        self.mid_choice = nn.ModuleList(
            nn.ModuleList(WidthChoice(w, ratios) for _ in range(n)) for w, n in zip(stage_widths, blocks))
        self.depth = nn.ModuleList(DepthChoice(n) for n in blocks)
        self.stem = SearchConv(in_channels, self.stage_choice[0], 3, 1, align)
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
        return {"blocks": depths, "stage_widths": widths, "stem_width": widths[0], "mid_widths": mids}

    def entropy(self) -> float:
        """Mean entropy (nats) over all width and depth distributions."""
        with torch.no_grad():
            ps = [c.probs() for c in self.choices()] + [d.probs() for d in self.depth]
            return float(sum(-(p * p.clamp_min(1e-12).log()).sum() for p in ps) / len(ps))


def family_params(num_classes: int, in_channels: int, arch_config: dict[str, Any]) -> int:
    model = build_model("cifar_resnet", num_classes=num_classes, in_channels=in_channels, **arch_config)
    return sum(p.numel() for p in model.parameters())


def smallest_member(blocks: Sequence[int], stage_widths: Sequence[int], ratios: Sequence[float]) -> dict[str, Any]:
    w = [candidate_widths(x, ratios)[0] for x in stage_widths]
    return {"blocks": [1] * len(blocks), "stage_widths": w, "stem_width": w[0], "mid_widths": [[x] for x in w]}


def cost_loss(expected: torch.Tensor, current: float, budget: float, largest: float, tolerance: float) -> torch.Tensor:
    """TAS cost loss: push the expected cost down when the argmax architecture is over budget,
    up when it is more than ``tolerance * largest`` under it, else nothing."""
    if current > budget:
        return torch.log(expected)
    if current < budget - tolerance * largest:
        return -torch.log(expected)
    return expected.new_zeros(())


@dataclass(frozen=True)
class SearchSpace:
    blocks: tuple[int, ...]
    stage_widths: tuple[int, ...]
    ratios: tuple[float, ...]

    def check_budget(self, num_classes: int, in_channels: int, budget: float) -> tuple[int, int]:
        """(smallest, largest) member parameter counts; ConfigError when the budget is below the
        smallest member, before any training."""
        small = family_params(num_classes, in_channels, smallest_member(self.blocks, self.stage_widths, self.ratios))
        large = family_params(num_classes, in_channels, {"blocks": list(self.blocks), "stage_widths": list(self.stage_widths)})
        if budget < small:
            raise ConfigError(
                f"search budget {budget:,.0f} parameters is below the smallest member of the family "
                f"({small:,} parameters: 1 block per stage at width ratio {min(self.ratios)}); raise the budget"
            )
        return small, large


def tau_at(epoch: int, epochs: int, tau_max: float, tau_min: float) -> float:
    """Linear annealing from tau_max (first epoch) to tau_min (last)."""
    if epochs <= 1:
        return tau_min
    return tau_max - (tau_max - tau_min) * epoch / (epochs - 1)




def run_search(
    supernet: SuperNet,
    teachers: nn.Module,
    data: Any,
    *,
    budget: float,
    largest: float,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    arch_lr: float,
    arch_weight_decay: float,
    tau_max: float,
    tau_min: float,
    cost_weight: float,
    tolerance: float,
    temperature: float,
    alpha: float,
    mode: str,
    average: str,
    augment: str,
    crop_padding: int,
    seed: int,
    device: torch.device,
    progress: bool = True,
    amp: bool = False,
    channels_last: bool = False,
) -> list[dict[str, float]]:
    """Alternate weight steps (first half of train) and architecture steps (second half) with
    the distillation loss; architecture steps add ``cost_weight`` x the TAS cost loss. Returns
    per-epoch curves; the supernet is modified in place (``supernet.derive()`` is the result).

    On CUDA, ``amp`` runs forward passes under bf16 autocast and ``channels_last`` lays batches
    out NHWC. The discrete choices TAS samples for each forward are read on the host (a small
    synchronisation per step, inherent to sampling one architecture per batch)."""
    from contextlib import nullcontext

    from tqdm.auto import tqdm

    from pipeline.data import augment_batch, normalize
    from pipeline.distill import TeacherEnsemble, memoize_split, oracle_kd_loss

    gen = torch.Generator().manual_seed(seed)
    supernet.to(device)
    teachers.to(device)
    n = len(data.train)
    perm = torch.randperm(n, generator=gen)
    halves = perm[: n // 2], perm[n // 2 :]
    x_all, y_all = data.train.x.to(device), data.train.y.to(device)
    mean = torch.tensor(data.meta["mean"], device=device)
    std = torch.tensor(data.meta["std"], device=device)
    if isinstance(teachers, TeacherEnsemble):  # the teachers' logits of the unaugmented split, once
        memoize_split(teachers, normalize(x_all, mean, std), augment, device, batch_size)
    steps = max(1, min(len(h) for h in halves) // batch_size)
    w_opt = torch.optim.SGD(supernet.weight_parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(w_opt, T_max=epochs * steps)
    a_opt = torch.optim.Adam(supernet.arch_parameters(), lr=arch_lr, betas=(0.5, 0.999), weight_decay=arch_weight_decay)
    aug_gen = torch.Generator(device=device).manual_seed(seed)
    cache: dict[str, int] = {}

    def current_params() -> int:
        cfg = supernet.derive()
        key = repr(cfg)
        if key not in cache:
            cache[key] = family_params(supernet.num_classes, supernet.in_channels, cfg)
        return cache[key]

    cuda = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp and cuda else nullcontext
    if channels_last and cuda:
        supernet.to(memory_format=torch.channels_last)

    def batch(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xb = x_all[idx]
        if augment == "padcrop_flip":
            xb = augment_batch(xb, crop_padding, aug_gen)
        xb = normalize(xb, mean, std)
        if channels_last and cuda:
            xb = xb.contiguous(memory_format=torch.channels_last)
        return xb, y_all[idx]

    def kd_loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        with autocast():
            s_logits, t_logits = supernet(xb), teachers(xb)
        return oracle_kd_loss(s_logits.float(), t_logits.float(), yb, temperature, alpha, mode, average)["loss"]

    history = []
    check_every = 25 if cuda else 1
    for epoch in tqdm(range(epochs), desc="search", unit="epoch", disable=not progress):
        tau = tau_at(epoch, epochs, tau_max, tau_min)
        supernet.train()
        supernet.set_mode("sample", tau)
        order = [h[torch.randperm(len(h), generator=gen)] for h in halves]
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # w_loss, a_loss, cost_loss
        for i in range(steps):
            xa, ya = batch(order[0][i * batch_size : (i + 1) * batch_size].to(device))
            loss = kd_loss(xa, ya)
            w_opt.zero_grad(set_to_none=True)
            loss.backward()
            w_opt.step()
            sched.step()
            xb, yb = batch(order[1][i * batch_size : (i + 1) * batch_size].to(device))
            a_loss = kd_loss(xb, yb)
            c_loss = cost_loss(supernet.expected_params(), current_params(), budget, largest, tolerance)
            a_opt.zero_grad(set_to_none=True)
            (a_loss + cost_weight * c_loss).backward()
            a_opt.step()
            sums += torch.stack([loss.detach(), a_loss.detach(), c_loss.detach()]).double()
            if (i + 1) % check_every == 0 or i + 1 == steps:
                if not torch.isfinite(sums).all():  # one host read per check_every steps
                    where = f"step {i + 1} of {steps}" if check_every == 1 else f"within steps up to {i + 1} of {steps}"
                    bad = float(sums[~torch.isfinite(sums)][0])
                    raise TrainingDiverged(diverged_message("search", bad, epoch + 1, epochs, where,
                                                            w_opt.param_groups[0]["lr"], amp and cuda,
                                                            lr_key="search.lr / search.arch_lr", warmup=False))
        supernet.eval()
        supernet.set_mode("argmax", tau)
        with torch.no_grad():
            correct = torch.zeros((), dtype=torch.long, device=device)
            x_val, y_val = data.val.x.to(device), data.val.y.to(device)
            for j in range(0, len(data.val), 512):
                xv = normalize(x_val[j : j + 512], mean, std)
                if channels_last and cuda:
                    xv = xv.contiguous(memory_format=torch.channels_last)
                with autocast():
                    correct += (supernet(xv).argmax(1) == y_val[j : j + 512]).sum()
            expected = float(supernet.expected_params())
        w_mean, a_mean, c_mean = (sums / steps).tolist()
        history.append({
            "epoch": epoch + 1, "tau": tau, "w_loss": w_mean, "a_loss": a_mean, "cost_loss": c_mean,
            "expected_params": expected, "argmax_params": current_params(), "budget_params": budget,
            "entropy": supernet.entropy(), "val_acc_argmax": correct.item() / len(data.val),
        })
    return history
