"""Supervised training loop shared by every training stage.

Images in memory stay as uint8 tensors on the training device; each step indexes a batch,
augments and normalises it there (no DataLoader workers, no per-batch host round trips on GPU).
Images on disk (``prepare.storage: files``) are decoded and augmented in DataLoader workers
(``pipeline.streaming``) and normalised on the device.
Under torchrun the model is wrapped in DistributedDataParallel and each rank takes its share of
every epoch's permutation (torch's DistributedSampler). A resume file written after every epoch
lets an interrupted run continue exactly where it stopped.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from pipeline.config import OptimizerConfig, TrainConfig
from pipeline.cuda_graph import GRAPH_WARMUP_STEPS, CaptureFailed, Criterion, GraphedStep, autocast
from pipeline.data import AnySplit, PreparedData, augment_batch, normalize
from pipeline.errors import ConfigError, TrainingDiverged
from pipeline.io import torch_save
from pipeline.runtime import DistContext
from pipeline.streaming import FileSplit

log = logging.getLogger(__name__)

# Criterion: (logits (B, K), labels (B,), inputs (B, C, H, W) normalised) -> scalar loss. The
# inputs are passed so that distillation losses can run teachers on the same batch.


@dataclass
class TrainResult:
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    best_val_acc: float
    history: list[dict[str, float]] = field(default_factory=list)
    step_mode: str = "eager"  # "cuda graph" when the training step was replayed as one, else why not


def lr_factor(step: int, total_steps: int, warmup_steps: int, cfg: OptimizerConfig) -> float:
    """Multiplier of the base learning rate after ``step`` optimiser steps (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if cfg.schedule == "multistep":
        return cfg.gamma ** sum(progress >= m for m in cfg.milestones)
    return 1.0


def cross_entropy(label_smoothing: float = 0.0) -> Criterion:
    loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    return lambda logits, labels, _inputs: loss(logits, labels)


# How often the loss is checked for NaN/inf: every step where reading it costs nothing (CPU), every
# CHECK_EVERY steps on CUDA (reading it there waits for the GPU).
CHECK_EVERY_CUDA = 25


def diverged_message(what: str, value: float, epoch: int, epochs: int, step: str, lr: float, amp: bool,
                     lr_key: str = "the stage's optimizer.lr", warmup: bool = True) -> str:
    """What a user needs to know when a loss stops being finite: where, at which learning rate,
    and what to change."""
    hints = [f"lower the learning rate ({lr_key})"] + (["add warm-up (optimizer.warmup_epochs)"] if warmup else [])
    if amp:
        hints.append("or train without bf16 autocast (train.amp: false)")
    return (f"{what}: the training loss became {value} at epoch {epoch}/{epochs}, {step}, learning rate {lr:.3g}: "
            f"training diverged. {'; '.join(hints)}. Nothing was written.")


def check_above_chance(acc: float, num_classes: int, samples: int, what: str,
                       resume_path: str | Path | None = None) -> None:
    """Refuse a model whose accuracy is at chance level: 1 / ``num_classes`` plus three standard
    errors of a chance accuracy on ``samples`` images (at least 2 points). ``resume_path``, if
    given, is deleted first: such a run is not resumed from."""
    chance = 1.0 / num_classes
    margin = max(0.02, 3 * math.sqrt(chance * (1 - chance) / max(1, samples)))
    if not acc > chance + margin:
        if resume_path is not None:
            Path(resume_path).unlink(missing_ok=True)
        raise TrainingDiverged(
            f"{what}: accuracy {acc:.2%} on {samples} images is at chance level for {num_classes} classes "
            f"(chance {chance:.2%}, limit {chance + margin:.2%}): the model has not learned. A learning rate too "
            "high (diverged) or too low, too few epochs, or broken data are the usual causes. Nothing was written.")


def _stats(x: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64, device=device)


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    split: AnySplit,
    mean: torch.Tensor,
    std: torch.Tensor,
    device: torch.device,
    batch_size: int = 512,
    amp: bool = False,
    channels_last: bool = False,
) -> torch.Tensor:
    """Eval-mode logits (N, K) as float32 on the CPU. ``model`` is put in eval mode."""
    model.eval()
    mean, std = mean.to(device), std.to(device)
    out = []  # logits stay on the device until the end
    for xb, _ in split.batches(batch_size):
        xb = normalize(xb.to(device, non_blocking=True), mean, std)
        if channels_last and device.type == "cuda":
            xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            out.append(model(xb).float())
    return torch.cat(out).cpu()


