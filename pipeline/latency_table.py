"""Latency lookup table measured on the target, and a differentiable predictor built from it.

For every convolution, latency is measured over a grid of (input, output) channel counts on the
target backend at the deployment batch size, as a small model of the convolution with the
BatchNorm and activation that follow it (the runtime fuses them). Layers with the same shape
share measurements. The prediction for a network whose channel groups have widths ``w`` is

    latency(w) = sum over convs l of  T_l(w[in_group(l)], w[out_group(l)])  +  remainder

with ``T_l`` interpolated bilinearly between grid points (differentiable in ``w``) and the
per-call runtime overhead subtracted from each measurement. The remainder (pooling, additions,
classifier, runtime overhead) is the full network's measured latency minus the table's sum at
full width, so the prediction is exact for the unpruned network by construction; how good it is
elsewhere is measured on random sub-networks (``validate``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.errors import ConfigError
from pipeline.io import read_json, write_json
from pipeline.latency import Backend, check_fingerprint
from pipeline.slim import ChannelGroup, ChannelGraph, prune_structure, trace_forward

log = logging.getLogger(__name__)

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU)
_SUPPORTED_LEAVES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.Dropout, nn.Identity, nn.AdaptiveAvgPool2d,
                     nn.AvgPool2d, nn.MaxPool2d, nn.Flatten, nn.Sigmoid, nn.Hardsigmoid, *_ACTIVATIONS)


@dataclass(frozen=True)
class LayerSpec:
    """One convolution of the profiled network and where its channel counts come from."""

    name: str
    key: str  # shape signature; layers with equal keys share a table
    in_group: str | None  # None: input channels fixed (e.g. the image)
    out_group: str | None  # None: output channels fixed
    in_max: int
    out_max: int
    depthwise: bool
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    bias: bool
    height: int
    width: int
    bn: bool
    act: str | None


def check_supported_layers(model: nn.Module) -> None:
    """The predictor models Conv2d/BN/activation/pooling/Linear networks; refuse anything else
    with the layer named, rather than predicting a latency that ignores it."""
    for name, m in model.named_modules():
        if len(list(m.children())) == 0 and not isinstance(m, _SUPPORTED_LEAVES):
            raise ConfigError(
                f"layer {name} ({type(m).__name__}) is not supported by the latency predictor; supported "
                f"layers: {sorted({t.__name__ for t in _SUPPORTED_LEAVES})}"
            )
        if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels:
            raise ConfigError(f"layer {name}: grouped convolution (groups={m.groups}) is not supported by the latency predictor")


def conv_layers(model: nn.Module, example: torch.Tensor, groups: list[ChannelGroup]) -> list[LayerSpec]:
    """Every Conv2d of ``model`` with its input size and channel groups (traced on ``example``)."""
    check_supported_layers(model)
    shapes: dict[str, tuple[int, int]] = {}
    named = dict(model.named_modules())
    trace_forward(model, example, (nn.Conv2d,), lambda n, _m, inp, _o: shapes.__setitem__(n, tuple(inp[0].shape[-2:])))
    out_group: dict[str, str] = {}
    in_group: dict[str, str] = {}
    for g in groups:
        for n, kind in g.members:
            (out_group if kind == "out" else in_group).setdefault(n, g.name)
    order = list(named)
    specs = []
    for n, m in named.items():
        if not isinstance(m, nn.Conv2d) or n not in shapes:
            continue
        dw = m.groups > 1 and m.groups == m.in_channels
        follow = [named[k] for k in order[order.index(n) + 1 : order.index(n) + 4]]
        follow = [f for f in follow if len(list(f.children())) == 0]
        bn = bool(follow) and isinstance(follow[0], nn.BatchNorm2d) and follow[0].num_features == m.out_channels
        rest = follow[1:] if bn else follow
        act = type(rest[0]).__name__ if rest and isinstance(rest[0], _ACTIVATIONS) else None
        og = out_group.get(n)
        ig = og if dw else in_group.get(n)
        h, w = shapes[n]
        key = (f"{'dw' if dw else 'conv'}{m.kernel_size[0]}x{m.kernel_size[1]}s{m.stride[0]}p{m.padding[0]}"
               f"d{m.dilation[0]}{'b' if m.bias is not None else ''}_{h}x{w}_in{m.in_channels}"
               f"{'v' if ig else 'f'}_out{m.out_channels}{'v' if og else 'f'}{'_bn' if bn else ''}{'_' + act if act else ''}")
        specs.append(LayerSpec(n, key, ig, og, m.in_channels, m.out_channels, dw, tuple(m.kernel_size),
                               tuple(m.stride), tuple(m.padding), tuple(m.dilation), m.bias is not None,
                               h, w, bn, act))
    return specs


def micro_model(spec: LayerSpec, c_in: int, c_out: int) -> nn.Module:
    """The convolution (+ BatchNorm + activation) at the given channel counts."""
    groups = c_in if spec.depthwise else 1
    if spec.depthwise:
        c_out = c_in
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, spec.kernel, spec.stride, spec.padding, spec.dilation,
                                         groups=groups, bias=spec.bias)]
    if spec.bn:
        layers.append(nn.BatchNorm2d(c_out))
    if spec.act:
        layers.append(getattr(nn, spec.act)())
    return nn.Sequential(*layers).eval()


def grid_values(maximum: int, multiple: int, min_fraction: float) -> list[int]:
    """Channel counts a pruned layer may take: multiples of ``multiple`` from
    ``min_fraction * maximum`` up, plus ``maximum`` itself (always >= 1 value)."""
    lo = max(1, math.ceil(min_fraction * maximum))
    vals = [c for c in range(multiple, maximum, multiple) if c >= lo]
    return [*vals, maximum]


def detect_multiple(curve_ms: list[float], candidates: tuple[int, ...] = (32, 16, 8, 4, 2), flat_tol: float = 0.03,
                    min_flat: float = 0.85) -> int:
    """Largest block size ``s`` at which a latency-vs-output-channels curve (``curve_ms[c - 1]``
    for c = 1..N) is a staircase: at least ``min_flat`` of the points lie within ``flat_tol``
    (relative) of their block's median, and block medians rise by more than ``flat_tol`` from
    one block to the next (median over steps). Medians make one noisy point harmless. 1 when
    there is no staircase (latency grows with every channel, or not at all)."""
    n = len(curve_ms)
    for s in candidates:
        if 2 * s > n:
            continue
        ys = curve_ms[: n - n % s]
        blocks = [ys[i : i + s] for i in range(0, len(ys), s)]
        meds = [statistics.median(b) for b in blocks]
        flat = sum(abs(y - m) <= flat_tol * m for b, m in zip(blocks, meds) for y in b) / len(ys)
        rises = [(b - a) / a for a, b in zip(meds, meds[1:])]
        # a ramp is not a staircase: inside a block, the second half may not sit much above the first
        half = s // 2
        inner = statistics.median((statistics.median(b[half:]) - statistics.median(b[:half])) / m
                                  for b, m in zip(blocks, meds))
        if flat >= min_flat and statistics.median(rises) > flat_tol and inner < 0.25 * statistics.median(rises):
            return s
    return 1


@dataclass
class LatencyTable:
    """The measured table. Plain data, saved as JSON (``save``/``load``)."""

    fingerprint: dict[str, Any]
    model: dict[str, Any]  # arch, arch_config, input_shape
    groups: dict[str, int]  # group -> full width
    layers: list[dict[str, Any]]  # LayerSpec as dicts
    tables: dict[str, dict[str, Any]]  # key -> {"in": [...], "out": [...], "ms": [[...]]}
    remainder_ms: float
    overhead_ms: float
    full_ms: float
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path, fingerprint: dict[str, Any] | None = None) -> LatencyTable:
        """Load; with ``fingerprint``, refuse a table measured under a different one."""
        try:
            table = cls(**read_json(path))
        except FileNotFoundError:
            raise ConfigError(f"latency table {path} does not exist; run the profile stage") from None
        except (ValueError, TypeError) as err:  # bad JSON or unexpected keys
            raise ConfigError(f"{path} is not a latency table written by the profile stage: {err}") from None
        if fingerprint is not None:
            check_fingerprint(table.fingerprint, fingerprint, f"latency table {path}")
        return table

    def predictor(self) -> LatencyPredictor:
        return LatencyPredictor(self)


class LatencyPredictor:
    """latency_ms(widths): differentiable in the (continuous) widths of the channel groups."""

    def __init__(self, table: LatencyTable) -> None:
        self.groups = dict(table.groups)
        self.remainder = table.remainder_ms
        self._tabs = {k: (torch.tensor(v["in"], dtype=torch.float64), torch.tensor(v["out"], dtype=torch.float64),
                          torch.tensor(v["ms"], dtype=torch.float64)) for k, v in table.tables.items()}
        self._layers = [(layer["key"], layer["in_group"], layer["out_group"], layer["in_max"], layer["out_max"],
                         layer["depthwise"]) for layer in table.layers]

    @staticmethod
    def _locate(grid: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cell index i and position t in [0, 1] of ``x`` on ``grid`` (clamped to its range)."""
        if grid.numel() == 1:
            return torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.float64)
        x = x.clamp(grid[0], grid[-1])
        i = (torch.searchsorted(grid, x.detach().reshape(1), right=True) - 1).clamp(0, grid.numel() - 2)[0]
        return i, (x - grid[i]) / (grid[i + 1] - grid[i])

    def layer_ms(self, key: str, c_in: torch.Tensor, c_out: torch.Tensor) -> torch.Tensor:
        gin, gout, ms = self._tabs[key]
        i, ti = self._locate(gin, c_in)
        o, to = self._locate(gout, c_out)
        i1 = (i + 1).clamp(max=gin.numel() - 1)
        o1 = (o + 1).clamp(max=gout.numel() - 1)
        return ((1 - ti) * (1 - to) * ms[i, o] + ti * (1 - to) * ms[i1, o] + (1 - ti) * to * ms[i, o1]
                + ti * to * ms[i1, o1])

    def __call__(self, widths: Mapping[str, torch.Tensor | float]) -> torch.Tensor:
        """Predicted latency in ms. ``widths``: group -> kept channels (missing groups: full)."""
        unknown = sorted(set(widths) - set(self.groups))
        if unknown:
            raise ConfigError(f"widths for unknown channel group(s) {unknown}")
        w = {g: torch.as_tensor(widths.get(g, float(n)), dtype=torch.float64) for g, n in self.groups.items()}
        total = torch.tensor(self.remainder, dtype=torch.float64)
        for key, ig, og, in_max, out_max, dw in self._layers:
            c_in = w[ig] if ig else torch.tensor(float(in_max), dtype=torch.float64)
            c_out = w[og] if og else torch.tensor(float(out_max), dtype=torch.float64)
            total = total + self.layer_ms(key, c_in, c_in if dw else c_out)
        return total


