"""Calibrate the table on real sub-networks and measure its error on a disjoint set.

Random sub-networks of the profiled network (a random lattice width per channel group, random
channels of that count, each removable residual block removed with probability ``BLOCK_DROP``) are
built for real, slimmed, and measured end to end on the target, all
in one interleaved measurement together with the full network. The prediction's two constants
are fitted on one set by least squares on the *relative* error (weights 1 / measured):

    measured ~= scale * table_sum(w) + offset_ms

``scale`` absorbs what a unit measured alone systematically over- or under-states (the layout
conversions at its input and output, cache effects), ``offset_ms`` what no unit contains (the
additions, pooling, classifier and the one call into the runtime). The figures that count are
the errors on the held-out set, which the fit never saw: mean and max absolute percentage error,
the fraction within +-10%, and Spearman's rank correlation (how well the predictor orders
networks, which is what pruning needs from it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.blocks import BLOCK, groups_inside_blocks, is_block
from pipeline.latency.backends import Backend
from pipeline.latency.table import LatencyTable
from pipeline.latency.timing import Timing, TimingProtocol
from pipeline.slim import ChannelGraph, prune_structure

log = logging.getLogger(__name__)

BLOCK_DROP = 0.25  # probability that a calibration sub-network removes a given block (pruning removes few)


@dataclass
class Sample:
    """One measured sub-network: its widths, the measurement and the table's raw sum."""

    widths: dict[str, int]
    measured_ms: float
    raw_ms: float
    spread: float

    def as_dict(self, predicted_ms: float) -> dict[str, Any]:
        return {"widths": self.widths, "measured_ms": self.measured_ms, "raw_ms": self.raw_ms,
                "predicted_ms": predicted_ms, "spread": self.spread}


def error_metrics(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, float]:
    """MAPE, max APE, fraction within +-10%, Spearman rank correlation, measured range."""
    from scipy.stats import spearmanr

    ape = [abs(p - m) / m for p, m in zip(predicted, measured)]
    rho = float(spearmanr(predicted, measured).statistic) if len(set(measured)) > 1 else float("nan")
    return {"samples": len(ape), "mape": sum(ape) / len(ape), "max_ape": max(ape),
            "within_10pct": sum(a <= 0.10 for a in ape) / len(ape), "spearman": rho,
            "measured_min_ms": min(measured), "measured_max_ms": max(measured)}


def fit_scale_offset(raw: Sequence[float], measured: Sequence[float]) -> tuple[float, float]:
    """(scale, offset) minimising sum(((scale * raw + offset) - measured) / measured)^2. Falls
    back to scale 1 with the mean gap as offset when the fit is degenerate (too few distinct
    points, or a non-positive scale, which would reverse the budget's gradient)."""
    r = torch.tensor(raw, dtype=torch.float64)
    y = torch.tensor(measured, dtype=torch.float64)
    fallback = (1.0, float((y - r).mean()))
    if len(raw) < 3 or float(r.max() - r.min()) <= 1e-12:
        return fallback
    a = torch.stack([r / y, 1 / y], 1)
    sol = torch.linalg.lstsq(a, torch.ones_like(y).unsqueeze(1)).solution.flatten()
    scale, offset = float(sol[0]), float(sol[1])
    if not (math.isfinite(scale) and math.isfinite(offset)) or scale <= 0:
        return fallback
    return scale, offset


def random_width_sets(lattice: dict[str, list[int]], count: int, generator: torch.Generator,
                      exclude: set[tuple[tuple[str, int], ...]] = frozenset(),
                      inner: dict[str, str] | None = None) -> list[dict[str, int]]:
    """``count`` width configurations, a uniformly random lattice value per group, none in
    ``exclude`` and none twice (fewer when the lattice has fewer configurations). A group inside
    a removed block (``inner``: group -> block key) is put at full width: its width changes
    nothing, so two draws differing only there are the same network."""
    seen = set(exclude)
    out: list[dict[str, int]] = []
    total = math.prod(len(v) for v in lattice.values())

    def draw(g: str, vals: list[int]) -> int:
        if is_block(g):  # [0, 1]: removed with probability BLOCK_DROP
            return int(torch.rand((), generator=generator).item() >= BLOCK_DROP)
        return vals[int(torch.randint(len(vals), (1,), generator=generator))]

    for _ in range(50 * count):
        if len(out) >= count or len(seen) >= total:
            break
        w = {g: draw(g, vals) for g, vals in lattice.items()}
        for g, b in (inner or {}).items():
            if w.get(b) == 0 and g in w:
                w[g] = max(lattice[g])
        key = tuple(sorted(w.items()))
        if key not in seen:
            seen.add(key)
            out.append(w)
    return out


