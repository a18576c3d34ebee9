"""Differentiable width and depth search over the CIFAR ResNet family (TAS, Dong & Yang 2019).

The supernet, its width and depth distributions and its differentiable expected parameter count
are ``pipeline.supernet`` (its docstring describes them). This module holds the search: the
family's parameter counts, the TAS cost loss that drives the expected cost toward the budget, the
temperature schedule and ``run_search``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models import build_model
from pipeline.errors import ConfigError, TrainingDiverged
from pipeline.supernet import SuperNet, candidate_widths
from pipeline.train import diverged_message


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
    crop_scale: tuple[float, float] = (0.25, 1.0),
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

    from pipeline.data import Split, augment_batch, normalize
    from pipeline.distill import TeacherEnsemble, memoize_split, oracle_kd_loss

    gen = torch.Generator().manual_seed(seed)
    supernet.to(device)
    teachers.to(device)
    n = len(data.train)
    perm = torch.randperm(n, generator=gen)
    halves = perm[: n // 2], perm[n // 2 :]
    in_memory = isinstance(data.train, Split)  # else images on disk (prepare.storage files), decoded per batch
    x_all = data.train.x.to(device) if in_memory else None
    files = None if in_memory else data.train.with_training_view(crop_scale)
    y_all = data.train.y.to(device)
    mean = torch.tensor(data.meta["mean"], device=device)
    std = torch.tensor(data.meta["std"], device=device)
    if isinstance(teachers, TeacherEnsemble) and x_all is not None:  # the unaugmented split's logits, once
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
        xb = x_all[idx] if files is None else files.take(idx.cpu(), augment == "random_resized_crop").to(device)
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
            for xv, yv in data.val.batches(512):
                xv, yv = normalize(xv.to(device), mean, std), yv.to(device)
                if channels_last and cuda:
                    xv = xv.contiguous(memory_format=torch.channels_last)
                with autocast():
                    correct += (supernet(xv).argmax(1) == yv).sum()
            expected = float(supernet.expected_params())
        w_mean, a_mean, c_mean = (sums / steps).tolist()
        history.append({
            "epoch": epoch + 1, "tau": tau, "w_loss": w_mean, "a_loss": a_mean, "cost_loss": c_mean,
            "expected_params": expected, "argmax_params": current_params(), "budget_params": budget,
            "entropy": supernet.entropy(), "val_acc_argmax": correct.item() / len(data.val),
        })
    return history