def staircase(backend: Backend, spec: LayerSpec, max_channels: int) -> list[float]:
    """Latency (ms, overhead included) of ``spec`` for every output count 1..``max_channels``."""
    c_in = spec.in_max
    return [backend.measure(micro_model(spec, c_in, c), (c_in, spec.height, spec.width)).median_ms
            for c in range(1, max_channels + 1)]


def build_table(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    backend: Backend,
    model_info: dict[str, Any],
    multiple: int | None,
    min_fraction: float,
    max_seconds: float,
    staircase_channels: int = 64,
    progress: bool = True,
) -> LatencyTable:
    """Measure the lookup table of ``model`` on ``backend``.

    ``multiple``: channel counts are measured (and pruned) in steps of this; None detects it from
    the staircase of the widest non-depthwise convolution (also stored, for the plot). The step is
    doubled while the planned measurements would not fit in ``max_seconds``.
    """
    t0 = time.perf_counter()
    example = torch.zeros(1, *input_shape)
    graph = ChannelGraph(model, example)
    specs = conv_layers(model, example, graph.groups)
    unique = {s.key: s for s in specs}
    overhead = backend.measure(nn.Identity(), input_shape).median_ms  # per-call cost of an empty graph
    # The staircase is a property of runtime and hardware: probe a dense convolution at the largest
    # feature map of the network, with 64 input channels (a count every runtime handles on its
    # fast path), over output counts 1..staircase_channels.
    probe = max((s for s in specs if s.out_group and not s.depthwise),
                key=lambda s: (s.height * s.width, s.out_max), default=None)
    if probe is not None:
        probe = dataclasses.replace(probe, in_max=64, kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1))
    curve: list[float] = []
    if probe is not None:
        curve = staircase(backend, probe, staircase_channels)
    detected = detect_multiple(curve) if curve else 1
    step = multiple or detected
    per_point = (time.perf_counter() - t0) / max(1, len(curve) + 1)

    def plan(step: int) -> dict[str, tuple[list[int], list[int]]]:
        out = {}
        for k, s in unique.items():
            ins = grid_values(s.in_max, step, min_fraction) if s.in_group else [s.in_max]
            outs = ins if s.depthwise else (grid_values(s.out_max, step, min_fraction) if s.out_group else [s.out_max])
            out[k] = (ins, outs)
        return out

    grid = plan(step)
    count = lambda g: sum(len(a) * (1 if unique[k].depthwise else len(b)) for k, (a, b) in g.items())  # noqa: E731
    while count(grid) * per_point > max_seconds and step < 1024:
        log.warning("%d measurements at a step of %d channels need ~%.0f s > profile.max_seconds %.0f; "
                    "doubling the step", count(grid), step, count(grid) * per_point, max_seconds)
        step *= 2
        grid = plan(step)
    tables: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=count(grid), desc="latency table", unit="pt", disable=not progress)
    for key, (ins, outs) in grid.items():
        s = unique[key]

        def ms(c_in: int, c_out: int) -> float:
            bar.update(1)
            t = backend.measure(micro_model(s, c_in, c_out), (c_in, s.height, s.width)).median_ms
            return max(0.0, t - overhead)

        if s.depthwise:  # one axis: c_in = c_out = c; stored as a table whose lookups stay on (c, c)
            diag = [ms(c, c) for c in ins]
            rows = [[(diag[i] + diag[j]) / 2 for j in range(len(ins))] for i in range(len(ins))]
        else:
            rows = [[ms(ci, co) for co in outs] for ci in ins]
        tables[key] = {"in": ins, "out": outs, "ms": rows}
    bar.close()
    full = backend.measure(model, input_shape)
    table = LatencyTable(
        fingerprint=backend.fingerprint(),
        model={**model_info, "input_shape": list(input_shape)},
        groups={g.name: g.size for g in graph.groups},
        layers=[asdict(s) for s in specs],
        tables=tables,
        remainder_ms=0.0,
        overhead_ms=overhead,
        full_ms=full.median_ms,
        meta={"multiple": step, "detected_multiple": detected, "min_fraction": min_fraction,
              "measurements": count(grid), "seconds": time.perf_counter() - t0, "full": full.as_dict(),
              "staircase": {"layer": probe.name if probe else None, "in_channels": probe.in_max if probe else None,
                            "ms": curve}},
    )
    table.remainder_ms = full.median_ms - table.predictor()({}).item()
    return table


