"""ONNX Runtime: the one session builder (deployment engine, export check, predict and the
latency backend) and the logits of a session. ``onnxruntime`` is imported when first used."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.runtimes.errors import RuntimeUnavailable


def ort_has_cuda() -> bool:
    """Whether the installed onnxruntime has its CUDA provider (onnxruntime-gpu)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def ort_providers(device: str) -> list[str]:
    """Execution providers for ``device`` ("cpu" | "cuda"); RuntimeUnavailable when onnxruntime
    has no CUDA provider for a "cuda" device."""
    if device != "cuda":
        return ["CPUExecutionProvider"]
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeUnavailable(
            f"onnxruntime has no CUDAExecutionProvider here (providers: {ort.get_available_providers()}): install "
            "onnxruntime-gpu (make gpu-runtime) with a CUDA GPU, or use device: cpu")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def ort_session(model: str | Path | bytes, device: str = "cpu", threads: int = 1, *, optimize: bool = True,
                optimized_path: str | Path | None = None, log_severity: int = 2) -> Any:
    """An ONNX Runtime ``InferenceSession`` of ``model`` (a file or the model's bytes).

    ``threads``: intra-op threads (one inter-op thread, sequential execution). ``optimize``: full
    graph optimisation, else none (the graph exactly as exported). ``optimized_path``: the
    optimised graph is also saved there. ``log_severity``: onnxruntime's level (2 warnings,
    3 errors only)."""
    import onnxruntime as ort

    providers = ort_providers(device)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = log_severity
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so, providers=providers)


def ort_logits(sess: Any, x: Any, batch_size: int = 256) -> torch.Tensor:
    """Logits (N, K) float32 of an ONNX Runtime session on normalised inputs ``x`` (N, C, H, W):
    a tensor, or anything that slices like one (``pipeline.data.Normalized``: rows read as asked
    for), ``batch_size`` images per call."""
    name = sess.get_inputs()[0].name
    out = [sess.run(None, {name: x[i : i + batch_size].numpy().astype(np.float32)})[0]
           for i in range(0, len(x), batch_size)]
    return torch.from_numpy(np.concatenate(out)).float()
