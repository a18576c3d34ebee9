"""Latency-aware width allocation (``prune.allocation: knapsack``, the default): from full width,
the cut with the least importance lost per predicted millisecond saved, until the latency table
predicts the target (HALP's latency-aware knapsack, greedy, on the measured table)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from pipeline.prune.groups import is_live


def allocate_widths(importance: Mapping[str, torch.Tensor], allowed: Mapping[str, list[int]],
                    predict: Callable[[dict[str, int]], float], target_ms: float,
                    inside: Mapping[str, str] | None = None) -> tuple[dict[str, int], float]:
    """Latency-aware width allocation, a greedy knapsack (HALP's idea: remove what costs the least
    importance per millisecond saved). From full widths, every move shrinks one group to any
    smaller width of its lattice; the move with the least importance lost per predicted ms saved
    is taken, until the prediction is at most ``target_ms``. Keeping w channels of a group is worth
    the sum of its w largest channel importances. Moves predicted to save nothing are never taken
    (on the staircase a narrower layer can cost the same). Returns (widths, predicted ms); when the
    target cannot be predicted reachable, where the greedy stopped: every cut that saves anything
    taken (a group whose cuts save nothing keeps its width). ``inside`` (``inner_groups``): groups
    inside a removed block are left alone (never cut further, never grown back)."""
    inside = inside or {}
    widths = {g: max(a) for g, a in allowed.items()}
    kept_value = {g: torch.cat([torch.zeros(1), importance[g].sort(descending=True).values.cumsum(0)]).tolist()
                  for g in allowed}
    current = predict(widths)
    while current > target_ms:
        best: tuple[float, str, int, float] | None = None
        for g, a in allowed.items():
            if not is_live(g, widths, inside):
                continue
            for w in (x for x in a if x < widths[g]):
                ms = predict({**widths, g: w})
                saved = current - ms
                if saved <= 1e-12:
                    continue
                per_ms = (kept_value[g][widths[g]] - kept_value[g][w]) / saved
                # among equally cheap moves prefer the one that saves more (fewer, larger cuts)
                if best is None or (per_ms, -saved) < (best[0], -(current - best[3])):
                    best = (per_ms, g, w, ms)
        if best is None:
            return widths, current
        _, g, w, current = best
        widths[g] = w
    # the last cut may overshoot (lattice steps are coarse): give back what fits, the most
    # importance per ms added first, while the prediction stays within the target
    while True:
        best = None
        for g, a in allowed.items():
            if not is_live(g, widths, inside):
                continue
            for w in (x for x in a if x > widths[g]):
                ms = predict({**widths, g: w})
                if ms > target_ms:
                    continue
                gain = (kept_value[g][w] - kept_value[g][widths[g]]) / max(ms - current, 1e-12)
                if best is None or gain > best[0]:
                    best = (gain, g, w, ms)
        if best is None:
            return widths, current
        _, g, w, current = best
        widths[g] = w
