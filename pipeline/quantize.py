"""Post-training static INT8 quantization of an exported ONNX model into explicit Q/DQ form, with
ONNX Runtime's quantization tools (the same Q/DQ file runs on ONNX Runtime and builds in a strongly
typed TensorRT network).

* Weights: int8, symmetric, per output channel.
* Activations: ``uint8`` (asymmetric; ONNX Runtime's U8S8 kernels) or ``int8`` (symmetric; S8S8).
  Which one is faster depends on the CPU and must be measured on the target: on a 2-core Intel
  Xeon with VNNI, U8S8 ran resnet18 2.98x faster than fp32 and S8S8 0.98x (issue 30's table).
* Ranges: min/max over ``calibration`` images of the training split, in their evaluation view,
  normalised as the model sees them. The graph is first pre-processed as ONNX Runtime's
  documentation recommends (shape inference, BatchNorm folded into the convolutions), so every
  convolution is quantized with its folded weights.

``calibration_rows`` picks the images; ``quantize_int8`` writes the Q/DQ model and returns the
record the manifest keeps (tool and version, types, calibration count and hash).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)
Activation = Literal["uint8", "int8"]


def calibration_rows(available: int, count: int, seed: int, key: str = "engine.calibration_images") -> torch.Tensor:
    """``count`` distinct training rows drawn with ``seed`` (sorted): a ConfigError naming ``key``
    when ``count`` is below 1 or above the ``available`` rows."""
    if not 1 <= count <= available:
        raise ConfigError(f"{key} is {count}: calibration needs between 1 and the training split's {available} "
                          f"images; set {key} within [1, {available}]")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(available, generator=g)[:count].sort().values


def calibration_images(data: Any, count: int, key: str = "engine.calibration_images") -> torch.Tensor:
    """``count`` training images of ``data`` (``pipeline.data.PreparedData``; evaluation view,
    normalised) that int8 ranges are calibrated on, drawn with seed 0: the same for every runtime
    and every stage (the engine, compare)."""
    from pipeline.data import Normalized

    return Normalized(data.train, *data.norm())[calibration_rows(len(data.train), count, seed=0, key=key)]


def fallback_split(data: Any, int8_fallback: str) -> tuple[Any, torch.Tensor] | None:
    """The validation split (normalised rows, labels) ``int8_within_bound`` leaves layers in float
    by, for ``engine.int8_fallback`` float_layers; None for none (every layer int8)."""
    from pipeline.data import Normalized

    return None if int8_fallback == "none" else (Normalized(data.val, *data.norm()), torch.as_tensor(data.val.y))


def _batches(images: Any, batch_size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(images), batch_size):
        yield np.ascontiguousarray(images[i:i + batch_size].numpy().astype(np.float32))


@contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantization tools log every bias they copy at INFO on the root logger: hundreds
    of lines per model, through the stages' own log handler. Silenced below WARNING while they run."""
    before = logging.root.manager.disable
    logging.disable(max(before, logging.INFO))
    try:
        yield
    finally:
        logging.disable(before)


def _record(images: Any, activation: Activation, batch_size: int, float_nodes: Sequence[str]) -> dict[str, Any]:
    """What the manifest keeps of one quantization: tool and version, types, the calibration images'
    count and SHA-256, the nodes left in float. Refuses an unknown type or no images."""
    import onnxruntime

    if activation not in ("uint8", "int8"):
        raise ConfigError(f"int8 activations must be uint8 or int8, got {activation!r}")
    if len(images) < 1:
        raise ConfigError("int8 calibration needs at least one image, got none")
    digest = hashlib.sha256()
    for b in _batches(images, batch_size):
        digest.update(b.tobytes())
    return {"tool": f"onnxruntime.quantization {onnxruntime.__version__}", "format": "QDQ",
            "weights": "int8, symmetric, per output channel", "activations": activation,
            "activations_symmetric": activation == "int8", "ranges": "min/max",
            "calibration": {"images": len(images), "sha256": digest.hexdigest()}, "float_nodes": list(float_nodes)}


