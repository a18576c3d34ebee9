"""The PyTorch-native engine, for a GPU without TensorRT (and, the same code, on a CPU).

Built from the slimmed model at the deployment batch:

1. ``torch.export`` program, saved as ``model.pt2`` (``torch.export.load(...).module()`` runs it);
2. where ``aoti`` is asked for, compiled ahead of time by AOTInductor into ``model.aoti.pt2``
   (``torch._inductor.aoti_load_package`` runs it without Python model code). A compiled package
   that crashes its process when loaded has been seen (a segmentation fault on an H100,
   ../shared/GPU.md), so the package is loaded and run in a **separate process** (``aoti_check``), and compared
   with the exported program, before it is declared the engine; any failure (exit code, signal,
   timeout, wrong numbers) falls back to the exported program and is recorded with its reason;
3. on CUDA, the engine is replayed as a CUDA graph over a static input buffer where capture works
   (the whole network as one launch: the host no longer sets the pace); otherwise it runs eagerly.
   Either way cuDNN's kernels are its heuristic choice (``heuristic_kernels``), the kernels the
   latency model measured, not a per-process timing race.

``precision`` fp16 or bf16 (CUDA only) exports the half-precision model; inputs are cast at the call.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.cuda_graph import heuristic_kernels
from pipeline.errors import SlimdeployError

log = logging.getLogger(__name__)

EXPORTED, COMPILED = "model.pt2", "model.aoti.pt2"
CHECK_MODULE = "pipeline.runtimes.aoti_check"  # `python -m` entry that loads and checks a compiled package


class TorchEngineError(SlimdeployError):
    """The PyTorch-native engine cannot be built."""


_HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _dtype(precision: str, device: str) -> torch.dtype:
    if precision in _HALF:
        if device != "cuda":
            raise TorchEngineError(f"the torch engine runs {precision} on CUDA only; use engine.precision: fp32 on the "
                                   "CPU")
        return _HALF[precision]
    if precision != "fp32":
        raise TorchEngineError(f"the torch engine runs fp32, fp16 or bf16 (CUDA), not {precision!r}")
    return torch.float32


def build_torch_engine(model: nn.Module, input_shape: tuple[int, ...], batch: int, device: str, precision: str,
                       out_dir: str | Path, aoti: bool = True, check_timeout_s: float = 600.0) -> dict[str, Any]:
    """Export (and compile) ``model`` into ``out_dir``; returns what was built: ``engine_file``
    (the compiled package when it passed its out-of-process check, else the exported program),
    ``kind`` (``aoti`` | ``exported``), ``aoti`` (what happened to the compilation) and times."""
    import time

    out_dir = Path(out_dir)
    dtype = _dtype(precision, device)
    net = model.eval().to(device=device, dtype=dtype)
    example = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            ep = torch.export.export(net, (example,))
    except Exception as err:  # noqa: BLE001 - any export failure is the stage's error, with its cause
        raise TorchEngineError(f"torch.export cannot export the slimmed model: {type(err).__name__}: {err}") from err
    torch.export.save(ep, out_dir / EXPORTED)
    info: dict[str, Any] = {"engine_file": EXPORTED, "kind": "exported", "export_s": time.perf_counter() - t0,
                            "batch": batch, "precision": precision, "aoti": "not requested"}
    if not aoti:
        return info
    t1 = time.perf_counter()
    try:
        from torch._inductor import aoti_compile_and_package

        aoti_compile_and_package(ep, package_path=str(out_dir / COMPILED))
    except Exception as err:  # noqa: BLE001 - a compiler failure falls back to the exported program
        info["aoti"] = f"compile failed ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})"
        log.warning("AOTInductor could not compile the engine (%s); the exported program is the engine", info["aoti"])
        return info
    info["compile_s"] = time.perf_counter() - t1
    # the package must load and agree with the exported program in a process of its own
    with torch.no_grad():
        expected = ep.module()(example)
    torch.save({"x": example.cpu(), "y": expected.float().cpu()}, out_dir / "check.pt")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", CHECK_MODULE, "check", str(out_dir / COMPILED), str(out_dir / "check.pt"),
             "--device", device, "--precision", precision],
            capture_output=True, text=True, timeout=check_timeout_s,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                               os.environ.get("PYTHONPATH", "")])})
        rc, why = proc.returncode, (proc.stderr.strip().splitlines() or [""])[-1][:300]
    except subprocess.TimeoutExpired:
        rc, why = None, f"no answer within {check_timeout_s:g} s"
    finally:
        (out_dir / "check.pt").unlink(missing_ok=True)
    if rc == 0:
        info.update(engine_file=COMPILED, kind="aoti", aoti="compiled; loaded and checked in a separate process")
    else:
        how = f"killed by signal {-rc}" if rc is not None and rc < 0 else (f"exit {rc}" if rc is not None else "timeout")
        info["aoti"] = f"compiled, but the load check failed ({how}: {why}); fell back to the exported program"
        log.warning("AOTInductor package failed its out-of-process check (%s: %s); the exported program is the engine",
                    how, why)
        (out_dir / COMPILED).unlink(missing_ok=True)
    return info


def _load(path: Path, kind: str, device: str) -> Any:
    if kind == "aoti":
        from torch._inductor import aoti_load_package

        return aoti_load_package(str(path))
    return torch.export.load(str(path)).module().to(device)


class TorchEngineRunner:
    """Runs the built engine at its static batch; ``cuda_graph`` replays a captured graph on CUDA
    (falls back to eager, recorded in ``graph``, when capture fails)."""

    def __init__(self, path: str | Path, kind: str, device: str, precision: str, batch: int,
                 input_shape: tuple[int, ...], cuda_graph: bool = True) -> None:
        self.device, self.dtype, self.batch = device, _dtype(precision, device), batch
        self.fn = _load(Path(path), kind, device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_status = "not on CUDA" if device != "cuda" else ("not requested" if not cuda_graph else "")
        self.static_in = torch.zeros(batch, *input_shape, device=device, dtype=self.dtype)
        if device == "cuda" and cuda_graph:
            try:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream), torch.no_grad(), heuristic_kernels():
                    for _ in range(3):  # warm up (allocations, autotuning) off the capture
                        self.fn(self.static_in)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph), torch.no_grad(), heuristic_kernels():
                    self.static_out = self.fn(self.static_in)
                self.graph, self.graph_status = graph, "captured"
            except Exception as err:  # noqa: BLE001 - eager is a correct fallback
                self.graph_status = f"capture failed, eager ({type(err).__name__}: {str(err)[:160]})"
                log.warning("CUDA graph capture of the torch engine failed; running eagerly: %s", err)
        if device == "cuda" and self.graph is None:  # eager: the first call's plan is the one cuDNN caches
            with torch.no_grad(), heuristic_kernels():
                self.fn(self.static_in)

    def replay(self) -> None:
        """One batch of the static input, enqueued and not synchronised: what CUDA events time."""
        with torch.no_grad():
            if self.graph is not None:
                self.graph.replay()
            else:
                self.fn(self.static_in)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of one batch of exactly ``batch`` images (synchronised on CUDA)."""
        with torch.no_grad():
            if self.graph is not None:
                self.static_in.copy_(x)
                self.graph.replay()
                out = self.static_out
            else:
                out = self.fn(x.to(self.device, self.dtype))
            if self.device == "cuda":
                torch.cuda.synchronize()
        return out

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 CPU logits of every image in ``x``, ``batch`` at a time (the last batch padded)."""
        outs = []
        for i in range(0, len(x), self.batch):
            chunk = x[i:i + self.batch]
            n = len(chunk)
            if n < self.batch:
                chunk = torch.cat([chunk, chunk[:1].expand(self.batch - n, *chunk.shape[1:])])
            outs.append(self(chunk.to(self.device, self.dtype))[:n].float().cpu())
        return torch.cat(outs)
