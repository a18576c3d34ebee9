"""Latency lookup table of one network on the target, and the differentiable predictor.

Units are timed as the runtime executes them: every convolution with the BatchNorm and the
activation that directly consume its output (a runtime folds BatchNorm into the convolution and
fuses the activation), at the layer's real input size and the deployment batch, as a model of
its own. Layers with the same shape signature share measurements.

Each unit is measured on a *sampled* grid of (input, output) channel counts: the pruning lattice
of its channel groups (multiples of the target's channel step above ``min_fraction`` of the full
width, plus the full width), thinned to at most ``max_points`` values per axis, evenly spaced,
ends included (nn-Meter samples the configuration space instead of enumerating it). Between grid
points the table interpolates bilinearly, which is exact for costs of the form
a + b c_in + c c_out + d c_in c_out and differentiable in the widths.

A per-layer sum measured in isolation misses what happens *between* layers (layout conversions,
the residual additions, the per-call cost of one graph instead of many), so the prediction is
calibrated on real sub-networks (``pipeline.latency.calibrate``):

    latency(w) = scale * sum over convs l of T_l(w[in_group(l)], w[out_group(l)]) + offset_ms

Until calibrated, ``scale`` is 1 and ``offset_ms`` closes the gap to the measured full network.

Removable residual blocks (``pipeline.blocks.residual_blocks``) are priced from the same units: a
block's keep value ``w["block:<name>"]`` in [0, 1] (1 kept, 0 removed, in between the soft phase's
expectation) multiplies the table latency of every convolution inside it, so a removed block
costs nothing and the widths of its inner channels stop mattering. The addition and activation a
removed block also saves are in no unit; the calibration's sub-networks remove blocks too, so
``scale`` and ``offset_ms`` absorb them on average.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.blocks import BLOCK, is_block, residual_blocks
from pipeline.errors import ConfigError
from pipeline.io import read_json, write_json
from pipeline.latency.backends import Backend, check_fingerprint
from pipeline.latency.timing import TimingProtocol
from pipeline.slim import ChannelGraph, ChannelGroup, tensor_consumers, trace_forward

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
    """Every Conv2d of ``model`` with its input size, channel groups and the BatchNorm and
    activation that consume its output directly (traced on ``example``)."""
    check_supported_layers(model)
    shapes: dict[str, tuple[int, int]] = {}
    named = dict(model.named_modules())
    trace_forward(model, example, (nn.Conv2d,), lambda n, _m, inp, _o: shapes.__setitem__(n, tuple(inp[0].shape[-2:])))
    consumers = tensor_consumers(model, example)
    out_group: dict[str, str] = {}
    in_group: dict[str, str] = {}
    for g in groups:
        for n, kind in g.members:
            (out_group if kind == "out" else in_group).setdefault(n, g.name)
    specs = []
    for n, m in named.items():
        if not isinstance(m, nn.Conv2d) or n not in shapes:
            continue
        dw = m.groups > 1 and m.groups == m.in_channels

        def only(name: str, kinds: tuple[type, ...]) -> str | None:
            nxt = consumers.get(name, set())
            return next(iter(nxt)) if len(nxt) == 1 and isinstance(named[next(iter(nxt))], kinds) else None

        bn_name = only(n, (nn.BatchNorm2d,))
        bn = bn_name is not None and named[bn_name].num_features == m.out_channels
        act_name = only(bn_name if bn else n, _ACTIVATIONS)
        act = type(named[act_name]).__name__ if act_name else None
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


def call_overhead_model(channels: int) -> nn.Module:
    """The cheapest real kernel on a (channels, H, W) input: a 1x1 depthwise convolution. Its
    latency is the per-call cost every isolated unit measurement carries. (An empty model would
    capture an empty CUDA graph on the torch backend.)"""
    return nn.Conv2d(channels, channels, 1, groups=channels, bias=False).eval()


def grid_values(maximum: int, multiple: int, min_fraction: float) -> list[int]:
    """Channel counts a pruned layer may take: multiples of ``multiple`` from
    ``min_fraction * maximum`` up, plus ``maximum`` itself (always >= 1 value)."""
    lo = max(1, math.ceil(min_fraction * maximum))
    vals = [c for c in range(multiple, maximum, multiple) if c >= lo]
    return [*vals, maximum]


def sample_values(values: list[int], k: int) -> list[int]:
    """At most ``k`` (>= 2) of the sorted ``values``, evenly spaced by position, both ends kept."""
    if len(values) <= k:
        return list(values)
    idx = sorted({round(i * (len(values) - 1) / (k - 1)) for i in range(k)})
    return [values[i] for i in idx]


@dataclass
class LatencyTable:
    """The measured table and its calibration. Plain data, saved as JSON (``save``/``load``).

    ``calibration``: ``scale`` and ``offset_ms`` of the prediction, and (once calibrated) the
    sub-networks it was fitted on and the disjoint held-out set it was checked on."""

    fingerprint: dict[str, Any]
    model: dict[str, Any]  # arch, arch_config, input_shape
    groups: dict[str, int]  # group -> full width
    layers: list[dict[str, Any]]  # LayerSpec as dicts
    tables: dict[str, dict[str, Any]]  # key -> {"in": [...], "out": [...], "ms": [[...]]}
    overhead_ms: float
    full_ms: float
    calibration: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    blocks: dict[str, list[str]] = field(default_factory=dict)  # removable block -> its convolutions

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

    @property
    def step(self) -> int:
        """The channel step of the lattice the table was measured on."""
        return int(self.meta["step"])

    def lattice(self, min_fraction: float | None = None, blocks: bool = False) -> dict[str, list[int]]:
        """Allowed widths per channel group: multiples of the step, plus the full width; with
        ``blocks``, also ``"block:<name>": [0, 1]`` per removable block."""
        low = self.meta["min_fraction"] if min_fraction is None else min_fraction
        out = {g: grid_values(n, self.step, low) for g, n in self.groups.items()}
        if blocks:
            out.update({BLOCK + b: [0, 1] for b in self.blocks})
        return out

    def predictor(self) -> LatencyPredictor:
        return LatencyPredictor(self)


class LatencyPredictor:
    """latency_ms(widths): differentiable in the (continuous) widths of the channel groups."""

    def __init__(self, table: LatencyTable) -> None:
        self.groups = dict(table.groups)
        self.scale = float(table.calibration["scale"])
        self.offset = float(table.calibration["offset_ms"])
        self._tabs = {k: (torch.tensor(v["in"], dtype=torch.float64), torch.tensor(v["out"], dtype=torch.float64),
                          torch.tensor(v["ms"], dtype=torch.float64)) for k, v in table.tables.items()}
        self.blocks = {BLOCK + b for b in table.blocks}
        block_of = {n: BLOCK + b for b, names in table.blocks.items() for n in names}
        self._layers = [(layer["key"], layer["in_group"], layer["out_group"], layer["in_max"], layer["out_max"],
                         layer["depthwise"], block_of.get(layer.get("name"))) for layer in table.layers]

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

    def raw(self, widths: Mapping[str, torch.Tensor | float]) -> torch.Tensor:
        """Sum of the units' table latencies (ms), before calibration; a unit inside a block counts
        times the block's keep value (``"block:<name>"``, default 1)."""
        unknown = sorted(set(widths) - set(self.groups) - self.blocks)
        if unknown:
            raise ConfigError(f"widths for unknown channel group(s) {unknown}"
                              + ("" if all(not is_block(k) for k in unknown) else
                                 "; this latency table has no such removable block (re-run the profile stage)"))
        w = {g: torch.as_tensor(widths.get(g, float(n)), dtype=torch.float64) for g, n in self.groups.items()}
        total = torch.zeros((), dtype=torch.float64)
        for key, ig, og, in_max, out_max, dw, block in self._layers:
            c_in = w[ig] if ig else torch.tensor(float(in_max), dtype=torch.float64)
            c_out = w[og] if og else torch.tensor(float(out_max), dtype=torch.float64)
            ms = self.layer_ms(key, c_in, c_in if dw else c_out)
            if block is not None and block in widths:
                ms = ms * torch.as_tensor(widths[block], dtype=torch.float64)
            total = total + ms
        return total

    def __call__(self, widths: Mapping[str, torch.Tensor | float]) -> torch.Tensor:
        """Predicted latency in ms. ``widths``: group -> kept channels (missing groups: full)."""
        return self.scale * self.raw(widths) + self.offset


