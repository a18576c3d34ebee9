"""``target.precision: auto``: the precision the target deploys in, chosen before anything is
measured for pruning, so that the latency table, the channel step, the calibration, the closed loop,
compare and the engine all measure the network in the precision it will run in.

The candidates are what the target's runtime runs: fp32 and int8 (a post-training Q/DQ model,
``pipeline.quantize``) with ONNX Runtime on a CPU. For the trained network to be compressed:

* **accuracy**: its validation accuracy as its fp32 ONNX model and as the Q/DQ model the engine
  would build (the engine's calibration images, activation type and float fallback), both run by
  ONNX Runtime; int8 is eligible when it loses at most ``engine.max_accuracy_drop``, the engine's
  own bound;
* **latency**: those two models timed interleaved on the target, ``readings`` times; int8 is kept
  when it is eligible and its median ratio to fp32 is under 1. The int8 model timed is the one
  whose accuracy was read: with layers left in float it may be slower than an all-int8 model.

The choice is taken on the unpruned network: pruning then spends the budget in the precision
chosen. A CPU without VNNI can run int8 slower than fp32 (ONNX Runtime's docs warn of it; ENV.md
measures it), which is why the ratio is measured, not assumed.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

log = logging.getLogger(__name__)
CHOICE_KEYS = ("backend", "device", "batch_size", "threads", "int8_activations")
"""The ``target`` settings an auto choice was measured under: the choice records them (and the
model's hash), and a stage whose params or model differ refuses it (``stages._common.deployed_target``)."""

@dataclass(frozen=True)
class Evidence:
    """What the choice is taken on: validation accuracies and the int8/fp32 latency ratios, one per
    paired reading."""

    fp32_val_acc: float
    int8_val_acc: float
    ratios: tuple[float, ...]
    max_drop: float
    float_layers: int = 0  # layers the int8 model keeps in float (engine.int8_fallback)

    @property
    def drop(self) -> float:
        return self.fp32_val_acc - self.int8_val_acc

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)


def decide(ev: Evidence) -> tuple[str, str]:
    """(precision, why): int8 when it is within the accuracy bound and measures faster than fp32."""
    within = ev.drop <= ev.max_drop + 1e-12
    faster = ev.ratio < 1.0
    points = round(-100 * ev.drop, 2) + 0.0  # no "-0.00"
    acc = f"int8 scores {points:+.2f} points against fp32 on the validation split"
    if within and faster:
        return "int8", f"{acc} (at most {100 * ev.max_drop:.2f} below allowed) and measures {ev.ratio:.3f} of fp32"
    reasons = []
    if not within:
        reasons.append(f"{acc}, more than the {100 * ev.max_drop:.2f} below that engine.max_accuracy_drop allows")
    if not faster:
        reasons.append(f"int8 measures {ev.ratio:.3f} of fp32 on this target: not faster")
    return "fp32", "; ".join(reasons)


def measure_ratios(target: Any, int8_onnx: bytes, fp32_onnx: bytes, shape: tuple[int, ...],
                   readings: int) -> tuple[float, ...]:
    """The int8 model's latency over the fp32 model's, each of ``readings`` readings timing the two
    ONNX models interleaved on the target (its runtime, threads, batch and timing protocol). Both are
    timed as given (the int8 one is the Q/DQ model whose accuracy was read, layers left in float
    included), by the runtime at fp32, which quantizes nothing itself."""
    from pipeline.latency import target_backend

    runtime = target_backend(target.model_copy(update={"precision": "fp32"}))
    calls = [runtime.prepare_onnx(int8_onnx, shape), runtime.prepare_onnx(fp32_onnx, shape)]
    return tuple(r[0].ms / r[1].ms for r in runtime.measure_readings([], shape, readings=readings, extra=calls))


def evidence(model: nn.Module, data: Any, target: Any, engine: Any, readings: int) -> Evidence:
    """``Evidence`` for ``model`` (trained, eval mode) on ``data``'s validation split: its fp32 ONNX
    model against the Q/DQ model the engine stage would build from it (``int8_within_bound``:
    ``engine.calibration_images``, the target's activation type, the float fallback
    ``engine.int8_fallback`` asks for), both scored by ONNX Runtime and both timed."""
    from pipeline.quantize import calibration_images, fallback_split, quantized
    from pipeline.runtimes import ort_logits, ort_session

    shape = (data.channels, *data.meta["image_size"])
    val = fallback_split(data, "float_layers")  # scored on whether or not layers may stay in float
    fallback = None if engine.int8_fallback == "none" else (val, engine.max_accuracy_drop)

    def accuracy(path: Path) -> float:
        x, y = val
        return (ort_logits(ort_session(path, "cpu", target.threads, log_severity=3), x).argmax(1) == y).double().mean().item()

    with quantized(model, shape, calibration_images(data, engine.calibration_images), target.int8_activations,
                   fallback, target.threads) as (src, dst, quant):
        checked = quant.get("float_fallback") or {}  # the fallback scored both on the same split already
        accs = ((checked["val_acc_fp32"], checked["val_acc"]) if "val_acc" in checked
                else (accuracy(src), accuracy(dst)))
        ratios = measure_ratios(target, dst.read_bytes(), src.read_bytes(), shape, readings)
        return Evidence(*accs, ratios, engine.max_accuracy_drop, len(quant.get("float_nodes") or ()))


def record(requested: str, chosen: str, why: str, ev: Evidence | None) -> dict[str, Any]:
    """metrics/precision.json."""
    out: dict[str, Any] = {"requested": requested, "precision": chosen, "why": why}
    if ev is not None:
        out.update(fp32_val_acc=ev.fp32_val_acc, int8_val_acc=ev.int8_val_acc, int8_drop=ev.drop,
                   max_accuracy_drop=ev.max_drop, int8_over_fp32=ev.ratio,
                   int8_over_fp32_range=[min(ev.ratios), max(ev.ratios)], readings=len(ev.ratios),
                   int8_float_layers=ev.float_layers)
    return out
