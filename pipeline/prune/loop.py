"""The closed loop on the target: the hard network is slimmed and measured end to end; over the
band, the group whose next smaller width costs the least validation loss per millisecond saved
shrinks; under it, the most probable missing channels grow back, step after step up to where the
table expects the band's middle, in one measurement. Moves expected to
jump over the band are taken last (expected landing: the table's prediction rescaled by the
current measured / predicted ratio). Every iteration is recorded. It stops inside the band, or
says why it cannot (smallest network over the band, widths oscillating across the band,
iteration cap), keeping the best network under the band's top."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from pipeline.prune.budget import band_ms
from pipeline.prune.groups import is_live, top_mask, widths_of

Masks = dict[str, torch.Tensor]
SAVES_NOTHING = 1e-9  # of the network's latency: a move predicted to save less is taken to save nothing (a
                      # float difference of two equal predictions once priced a block at -1e16 val loss per ms)


@dataclass
class LoopResult:
    masks: Masks
    measured_ms: float
    status: Literal["in_band", "below_band", "unreachable", "full"]
    reason: str
    history: list[dict[str, Any]] = field(default_factory=list)


def _step(masks: Masks, keep: Mapping[str, torch.Tensor], group: str, width: int) -> Masks:
    new = dict(masks)
    new[group] = top_mask(keep[group], width)
    return new


@dataclass(frozen=True)
class _Here:
    """One measured state of the loop and what ranks the moves from it."""

    state: Masks
    widths: dict[str, int]
    ms: float
    cost: float
    scale: float  # measured / predicted here: a move is judged by where it should land on the target
    lo: float
    hi: float


def _shrink(here: _Here, keep_probs: Mapping[str, torch.Tensor], allowed: Mapping[str, list[int]],
            predict: Callable[[dict[str, int]], float], cost: Callable[[Masks], float],
            inside: Mapping[str, str]) -> tuple[Masks, str] | None:
    """The next state when over the band (None: every group at its smallest width)."""
    moves = []  # (saves nothing, where it lands, landing ms, saving ms, group, width, state)
    mid = (here.lo + here.hi) / 2
    for g, a in allowed.items():
        smaller = [w for w in a if w < here.widths[g]]
        if not smaller or not is_live(g, here.widths, inside):
            continue
        landing_of = {w: here.scale * predict({**here.widths, g: w}) for w in smaller}
        # the next smaller width, and the one predicted to land nearest the band's middle (one
        # measurement instead of many small steps on a fine lattice)
        for w in {max(smaller), min(smaller, key=lambda v: (abs(landing_of[v] - mid), -v))}:
            landing = landing_of[w]
            saving = here.ms - landing  # on the staircase a narrower layer can be predicted no faster
            saves_nothing = saving <= SAVES_NOTHING * here.ms  # rounding, not a saving: not priced per ms
            # prefer moves predicted to land in the band, then moves still over it, then those
            # overshooting below it (the least); moves predicted to save nothing last
            where = 0 if here.lo <= landing <= here.hi else (1 if landing > here.hi else 2)
            moves.append((saves_nothing, where, landing, saving, g, w, _step(here.state, keep_probs, g, w)))
    if not moves:
        return None

    def per_ms(move: tuple) -> float:  # validation loss added per ms saved (one forward pass of the val images)
        return (cost(move[6]) - here.cost) / move[3] if not move[0] else float("nan")

    # within the best class, the cheapest in validation loss per ms saved (overshooting moves: the one
    # landing highest); only that class's moves are priced
    best = min(m[:2] for m in moves)
    options = [(*m[:2], per_ms(m) if m[1] < 2 and not m[0] else -m[2], m[4], -m[5], m) for m in moves if m[:2] == best]
    chosen = min(options, key=lambda o: o[:5])
    move = chosen[5]
    price = chosen[2] if move[1] < 2 and not move[0] else per_ms(move)
    why = "predicted to save nothing" if math.isnan(price) else f"val loss {price:+.3g} per ms saved"
    return move[6], f"shrink {move[4]} to {widths_of(move[6])[move[4]]} ({why})"


def _grow(here: _Here, keep_probs: Mapping[str, torch.Tensor], allowed: Mapping[str, list[int]],
          predict: Callable[[dict[str, int]], float], inside: Mapping[str, str],
          seen: set[tuple[tuple[str, int], ...]] = frozenset()) -> tuple[Masks, str] | None:
    """The next state when under the band (None: every group at full width): the next larger width
    of the group whose added channels are the most probable, and again from there while the table,
    rescaled by this state's measured / predicted ratio, expects the network at most at the band's
    middle: one measurement for many small steps (a table that overprices the network left the
    allocation far under the band, and one step per measurement ran out of iterations). When even
    one step is expected over the middle, the one step the rule below picks. The steps stop short of
    a width configuration already measured (``seen``): going back to one ends the loop."""

    def steps(widths: dict[str, int], state: Masks) -> list[tuple[bool, float, str, Masks, float, float]]:
        out = []
        for g, a in allowed.items():
            larger = [w for w in a if w > widths[g]]
            if not larger or not is_live(g, widths, inside):
                continue
            cand = _step(state, keep_probs, g, min(larger))
            landing = here.scale * predict(widths_of(cand))
            prob = float(keep_probs[g][cand[g] & ~state[g]].mean())
            # prefer moves expected to stay under the band's top; then the most probable channels
            out.append((landing > here.hi, -prob if landing <= here.hi else landing, g, cand, prob, landing))
        return sorted(out, key=lambda o: (o[0], o[1], o[2]))

    first = steps(here.widths, here.state)
    if not first:
        return None
    mid = (here.lo + here.hi) / 2
    state, grown = here.state, []
    options = first
    while options and options[0][5] <= mid and tuple(sorted(widths_of(options[0][3]).items())) not in seen:
        _, _, g, state, _, _ = options[0]
        grown.append(g)
        options = steps(widths_of(state), state)
    if not grown:
        _, _, g, state, prob, _ = first[0]
        return state, f"grow {g} to {widths_of(state)[g]} (mean keep probability of added channels {prob:.3f})"
    widths = widths_of(state)
    names = sorted(set(grown))
    return state, (f"grow {', '.join(f'{g} to {widths[g]}' for g in names)} ({len(grown)} steps, the most probable "
                   f"channels first, expected at {here.scale * predict(widths):.4f} ms)")


def closed_loop(
    masks: Mapping[str, torch.Tensor],
    keep_probs: Mapping[str, torch.Tensor],
    allowed: Mapping[str, list[int]],
    budget_ms: float,
    measure: Callable[[Masks], float],
    predict: Callable[[dict[str, int]], float],
    cost: Callable[[Masks], float],
    band: tuple[float, float] = (0.9, 1.0),
    max_iterations: int = 20,
    inside: Mapping[str, str] | None = None,
) -> LoopResult:
    """Measure, adjust, measure again until the measurement is in ``band`` (fractions of
    ``budget_ms``; the prune stage passes ``Budget.target_ms`` and ``Budget.band_effective``).

    ``measure(masks)``: end-to-end latency (ms) of the slimmed network on the target.
    ``predict(widths)``: the table's prediction (ms), to rank candidate steps.
    ``cost(masks)``: validation loss of the hard-masked network (lower is better).
    Only groups in ``allowed`` change. Terminates: every iteration either reaches the band,
    stops, or moves to a width configuration not visited before, and at most ``max_iterations``
    measurements are made. ``status``: in_band; below_band (the band could not be hit, the best
    network under its top is returned, ``reason`` says why); full (nothing to prune: the unpruned
    network is under the band); unreachable (no measured network was under the band's top).
    ``inside`` (``inner_groups``): a group inside a removed block is not moved (it changes nothing).
    """
    inside = inside or {}
    state = {g: m.clone() for g, m in masks.items()}
    lo, hi = band_ms(budget_ms, band)
    history: list[dict[str, Any]] = []
    seen: set[tuple[tuple[str, int], ...]] = set()
    feasible: list[tuple[float, float, Masks]] = []  # (cost, -ms, masks) under the band's top
    status, reason = "max_iterations", f"no width configuration in the band after {max_iterations} measurements"
    last_ms = float("nan")
    for it in range(max_iterations):
        widths = widths_of(state)
        key = tuple(sorted(widths.items()))
        ms = measure(state)
        last_ms = ms
        c = cost(state)
        rec = {"iteration": it, "widths": widths, "predicted_ms": predict(widths), "measured_ms": ms,
               "budget_ms": budget_ms, "ratio": ms / budget_ms, "val_loss": c, "action": ""}
        history.append(rec)
        if ms <= hi:
            feasible.append((c, -ms, state))
        if lo <= ms <= hi:
            status, reason = "in_band", f"measured {ms:.4f} ms is {ms / budget_ms:.3f} of the budget"
            break
        if key in seen:
            low, high = band
            status = "oscillating"
            reason = (f"widths returned to a configuration already measured: the smallest width steps "
                      f"available move latency across the [{low:.2f}, {high:.2f}] band")
            break
        seen.add(key)
        here = _Here(state, widths, ms, c, ms / rec["predicted_ms"] if rec["predicted_ms"] > 0 else 1.0, lo, hi)
        if ms > hi:
            move = _shrink(here, keep_probs, allowed, predict, cost, inside)
            if move is None:
                status = "unreachable"
                reason = (f"every prunable group is at its smallest allowed width and the network measures "
                          f"{ms:.4f} ms > budget {budget_ms:.4f} ms")
                break
        else:
            move = _grow(here, keep_probs, allowed, predict, inside, seen)
            if move is None:
                status, reason = "full", "every group is at full width: the unpruned network is already under the band"
                break
        state, rec["action"] = move
    return _result(status, reason, state, last_ms, feasible, history, budget_ms)


def _result(status: str, reason: str, state: Masks, last_ms: float, feasible: list[tuple[float, float, Masks]],
            history: list[dict[str, Any]], budget_ms: float) -> LoopResult:
    if status == "in_band":
        return LoopResult(state, last_ms, status, reason, history)
    if not feasible:  # the caller decides (the prune stage writes the record, then fails)
        return LoopResult(state, last_ms, "unreachable",
                          f"{reason}; no measured network met the budget {budget_ms:.4f} ms", history)
    _c, neg_ms, best = min(feasible, key=lambda f: (f[0], f[1]))
    if status == "full":
        return LoopResult(best, -neg_ms, "full", reason, history)
    return LoopResult(best, -neg_ms, "below_band",
                      f"{reason}; kept the measured network under budget with the lowest validation loss", history)