def masks_for(widths: dict[str, int], sizes: dict[str, int], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random channels of each group, ``widths[g]`` of them (latency does not depend on which)."""
    out = {}
    for g, k in widths.items():
        keep = torch.zeros(sizes[g], dtype=torch.bool)
        keep[torch.randperm(sizes[g], generator=generator)[:k]] = True
        out[g] = keep
    return out


@dataclass
class CalibrationResult:
    fit: list[Sample]
    heldout: list[Sample]
    full: Timing
    fit_metrics: dict[str, float]
    heldout_metrics: dict[str, float]
    uncalibrated_heldout_metrics: dict[str, float]


def calibrate(model: nn.Module, table: LatencyTable, backend: Backend, fit_samples: int, heldout_samples: int,
              seed: int, protocol: TimingProtocol | None = None, progress: bool = True) -> CalibrationResult:
    """Measure ``fit_samples`` + ``heldout_samples`` random lattice sub-networks and the full
    network (one interleaved measurement), fit ``table.calibration`` on the first set (the full
    network included) and report the error on the second. Modifies ``table.calibration``."""
    input_shape = tuple(table.model["input_shape"])
    example = torch.zeros(1, *input_shape)
    sizes = {**table.groups, **{BLOCK + b: 1 for b in table.blocks}}
    gen = torch.Generator().manual_seed(seed)
    lattice = table.lattice(blocks=True)
    full_key = tuple(sorted(sizes.items()))
    available = math.prod(len(v) for v in lattice.values()) - 1  # the full network is measured anyway
    if available < fit_samples + heldout_samples:  # a small lattice: split what there is
        fit_samples = min(fit_samples, (available + 1) // 2)
        heldout_samples = available - fit_samples
        log.warning("the lattice has %d sub-network configurations: %d fitted, %d held out", available,
                    fit_samples, heldout_samples)
    producers: dict[str, list[str]] = {}
    for layer in table.layers:
        if layer.get("out_group") and layer.get("name"):
            producers.setdefault(layer["out_group"], []).append(layer["name"])
    inner = groups_inside_blocks(producers, table.blocks)
    fit_w = random_width_sets(lattice, fit_samples, gen, {full_key}, inner)
    held_w = random_width_sets(lattice, heldout_samples, gen, {full_key} | {tuple(sorted(w.items())) for w in fit_w},
                               inner)
    ChannelGraph(model, example)  # fail early, with the slimming error, on a model that cannot be slimmed
    subnets = [prune_structure(model, example, masks_for(w, sizes, gen))
               for w in tqdm(fit_w + held_w, desc="build sub-networks", disable=not progress)]
    protocol = protocol or backend.protocol
    chunks = math.ceil((len(subnets) + 1) / protocol.chunk)
    with tqdm(total=protocol.passes * chunks, desc=f"measure {len(subnets) + 1} networks", unit="pass",
              disable=not progress) as bar:
        timings = backend.measure_many([model, *subnets], input_shape, protocol, on_pass=lambda _p: bar.update(1))
    full, subs = timings[0], timings[1:]
    pred = table.predictor()
    samples = [Sample(w, t.ms, pred.raw(w).item(), t.spread) for w, t in zip(fit_w + held_w, subs)]
    fit, held = samples[: len(fit_w)], samples[len(fit_w):]
    full_sample = Sample(dict(sizes), full.ms, pred.raw({}).item(), full.spread)
    fit_points = [*fit, full_sample]  # the full network anchors the fit
    scale, offset = fit_scale_offset([s.raw_ms for s in fit_points], [s.measured_ms for s in fit_points])
    predict = lambda s: scale * s.raw_ms + offset  # noqa: E731
    anchored = lambda s: s.raw_ms + table.calibration["offset_ms"]  # noqa: E731  (uncalibrated: exact at full width)
    if not held:  # nothing to hold out (the lattice is the full network alone): the full network's error
        log.warning("no sub-network to hold out: the error is the full network's alone")
    check = held or [full_sample]
    measured = [s.measured_ms for s in check]
    fit_m = error_metrics([predict(s) for s in fit_points], [s.measured_ms for s in fit_points])
    held_m = error_metrics([predict(s) for s in check], measured)
    uncalibrated = error_metrics([anchored(s) for s in check], measured)
    table.calibration = {
        "calibrated": True, "scale": scale, "offset_ms": offset, "model": "scale * table_sum + offset_ms",
        "fit_metrics": fit_m, "heldout_metrics": held_m, "uncalibrated_heldout_metrics": uncalibrated,
        "full": {"measured_ms": full.ms, "predicted_ms": predict(full_sample)},
        "fit_set": [s.as_dict(predict(s)) for s in fit], "heldout_set": [s.as_dict(predict(s)) for s in held],
    }
    return CalibrationResult(fit, held, full, fit_m, held_m, uncalibrated)