def test_accuracy(model: nn.Module, data: PreparedData, device: torch.device, batch_size: int = 512,
                  amp: bool = False, split: AnySplit | None = None) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on the test split (or ``split``, normalised with the
    training statistics of ``data``), in [0, 1]."""
    mean, std = data.norm()
    split = data.test if split is None else split
    logits = predict_logits(model, split, mean, std, device, batch_size, amp)
    return (logits.argmax(1) == split.y).double().mean().item()


def epoch_steps(samples: int, batch_size: int, world_size: int = 1) -> int:
    """Optimiser steps per epoch of ``train_classifier`` on ``samples`` training images: each rank
    takes ceil(samples / world_size) of them in batches of batch_size / world_size, and a tail of
    one sample is dropped (BatchNorm cannot train on it)."""
    per_rank = max(1, batch_size // world_size)
    full, rest = divmod(-(-samples // world_size), per_rank)
    return max(1, full + (1 if rest >= 2 or full == 0 else 0))


def _step_mode(device: torch.device, cfg: TrainConfig, ctx: DistContext, graphable: bool) -> str:
    """How the training step runs: "eager" (with the reason where a graph was possible), or, until
    a capture has succeeded, "eager: not captured ..." for a step that will try to capture."""
    if device.type != "cuda" or not cfg.cuda_graph:
        return "eager"
    if ctx.enabled:
        return "eager: CUDA graphs are not used under DDP"
    if not graphable:
        return "eager: this stage's loss reads values on the host (not capturable)"
    return f"eager: not captured (fewer than {GRAPH_WARMUP_STEPS + 1} full batches)"


@dataclass
class _Progress:
    """What the epochs so far decided; written to and read from the resume state."""

    start: int = 0
    best_epoch: int = -1
    best_acc: float = -1.0
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


def _resume(path: Path | None, fingerprint: str, model: nn.Module, opt: torch.optim.Optimizer,
            sched: torch.optim.lr_scheduler.LRScheduler, device: torch.device, desc: str) -> _Progress:
    """The progress of an interrupted run of the same ``fingerprint`` (its model, optimiser and
    scheduler states are loaded in place), or a fresh one."""
    state: dict[str, Any] = {}
    if path and path.is_file():
        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except (RuntimeError, EOFError, ValueError, OSError) as err:  # e.g. a truncated file
            log.warning("ignoring unreadable resume state %s (%s); starting from scratch", path, err)
    if not state:
        return _Progress()
    if state.get("fingerprint") != fingerprint:
        log.warning("ignoring %s: it belongs to a different configuration", path)
        return _Progress()
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    log.info("resuming %s from %s after epoch %d", desc, path, state["epoch"])
    return _Progress(state["epoch"], state["best_epoch"], state["best_val_acc"], state["best_state"], state["history"])


def _epoch_batches(sampler: DistributedSampler, epoch: int, per_rank: int, device: torch.device) -> list[torch.Tensor]:
    """This rank's batches of sample indices for ``epoch``; a last batch of one sample is dropped
    (BatchNorm cannot train on it)."""
    sampler.set_epoch(epoch)
    order = torch.tensor(list(sampler), device=device)
    batches = [order[i : i + per_rank] for i in range(0, len(order), per_rank)]
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches.pop()
    return batches


class _Stepper:
    """One optimiser step on a batch: replayed as a captured CUDA graph for full batches where that
    is possible (``GraphedStep``), eager otherwise (also after a capture failed, with a warning).
    ``mode`` says which ran."""

    def __init__(self, net: nn.Module, criterion: Criterion, opt: torch.optim.Optimizer, device: torch.device,
                 amp: bool, mode: str, desc: str, graphed: bool) -> None:
        self.net, self.criterion, self.opt, self.device, self.amp = net, criterion, opt, device, amp
        self.mode, self.desc = mode, desc
        self.graph = GraphedStep(net, criterion, opt, device, amp) if graphed else None

    def __call__(self, xb: torch.Tensor, yb: torch.Tensor, full: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.graph is not None and full:  # the graph is shaped for full batches
            try:
                logits, loss = self.graph(xb, yb)
                if self.graph.graph is not None:
                    self.mode = "cuda graph"
                return logits, loss
            except CaptureFailed as err:
                self.mode = f"eager: {err}"
                log.warning("%s: %s", self.desc, self.mode)
                self.graph = None
        with autocast(self.device, self.amp, cache=self.graph is None):  # eager (also a graph run's short batch)
            logits = self.net(xb)
            loss = self.criterion(logits.float(), yb, xb)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return logits, loss

    def release(self) -> None:
        if self.graph is not None:
            self.opt.zero_grad(set_to_none=True)  # the gradients live in the graph's pool: let it go with the graph
            self.graph = None
            torch.cuda.synchronize(self.device)


def train_classifier(
    model: nn.Module,
    data: PreparedData,
    cfg: TrainConfig,
    optim: OptimizerConfig,
    *,
    epochs: int,
    seed: int,
    device: torch.device,
    ctx: DistContext | None = None,
    criterion: Criterion | None = None,
    resume_path: str | Path | None = None,
    fingerprint: str = "",
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
    desc: str = "train",
    graphable: bool = True,
) -> TrainResult:
    """Train ``model`` (modified in place) and return the best-by-validation weights.

    ``device`` is this rank's device; ``ctx`` the DDP context (None: one process).
    ``resume_path``: after every epoch the full training state is written there; if it exists at
    the start with the same ``fingerprint`` (a digest of everything that determines the run),
    training resumes from it. Only rank 0 writes it.

    On one CUDA device with ``cfg.cuda_graph``, full batches run as a captured CUDA graph
    (``GraphedStep``); ``graphable=False`` says the criterion cannot be captured (it reads values
    on the host). A capture that fails falls back to the eager step, with a warning; the mode used
    is ``TrainResult.step_mode``.
    """
    ctx = ctx or DistContext()
    criterion = criterion or cross_entropy(cfg.label_smoothing)
    use_cl = cfg.channels_last and device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels once
    model.to(device)
    if use_cl:
        model.to(memory_format=torch.channels_last)
    mean = _stats(data.meta["mean"], device).float()
    std = _stats(data.meta["std"], device).float()
    streamed = isinstance(data.train, FileSplit)  # prepare.storage files: decoded in DataLoader workers
    if streamed:
        train_files = data.train.with_training_view(cfg.crop_scale, cfg.workers)
        train_y = data.train.y.to(device)
    else:
        train_x, train_y = data.train.x.to(device), data.train.y.to(device)

    if cfg.batch_size % ctx.world_size:
        raise ConfigError(f"train.batch_size {cfg.batch_size} must divide by the {ctx.world_size} DDP ranks")
    per_rank = cfg.batch_size // ctx.world_size
    sampler = DistributedSampler(
        range(len(train_y)), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed
    )
    steps_per_epoch = epoch_steps(len(train_y), cfg.batch_size, ctx.world_size)
    step_mode = _step_mode(device, cfg, ctx, graphable)
    graphed = step_mode.startswith("eager: not captured")
    opt = torch.optim.SGD(  # a graph reads the learning rate from device memory, updated in place
        model.parameters(), lr=torch.tensor(optim.lr, device=device) if graphed else optim.lr, momentum=optim.momentum,
        nesterov=optim.nesterov and optim.momentum > 0, weight_decay=optim.weight_decay, **({"fused": True} if graphed else {}),
    )
    total, warm = epochs * steps_per_epoch, optim.warmup_epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warm, optim))
    resume_path = Path(resume_path) if resume_path else None
    done = _resume(resume_path, fingerprint, model, opt, sched, device, desc)

    net: nn.Module = model
    if ctx.enabled:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    show = cfg.progress and ctx.is_main
    check_every = 1 if device.type == "cpu" else CHECK_EVERY_CUDA
    stepper = _Stepper(net, criterion, opt, device, cfg.amp, step_mode, desc, graphed)
    amp_on = cfg.amp and device.type == "cuda"

    def diverged(value: float, epoch: int, step: str) -> TrainingDiverged:
        if resume_path is not None and ctx.is_main:
            resume_path.unlink(missing_ok=True)  # a diverged run is never resumed from
        return TrainingDiverged(diverged_message(desc, value, epoch + 1, epochs, step,
                                                 float(opt.param_groups[0]["lr"]), amp_on))

    epoch_bar = tqdm(range(done.start, epochs), desc=desc, unit="epoch", disable=not show, initial=done.start,
                     total=epochs)
    for epoch in epoch_bar:
        t0 = time.perf_counter()
        net.train()
        # every random draw of the epoch (e.g. the soft masks' Gumbel noise) from a seed of its own:
        # a resumed run draws what the uninterrupted one drew
        torch.manual_seed(seed * 1_000_003 + epoch * 1009 + ctx.rank)
        batches = _epoch_batches(sampler, epoch, per_rank, device)
        epoch_seed = seed * 1_000_003 + epoch * 1009 + ctx.rank
        gen = torch.Generator(device=device).manual_seed(epoch_seed)
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss*n, correct, n
        if streamed:
            source = ((x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in
                      train_files.loader([b.tolist() for b in batches], cfg.augment == "random_resized_crop",
                                         epoch_seed))
        else:
            source = ((train_x[idx], train_y[idx]) for idx in batches)
        for step, (xb, yb) in enumerate(tqdm(source, desc=f"epoch {epoch + 1}", leave=False, disable=not show,
                                             total=len(batches))):
            if cfg.augment == "padcrop_flip":
                xb = augment_batch(xb, cfg.crop_padding, gen)
            xb = normalize(xb, mean, std)
            if use_cl:
                xb = xb.contiguous(memory_format=torch.channels_last)
            logits, loss = stepper(xb, yb, full=len(yb) == per_rank)
            sched.step()
            with torch.no_grad():  # device-side sums: no host synchronisation inside the epoch
                n = yb.numel()
                sums[0] += loss.detach().double() * n
                sums[1] += (logits.argmax(1) == yb).sum()
                sums[2] += n
            if (step + 1) % check_every == 0 or step + 1 == len(batches):
                if not math.isfinite(sums[0].item()):  # NaN/inf anywhere in the epoch stays in the sum
                    where = (f"step {step + 1} of {len(batches)}" if check_every == 1 else
                             f"within steps {max(1, step + 2 - check_every)}-{step + 1} of {len(batches)}")
                    raise diverged(sums[0].item(), epoch, where)
        if ctx.enabled:
            dist.all_reduce(sums)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # kernels are asynchronous: time the work, not its queueing
        train_seconds = time.perf_counter() - t0
        # Every rank evaluates the full validation split with identical weights: same decision.
        val_logits = predict_logits(model, data.val, mean, std, device, cfg.eval_batch_size, cfg.amp, use_cl)
        val_loss = nn.functional.cross_entropy(val_logits, data.val.y).item()
        if not math.isfinite(val_loss):
            raise diverged(val_loss, epoch, "on the validation split after the epoch")
        loss_sum, correct, count = sums.tolist()
        record = {"epoch": epoch + 1, "lr": float(opt.param_groups[0]["lr"]), "train_loss": loss_sum / count,
                  "train_acc": correct / count, "val_loss": val_loss,
                  "val_acc": (val_logits.argmax(1) == data.val.y).float().mean().item(), "epoch_seconds": train_seconds}
        _end_epoch(record, model, done, epoch_bar, show, ctx, desc, epochs)
        if on_epoch_end is not None:  # before the resume state: what it changes is resumed too
            on_epoch_end(record)
        if resume_path and ctx.is_main:
            torch_save({"fingerprint": fingerprint, "epoch": epoch + 1, "model": model.state_dict(),
                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "best_state": done.best_state,
                        "best_epoch": done.best_epoch, "best_val_acc": done.best_acc, "history": done.history},
                       resume_path)
    stepper.release()
    return TrainResult(copy.copy(done.best_state), done.best_epoch, done.best_acc, done.history, stepper.mode)


def _end_epoch(record: dict[str, float], model: nn.Module, done: _Progress, bar: Any, show: bool, ctx: DistContext,
               desc: str, epochs: int) -> None:
    """Record the epoch, keep the best weights by validation accuracy, report progress."""
    done.history.append(record)
    if record["val_acc"] > done.best_acc:
        done.best_acc, done.best_epoch = record["val_acc"], int(record["epoch"])
        done.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    bar.set_postfix(loss=f"{record['train_loss']:.3f}", val_acc=f"{record['val_acc']:.4f}")
    if not show and ctx.is_main:
        log.info("%s epoch %d/%d: loss %.4f, train acc %.4f, val acc %.4f, %.1f s", desc, record["epoch"], epochs,
                 record["train_loss"], record["train_acc"], record["val_acc"], record["epoch_seconds"])
