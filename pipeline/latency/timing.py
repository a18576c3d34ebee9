"""How a latency is measured: interleaved windows of single calls, robust to a noisy machine.

Shared machines do not run at one speed. Measured on the 2-core build machines: the same ONNX
Runtime session alternates between discrete states (0.182, 0.227 and 0.27 ms for one network,
ratios 1.00 / 1.25 / 1.48) that last from tens of milliseconds to more than a second, so the
median of one contiguous block of calls depends on the moment it was taken (47% spread over 20
blocks). Interference only ever adds time. So a latency is measured as:

* ``passes`` windows per model of ``window_s`` seconds each (at least ``min_calls`` calls), every
  call timed on its own (``TimedCall``: synchronous, in milliseconds);
* the windows of several models are *interleaved* (pass 1 of every model, then pass 2, ...), and
  the passes of a small set are spread over at least ``min_span_s`` seconds (the process sleeps
  between passes), so each model is seen in several states of the machine;
* the estimate is the **fastest window median**: a window's median is robust to single slow
  calls, and the fastest window is the machine's undisturbed state. ``spread`` reports how far
  the median window was above it, the figure that says how noisy the measurement was.

The full distribution of calls is kept as ``p50_ms``/``p90_ms``/``p99_ms`` (what a user of the
deployed model sees on this machine, disturbances included).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

TimedCall = Callable[[], float]
"""Runs one batch synchronously and returns its wall time in milliseconds."""


@dataclass(frozen=True)
class TimingProtocol:
    """How many windows per model, how long each, and over how much wall time they spread."""

    passes: int = 10
    window_s: float = 0.005
    min_calls: int = 5
    warmup: int = 3
    min_span_s: float = 0.5
    chunk: int = 64  # models prepared and interleaved at once (memory)

    def __post_init__(self) -> None:
        if self.passes < 1 or self.window_s < 0 or self.min_calls < 1 or self.warmup < 0 or self.chunk < 1:
            raise ValueError(f"invalid timing protocol {self}")


@dataclass(frozen=True)
class Timing:
    """Latency of one batch in milliseconds.

    ``ms``: the estimate (fastest window median); ``window_ms``: every window's median, in pass
    order; ``p50_ms``/``p90_ms``/``p99_ms``: quantiles of all timed calls; ``spread``: median
    window over the fastest, minus 1."""

    ms: float
    window_ms: tuple[float, ...]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    calls: int

    @property
    def spread(self) -> float:
        return statistics.median(self.window_ms) / self.ms - 1.0

    def as_dict(self) -> dict[str, float]:
        d = asdict(self)
        d["window_ms"] = list(self.window_ms)
        d["spread"] = self.spread
        return d


def _quantile(sorted_ms: Sequence[float], q: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, int(q * (len(sorted_ms) - 1) + 0.5))]


def _window(call: TimedCall, window_s: float, min_calls: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        call()
    out: list[float] = []
    end = time.perf_counter() + window_s
    while len(out) < min_calls or time.perf_counter() < end:
        out.append(call())
    return out


def timing_from_windows(windows: Sequence[Sequence[float]]) -> Timing:
    """The estimate and quantiles from per-window call times (ms)."""
    medians = tuple(statistics.median(w) for w in windows)
    calls = sorted(t for w in windows for t in w)
    return Timing(min(medians), medians, _quantile(calls, 0.5), _quantile(calls, 0.9), _quantile(calls, 0.99), len(calls))


def measure_calls(calls: Sequence[TimedCall], protocol: TimingProtocol,
                  on_pass: Callable[[int], None] | None = None) -> list[Timing]:
    """Time every call of ``calls`` in ``protocol.passes`` interleaved windows (see module doc)."""
    windows: list[list[list[float]]] = [[] for _ in calls]
    gap = protocol.min_span_s / protocol.passes
    for p in range(protocol.passes):
        start = time.perf_counter()
        for i, call in enumerate(calls):
            windows[i].append(_window(call, protocol.window_s, protocol.min_calls, protocol.warmup))
        if on_pass is not None:
            on_pass(p)
        idle = gap - (time.perf_counter() - start)
        if idle > 0 and p + 1 < protocol.passes:
            time.sleep(idle)
    return [timing_from_windows(w) for w in windows]