def lattice_masks(groups: list[ChannelGroup], table: LatencyTable, generator: torch.Generator,
                  on_lattice: bool = True) -> dict[str, torch.Tensor]:
    """Random sub-network: per group a random width (a table grid value when ``on_lattice``,
    otherwise any count from min_fraction * size to size) and random channels of that count."""
    mult, low = table.meta["multiple"], table.meta["min_fraction"]
    out = {}
    for g in groups:
        choices = grid_values(g.size, mult, low) if on_lattice else list(range(max(1, math.ceil(low * g.size)), g.size + 1))
        k = choices[int(torch.randint(len(choices), (1,), generator=generator))]
        keep = torch.zeros(g.size, dtype=torch.bool)
        keep[torch.randperm(g.size, generator=generator)[:k]] = True
        out[g.name] = keep
    return out


@dataclass
class Validation:
    predicted_ms: list[float]
    measured_ms: list[float]
    widths: list[dict[str, int]]

    def metrics(self) -> dict[str, float]:
        from scipy.stats import spearmanr

        ape = [abs(p - m) / m for p, m in zip(self.predicted_ms, self.measured_ms)]
        return {
            "samples": len(ape),
            "mape": sum(ape) / len(ape),
            "max_ape": max(ape),
            "spearman": float(spearmanr(self.predicted_ms, self.measured_ms).statistic),
            "measured_min_ms": min(self.measured_ms),
            "measured_max_ms": max(self.measured_ms),
        }


