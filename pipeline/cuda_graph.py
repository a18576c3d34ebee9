"""The training step captured as one CUDA graph and replayed (one CUDA device; see
``pipeline.train.train_classifier``), and the autocast context both the eager and the graphed
step use."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

# criterion(logits (B, K), labels (B,), inputs (B, C, H, W) normalised) -> scalar loss.
Criterion = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def autocast(device: torch.device, amp: bool, cache: bool = True):  # noqa: ANN202
    if amp and device.type == "cuda":  # a graph capture needs the weight-cast cache off
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache)
    return nullcontext()


@contextmanager
def heuristic_kernels() -> Iterator[None]:
    """cuDNN picks its convolution kernels by its heuristics inside, not by timing candidates
    (``cudnn.benchmark``, which training turns on). Latency readings and the torch engine warm up
    and capture under it, so the plan cuDNN caches for their shapes is the one the shapes decide,
    not the winner of a timing race that differs from process to process; a shape already run in
    this process under benchmark mode keeps the plan cached then (training's shapes, batch and
    layout differ from a reading's). On an H200 one slimmed network read 0.962, 0.993 and 1.017
    of its budget in prune, compare and engine (compare's three readings within 0.6%), and only
    prune and compare had trained first (docs/history.md, section 44): a cause this removes, if
    it is the cause."""
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


GRAPH_WARMUP_STEPS = 3  # eager steps (on a side stream) before the training step is captured


class GraphedStep:
    """The whole training step (forward, loss, backward, optimiser) captured once in a CUDA graph
    and replayed for every full batch: one launch per step instead of hundreds, so a small
    network's training is no longer paced by the host (../shared/GPU.md: 0.5% of an H100 at
    batch 128 with the eager loop). The batch is copied into static buffers; the optimiser must
    read its learning rate from a device tensor (``torch.optim.SGD(lr=tensor, fused=True)``), which
    the scheduler updates in place between replays. Anything that reads a value back to the host
    inside the step cannot be captured: ``CaptureFailed`` then, and the caller falls back to the
    eager step. A call runs one full batch: eagerly on a side stream for the first
    ``GRAPH_WARMUP_STEPS`` calls (capture warm-up), then captures, then replays."""

    def __init__(self, net: nn.Module, criterion: Criterion, opt: torch.optim.Optimizer, device: torch.device,
                 amp: bool) -> None:
        self.net, self.criterion, self.opt, self.device, self.amp = net, criterion, opt, device, amp
        self.graph: torch.cuda.CUDAGraph | None = None
        self.side = torch.cuda.Stream(device)
        self.warm_steps = 0

    def _eager_on_side_stream(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A normal step, run on a side stream as capture warm-up requires."""
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            with autocast(self.device, self.amp, cache=False):
                logits = self.net(xb)
                loss = self.criterion(logits.float(), yb, xb)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        torch.cuda.current_stream(self.device).wait_stream(self.side)
        return logits, loss

    def _capture(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        self.x, self.y = xb.clone(), yb.clone()  # static buffers with the batch's layout (channels_last)
        self.opt.zero_grad(set_to_none=True)  # gradients are allocated inside the graph's pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            with autocast(self.device, self.amp, cache=False):
                self.logits = self.net(self.x)
                self.loss = self.criterion(self.logits.float(), self.y, self.x)
            self.loss.backward()
            self.opt.step()
        self.graph = graph

    def __call__(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.graph is None:
            if self.warm_steps < GRAPH_WARMUP_STEPS:
                self.warm_steps += 1
                return self._eager_on_side_stream(xb, yb)
            try:
                self._capture(xb, yb)  # records the step without running it: replayed below
            except Exception as err:  # noqa: BLE001 - whatever the capture hit, the eager step is correct
                torch.cuda.synchronize(self.device)
                self.opt.zero_grad(set_to_none=True)
                raise CaptureFailed(f"CUDA graph capture failed ({type(err).__name__}: {str(err)[:200]})") from err
        self.x.copy_(xb)
        self.y.copy_(yb)
        self.graph.replay()
        return self.logits, self.loss


class CaptureFailed(RuntimeError):
    """The training step could not be captured as a CUDA graph."""
