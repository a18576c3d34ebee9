"""The channel step of the target: latency as a staircase in the number of channels.

Runtimes pad channels to their vector or tile width (ONNX Runtime's blocked NCHWc layout on an
AVX-512 CPU: 16; tensor cores: 8 or more), so a convolution with 17 output channels costs what
one with 32 costs. Pruning to a multiple of that step keeps every layer on the fast path and
saves the most time per channel removed.

The step is a property of the runtime and the hardware, so it is measured on a *probe*: a dense
3x3 convolution (+ BatchNorm + ReLU) at the network's largest feature map, with 64 input
channels, over output counts 1..N. The probe is measured ``repeats`` times (each repeat is a
full interleaved measurement of the N models), the curve is the per-point median of the
repeats, and the step is detected on the median curve *and on every repeat*: a step the repeats
do not all support is not used (the greatest common divisor of the detections is, which every
repeat supports). The target may also state the step (``target.channel_step``); detection then
only feeds the plot and the metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.latency.backends import Backend
from pipeline.latency.timing import TimingProtocol

log = logging.getLogger(__name__)

CANDIDATES = (32, 16, 8, 4, 2)


@dataclass(frozen=True)
class StepDetection:
    """What the probe measured and which step is used.

    ``step``: the channel step used from here on; ``source``: "target" (stated in params),
    "detected" (every repeat agreed) or "repeats disagreed" (their common divisor);
    ``detected``: the step found on the median curve (1: no staircase); ``repeat_steps``: found
    on each repeat alone; ``tolerance``: relative flatness tolerance used; ``probe_spread``:
    median over points of (slowest - fastest repeat) / fastest."""

    step: int
    source: str
    detected: int
    repeat_steps: tuple[int, ...]
    tolerance: float
    probe_spread: float
    curve_ms: tuple[float, ...]
    repeats_ms: tuple[tuple[float, ...], ...]
    layer: str | None
    in_channels: int | None

    @property
    def agree(self) -> bool:
        return len(set(self.repeat_steps) | {self.detected}) == 1

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["agree"] = self.agree
        return d


def detect_step(curve_ms: Sequence[float], tolerance: float = 0.03, candidates: Sequence[int] = CANDIDATES,
                min_flat: float = 0.85) -> int:
    """Largest block size ``s`` at which a latency-vs-output-channels curve (``curve_ms[c - 1]``
    for c = 1..N) is a staircase: at least ``min_flat`` of the points lie within ``tolerance``
    (relative) of their block's median, block medians rise by more than ``tolerance`` from one
    block to the next (median over steps), and inside a block the second half does not sit
    above the first (a ramp is not a staircase). Medians make one noisy point harmless. 1 when
    there is no staircase (latency grows with every channel, or not at all)."""
    n = len(curve_ms)
    for s in sorted(candidates, reverse=True):
        if 2 * s > n:
            continue
        ys = list(curve_ms[: n - n % s])
        blocks = [ys[i : i + s] for i in range(0, len(ys), s)]
        meds = [statistics.median(b) for b in blocks]
        flat = sum(abs(y - m) <= tolerance * m for b, m in zip(blocks, meds) for y in b) / len(ys)
        rise = statistics.median((b - a) / a for a, b in zip(meds, meds[1:]))
        half = s // 2
        inner = statistics.median((statistics.median(b[half:]) - statistics.median(b[:half])) / m
                                  for b, m in zip(blocks, meds))
        if flat >= min_flat and rise > tolerance and inner < 0.25 * rise:
            return s
    return 1


def probe_layer(specs: Sequence[Any]) -> Any | None:
    """The probe: a dense 3x3 convolution at the network's largest feature map with 64 input
    channels (a count every runtime handles on its fast path); None for a network without a
    prunable dense convolution."""
    probe = max((s for s in specs if s.out_group and not s.depthwise),
                key=lambda s: (s.height * s.width, s.out_max), default=None)
    if probe is None:
        return None
    return dataclasses.replace(probe, in_max=64, kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1),
                               bn=True, act="ReLU")


def measure_step(backend: Backend, specs: Sequence[Any], channels: int, repeats: int, protocol: TimingProtocol,
                 stated: int | None = None, max_tolerance: float = 0.10) -> StepDetection:
    """Measure the probe ``repeats`` times over 1..``channels`` outputs and decide the step
    (``stated``, when the target gives one, wins; the detection is still recorded)."""
    from pipeline.latency.table import micro_model

    probe = probe_layer(specs)
    if probe is None:
        return StepDetection(stated or 1, "target" if stated else "no probe layer", 1, (), 0.0, 0.0, (), (), None, None)
    models = [micro_model(probe, probe.in_max, c) for c in range(1, channels + 1)]
    shape = (probe.in_max, probe.height, probe.width)
    reps = [tuple(t.ms for t in backend.measure_many(models, shape, protocol)) for _ in range(repeats)]
    curve = tuple(statistics.median(r[i] for r in reps) for i in range(channels))
    spread = statistics.median((max(r[i] for r in reps) - min(r[i] for r in reps)) / min(r[i] for r in reps)
                               for i in range(channels)) if repeats > 1 else 0.0
    tol = min(max_tolerance, max(0.03, 2 * spread))
    detected = detect_step(curve, tol)
    per_repeat = tuple(detect_step(r, tol) for r in reps)
    if stated:
        step, source = stated, "target"
    elif len(set(per_repeat) | {detected}) == 1:
        step, source = detected, "detected"
    else:
        step = math.gcd(detected, *per_repeat)
        source = "repeats disagreed"
        log.warning("channel step: the probe's repeats disagree (median curve %d, repeats %s, tolerance %.1f%%); "
                    "using %d, which all of them support. State the step with target.channel_step to fix it.",
                    detected, list(per_repeat), 100 * tol, step)
    return StepDetection(step, source, detected, per_repeat, tol, spread, curve, tuple(reps), probe.name, probe.in_max)
