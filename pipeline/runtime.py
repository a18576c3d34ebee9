"""Where computation runs: device choice, CPU threads, DDP process group, environment record."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pipeline.errors import ConfigError


def resolve_device(requested: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; ``cuda`` without a GPU is a ConfigError."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device: cuda was requested but torch sees no CUDA GPU (torch "
            f"{torch.__version__}); use device: auto or cpu"
        )
    return torch.device(requested)


@dataclass(frozen=True)
class DistContext:
    """This process's place in a torchrun launch (world_size 1 when launched plainly)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); no-op otherwise.

    On CUDA each rank takes GPU ``LOCAL_RANK`` and uses NCCL; on CPU it uses Gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    ctx = DistContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group(backend=backend)
    return ctx


def local_device(device: torch.device, ctx: DistContext) -> torch.device:
    return torch.device("cuda", ctx.local_rank) if device.type == "cuda" else device


def start_training(device: str, num_threads: int | None) -> tuple[torch.device, DistContext]:
    """What every training stage does first: resolve ``device``, set torch's CPU threads, join the
    process group under torchrun, and take this rank's device. Returns (device, context)."""
    resolved = resolve_device(device)
    if num_threads:
        torch.set_num_threads(num_threads)
    ctx = init_distributed(resolved)
    return local_device(resolved, ctx), ctx


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(device: torch.device) -> dict[str, Any]:
    """Plain-data record of the hardware and torch build, for metrics and manifests."""
    info: dict[str, Any] = {"type": device.type, "torch": torch.__version__}
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        info.update(name=torch.cuda.get_device_name(idx), cuda=torch.version.cuda)
    else:
        info.update(name=cpu_name(), cores=os.cpu_count(), threads=torch.get_num_threads())
    return info