def validate(
    model: nn.Module, table: LatencyTable, backend: Backend, samples: int, seed: int,
    on_lattice: bool = True, progress: bool = True,
) -> Validation:
    """Build ``samples`` random sub-networks for real (``lattice_masks``), measure each end to
    end on ``backend`` and compare with the prediction."""
    input_shape = tuple(table.model["input_shape"])
    example = torch.zeros(1, *input_shape)
    groups = ChannelGraph(model, example).groups
    predictor = table.predictor()
    gen = torch.Generator().manual_seed(seed)
    out = Validation([], [], [])
    for _ in tqdm(range(samples), desc="validate predictor", disable=not progress):
        masks = lattice_masks(groups, table, gen, on_lattice)
        widths = {g: int(m.sum()) for g, m in masks.items()}
        sub = prune_structure(model, example, masks)
        out.measured_ms.append(backend.measure(sub, input_shape).median_ms)
        out.predicted_ms.append(predictor(widths).item())
        out.widths.append(widths)
    return out


def noise_floor(model: nn.Module, backend: Backend, input_shape: tuple[int, int, int], repeats: int) -> dict[str, float]:
    """The same model measured ``repeats`` times: how much a single measurement moves."""
    from pipeline.latency import export_onnx_bytes

    if hasattr(backend, "measure_onnx"):
        blob = export_onnx_bytes(model, torch.zeros(backend.batch_size, *input_shape))
        meas: Callable[[], float] = lambda: backend.measure_onnx(blob, input_shape).median_ms  # noqa: E731
    else:
        meas = lambda: backend.measure(model, input_shape).median_ms  # noqa: E731
    ms = [meas() for _ in range(repeats)]
    med = sorted(ms)[len(ms) // 2]
    return {"repeats": repeats, "median_ms": med, "min_ms": min(ms), "max_ms": max(ms),
            "mean_abs_dev_pct": 100 * sum(abs(m - med) for m in ms) / len(ms) / med,
            "spread_pct": 100 * (max(ms) - min(ms)) / med}