def _preprocess(onnx_in: str | Path, tmp: Path) -> Path:
    """ONNX Runtime's recommended pre-processing (shape inference, BatchNorm folded) into ``tmp``."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = tmp / "pre.onnx"
    with _quiet():
        quant_pre_process(str(onnx_in), str(pre), skip_symbolic_shape=True)
    return pre


def _qdq(pre: Path, onnx_out: str | Path, images: Any, activation: Activation, batch_size: int,
         float_nodes: Sequence[str] = (), cache: Path | None = None) -> None:
    """``quantize_static`` of the pre-processed model ``pre`` into ``onnx_out``."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self, name: str) -> None:
            self.name, self.it = name, _batches(images, batch_size)

        def get_next(self) -> dict[str, np.ndarray] | None:
            b = next(self.it, None)
            return None if b is None else {self.name: b}

    name = onnx.load(str(pre), load_external_data=False).graph.input[0].name
    with _quiet():
        quantize_static(str(pre), str(onnx_out), Reader(name), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8 if activation == "uint8" else QuantType.QInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=list(float_nodes) or None,
                        extra_options={"ActivationSymmetric": activation == "int8", "WeightSymmetric": True},
                        calibration_cache_path=None if cache is None else str(cache))


def quantize_int8(onnx_in: str | Path, onnx_out: str | Path, images: Any, activation: Activation = "uint8",
                  batch_size: int = 32, float_nodes: Sequence[str] = ()) -> dict[str, Any]:
    """Write the Q/DQ INT8 model of ``onnx_in`` to ``onnx_out``, ranges calibrated on ``images``
    (normalised (N, C, H, W) rows: a tensor, or ``pipeline.data.Normalized``). Returns the record:
    tool, format, types, calibration image count and the SHA-256 of their bytes.
    ``float_nodes``: nodes of the pre-processed graph (``quantizable_nodes``) left in float."""
    record = _record(images, activation, batch_size, float_nodes)
    with tempfile.TemporaryDirectory() as tmp:
        _qdq(_preprocess(onnx_in, Path(tmp)), onnx_out, images, activation, batch_size, float_nodes)
    return record


QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")


def _weighted_nodes(pre: Path) -> list[str]:
    import onnx

    return [n.name for n in onnx.load(str(pre), load_external_data=False).graph.node if n.op_type in QUANTIZED_OPS]


def quantizable_nodes(onnx_in: str | Path) -> list[str]:
    """Names of the nodes ``quantize_int8`` quantizes with their weights (convolutions, linear
    layers), in graph order, as named in the pre-processed graph it quantizes."""
    with tempfile.TemporaryDirectory() as tmp:
        return _weighted_nodes(_preprocess(onnx_in, Path(tmp)))


