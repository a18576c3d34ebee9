"""ONNX export: the project's one exporter, for the deployed model file and for the latency
profiler's throw-away graphs.

Both use the TorchScript-based exporter (``dynamo=False``): profiling exports hundreds of small
models and it is about 10x faster than the dynamo exporter, and the export stage checks its own
output against PyTorch. They differ only in ``batch`` (dynamic axis or one fixed batch), ``card``
and ``check``.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.runtimes.errors import ConversionError

# the graph's tensor names, also written into the model card and the handoff manifest
INPUT, OUTPUT = "input", "logits"
METADATA_KEY = "slimdeploy"  # the model card's key in the ONNX metadata


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: str | Path | None = None, *, opset: int = 17,
                batch: int | None = None, card: dict[str, Any] | None = None, check: bool = True) -> bytes:
    """Export ``model`` (fp32) as one ONNX graph with input ``INPUT`` (N, C, H, W) and output
    ``OUTPUT`` (N, classes).

    ``input_shape``: (C, H, W). ``batch``: None gives a dynamic batch axis (traced at batch 2);
    an int fixes the graph at that batch (what the latency profiler times). ``card`` is stored as
    JSON in the model's metadata under ``METADATA_KEY``. ``check`` runs ``onnx.checker`` (full
    check): a ConversionError when it fails. Returns the model's bytes, also written to ``path``
    when one is given. The model is traced in eval mode on its own device; its training
    flag is restored afterwards and it is not moved.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    example = torch.zeros(batch or 2, *input_shape, device=device)
    dynamic = None if batch else {INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}
    buf = io.BytesIO()
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation warning
            torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=opset, input_names=[INPUT],
                              output_names=[OUTPUT], dynamic_axes=dynamic)
    finally:
        model.train(was_training)
    data = buf.getvalue()
    if card is not None or check:
        import onnx

        proto = onnx.load_from_string(data)
        if card is not None:
            onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(card, sort_keys=True)})
            data = proto.SerializeToString()
        if check:
            try:
                onnx.checker.check_model(proto, full_check=True)
            except onnx.checker.ValidationError as err:
                raise ConversionError(f"exported ONNX model fails onnx.checker: {err}") from None
    if path is not None:
        Path(path).write_bytes(data)
    return data