def build_table(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    backend: Backend,
    model_info: dict[str, Any],
    step: int,
    min_fraction: float,
    max_points: int,
    protocol: TimingProtocol | None = None,
    progress: bool = True,
) -> LatencyTable:
    """Measure the lookup table of ``model`` on ``backend`` (module docstring): every unit on its
    sampled lattice of multiples of ``step``, the per-call overhead and the full network, all in
    one interleaved measurement."""
    t0 = time.perf_counter()
    example = torch.zeros(1, *input_shape)
    graph = ChannelGraph(model, example)
    specs = conv_layers(model, example, graph.groups)
    unique = {s.key: s for s in specs}
    plan: dict[str, tuple[list[int], list[int]]] = {}
    for k, s in unique.items():
        ins = sample_values(grid_values(s.in_max, step, min_fraction), max_points) if s.in_group else [s.in_max]
        outs = ins if s.depthwise else (
            sample_values(grid_values(s.out_max, step, min_fraction), max_points) if s.out_group else [s.out_max])
        plan[k] = (ins, outs)
    points = [(k, ci, co) for k, (ins, outs) in plan.items()
              for ci in ins for co in ([ci] if unique[k].depthwise else outs)]
    models = [call_overhead_model(input_shape[0])]
    shapes: list[tuple[int, ...]] = [tuple(input_shape)]
    for k, ci, co in points:
        s = unique[k]
        models.append(micro_model(s, ci, co))
        shapes.append((ci, s.height, s.width))
    models.append(model)
    shapes.append(tuple(input_shape))
    protocol = protocol or backend.protocol
    chunks = math.ceil(len(models) / protocol.chunk)
    with tqdm(total=protocol.passes * chunks, desc=f"latency table ({len(points)} points)", unit="pass",
              disable=not progress) as bar:
        timings = backend.measure_many(models, shapes, protocol, on_pass=lambda _p: bar.update(1))
    overhead = timings[0].ms
    ms = {p: max(0.0, t.ms - overhead) for p, t in zip(points, timings[1:-1])}
    tables: dict[str, dict[str, Any]] = {}
    for k, (ins, outs) in plan.items():
        if unique[k].depthwise:  # one axis, c_in = c_out = c; lookups stay on the diagonal
            diag = [ms[(k, c, c)] for c in ins]
            rows = [[(diag[i] + diag[j]) / 2 for j in range(len(ins))] for i in range(len(ins))]
        else:
            rows = [[ms[(k, ci, co)] for co in outs] for ci in ins]
        tables[k] = {"in": ins, "out": outs, "ms": rows}
    full = timings[-1]
    table = LatencyTable(
        fingerprint=backend.fingerprint(),
        model={**model_info, "input_shape": list(input_shape)},
        groups={g.name: g.size for g in graph.groups},
        layers=[asdict(s) for s in specs],
        tables=tables,
        overhead_ms=overhead,
        full_ms=full.ms,
        calibration={"scale": 1.0, "offset_ms": 0.0, "calibrated": False},
        meta={"step": step, "min_fraction": min_fraction, "max_points": max_points, "measurements": len(points),
              "seconds": time.perf_counter() - t0, "full": full.as_dict()},
        blocks={b: [s.name for s in specs if s.name.startswith(b + ".")] for b in residual_blocks(model)},
    )
    table.calibration["offset_ms"] = full.ms - table.predictor().raw({}).item()
    return table