def _kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean KL divergence of ``other``'s softmax from ``reference``'s: how far a quantized model's
    predictions moved, a smooth measure where accuracy on a few hundred images is not."""
    p = torch.log_softmax(reference.double(), 1)
    return float((p.exp() * (p - torch.log_softmax(other.double(), 1))).sum(1).mean())


def int8_within_bound(onnx_in: str | Path, onnx_out: str | Path, images: Any, activation: Activation,
                      val: tuple[Any, torch.Tensor] | None, max_drop: float, threads: int = 1,
                      batch_size: int = 32) -> dict[str, Any]:
    """The Q/DQ model of ``onnx_in`` whose accuracy on ``val`` (normalised rows, labels) is within
    ``max_drop`` of the fp32 model's, keeping as many nodes quantized as it can: every node
    quantized first; when that drops more, each quantizable node's sensitivity is measured (the
    KL divergence from the fp32 predictions on ``val`` when every *other* node is quantized and it
    alone stays in float, against all quantized: what keeping it in float recovers), and the most
    sensitive nodes stay in float, 1, 2, 4, ... of them, until the drop is within the bound or every
    one of them is float (the other operators, and a tensor between two int8 nodes, stay quantized:
    the caller's test-split check then decides). ``val`` None (no fallback asked for) or empty:
    every node int8, nothing checked. The graph is pre-processed and the ranges calibrated once for
    every trial. Written to ``onnx_out``; returns ``quantize_int8``'s record, with (when checked)
    ``float_fallback``: ``val`` accuracies, the sensitivity of every node and the nodes left in float."""
    from pipeline.runtimes import ort_logits, ort_session

    if val is None or len(val[1]) == 0:
        record = quantize_int8(onnx_in, onnx_out, images, activation, batch_size)
        if val is not None:
            record["float_fallback"] = {"val_images": 0, "sensitivity": None, "max_accuracy_drop": max_drop}
        return record
    x, y = val

    def logits(path: Path) -> torch.Tensor:
        return ort_logits(ort_session(path, "cpu", threads, log_severity=3), x)

    def acc(out: torch.Tensor) -> float:
        return (out.argmax(1) == y).double().mean().item()

    record = _record(images, activation, batch_size, ())
    ref = logits(Path(onnx_in))
    with tempfile.TemporaryDirectory() as tmp:
        pre = _preprocess(onnx_in, Path(tmp))
        cache, trial = Path(tmp) / "ranges.json", Path(tmp) / "trial.onnx"
        _qdq(pre, onnx_out, images, activation, batch_size, cache=cache)
        full = logits(Path(onnx_out))
        info: dict[str, Any] = {"val_images": len(y), "val_acc_fp32": acc(ref), "val_acc_all_int8": acc(full),
                                "max_accuracy_drop": max_drop}
        if acc(ref) - acc(full) <= max_drop:
            record["float_fallback"] = {**info, "val_acc": acc(full), "sensitivity": None}
            return record
        nodes = _weighted_nodes(pre)
        base = _kl(ref, full)
        sens = {}
        for n in nodes:  # what leaving n alone in float recovers
            _qdq(pre, trial, images, activation, batch_size, [n], cache)
            sens[n] = base - _kl(ref, logits(trial))
        order = sorted(nodes, key=lambda n: -sens[n])
        k = 1
        while True:
            k = min(k, len(order))
            _qdq(pre, onnx_out, images, activation, batch_size, order[:k], cache)
            last = acc(logits(Path(onnx_out)))
            if acc(ref) - last <= max_drop or k == len(order):
                break
            k *= 2
    record["float_nodes"] = order[:k]
    record["float_fallback"] = {**info, "val_acc": last, "kl_all_int8": base,
                                "sensitivity": [{"node": n, "kl_recovered": sens[n]} for n in order]}
    if acc(ref) - last > max_drop:
        log.warning("int8 (%s activations): with all %d convolution and linear layers in float the validation "
                    "accuracy is still %.2f points below fp32 (the tensors between layers stay quantized)",
                    activation, len(order), 100 * (acc(ref) - last))
    return record


def qdq_nodes(path: str | Path) -> int:
    """QuantizeLinear nodes in the ONNX model at ``path`` (0: not explicitly quantized)."""
    import onnx

    return sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(path), load_external_data=False).graph.node)


def int8_accuracies(model: torch.nn.Module, input_shape: tuple[int, ...], calibration: Any, activation: Activation,
                    splits: dict[str, tuple[Any, torch.Tensor]], threads: int = 1,
                    fallback: tuple[tuple[Any, torch.Tensor], float] | None = None) -> dict[str, float]:
    """Top-1 accuracy of ``model``'s Q/DQ INT8 model (``quantize_int8``, ranges from ``calibration``)
    run by ONNX Runtime's CPU provider, on every split of ``splits``: name -> (normalised rows, as
    ``pipeline.data.Normalized`` gives them; labels). ``fallback``: (validation split, max drop):
    the layers most sensitive to quantization left in float as the engine stage leaves them
    (``int8_within_bound``). What a network deployed in int8 scores: the accuracy compare reports
    beside the fp32 one when the target measures int8."""
    from pipeline.runtimes import ort_logits, ort_session

    with quantized(model, input_shape, calibration, activation, fallback, threads) as (_, dst, _):
        sess = ort_session(dst, "cpu", threads, log_severity=3)
        return {name: (ort_logits(sess, x).argmax(1) == y).double().mean().item() for name, (x, y) in splits.items()}


@contextmanager
def quantized(model: torch.nn.Module, input_shape: tuple[int, ...], calibration: Any, activation: Activation,
              fallback: tuple[tuple[Any, torch.Tensor], float] | None = None,
              threads: int = 1) -> Iterator[tuple[Path, Path, dict[str, Any]]]:
    """``model`` exported to ONNX and its Q/DQ model (``int8_within_bound`` with ``fallback``:
    (validation split, max drop), or None for every layer int8), as (fp32 path, int8 path, record),
    in a temporary directory that lives as long as the ``with`` block."""
    from pipeline.runtimes import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        export_onnx(model, input_shape, src, check=False)
        record = int8_within_bound(src, dst, calibration, activation, *(fallback or (None, 0.0)), threads)
        yield src, dst, record
