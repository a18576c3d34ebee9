"""Measurements on the target: the student's reference (and the budget derived from it, refused
before any training when the smallest allowed network cannot meet it), and the measurements the
search makes of sub-networks (alone, or paired with the student)."""

from __future__ import annotations

import copy
import functools
import logging
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed
from torch import nn

from pipeline.config import PruneConfig
from pipeline.latency import Backend, Timing, TimingProtocol, measure_reference, median_paired, paired_ms
from pipeline.latency.timing import TimedCall
from pipeline.prune.budget import Budget, BudgetError
from pipeline.prune.groups import smallest_masks, widths_of
from pipeline.prune.space import PruneSpace
from pipeline.prune.state import ResumeState
from pipeline.runtime import DistContext
from pipeline.slim import prune_structure

log = logging.getLogger(__name__)
Masks = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Reference:
    """The student and the smallest allowed network measured together on the target (ms), the
    relative ``noise`` of a measurement, the table's prediction for the smallest network, and
    whether these came from an interrupted run's record (``resumed``). ``fp32_ms``: the student in
    fp32 on the target's runtime, paired with it in the deployed precision, when the target deploys
    another precision and ``prune.budget_reference`` is fp32 (the budget's fraction is of it)."""

    student_ms: float
    floor_ms: float
    noise: float
    floor_predicted_ms: float
    resumed: bool = False
    fp32_ms: float | None = None

    def budget(self, cfg: PruneConfig) -> Budget:
        return Budget.derive(cfg.latency_budget, cfg.budget_unit, cfg.band, self.student_ms, self.noise,
                             self.fp32_ms if cfg.budget_reference == "fp32" else None, cfg.reference_readings)


def needs_fp32_reference(backend: Backend, cfg: PruneConfig) -> bool:
    """Whether the budget's fraction is of the student in fp32 while the target measures another precision."""
    return cfg.budget_reference == "fp32" and cfg.budget_unit == "fraction" and backend.precision != "fp32"


def measure_fp32_student(backend: Backend, student: nn.Module, student_ms: float, shape: tuple[int, ...],
                         readings: int) -> float:
    """The student in fp32 on ``backend``'s runtime, in ms on the scale of ``student_ms`` (the
    student in the backend's precision): the median over ``readings`` paired readings, the fp32
    model interleaved with the deployed one, so that a slow spell moves both."""
    fp32 = backend.at_precision("fp32")
    reads = backend.measure_readings([student], shape, readings=readings, extra=[fp32.prepare(student, shape)])
    return median_paired(student_ms, reads, 1, 0)


def measure_reference_budget(backend: Backend, student: nn.Module, space: PruneSpace, cfg: PruneConfig,
                             state: ResumeState, key: str) -> Reference:
    """The student's reference measurement (an interrupted run's, when ``state`` holds one for
    ``key``: the budget, a fraction of the measured student, is part of the training state's
    fingerprint, so re-measuring would orphan it). A BudgetError, before any training, when the
    smallest allowed network cannot reach the budget's band (neither measured nor predicted)."""
    floor_masks = smallest_masks(space.groups, space.allowed)
    floor_pred = space.predict(widths_of(floor_masks))
    saved = state.read("reference.json", key)
    if saved is not None:
        ref = Reference(saved["student_ms"], saved["floor_ms"], saved["noise"], floor_pred, resumed=True,
                        fp32_ms=saved.get("fp32_ms"))
        log.info("resuming with the reference latencies the interrupted run measured (student %.4f ms)", ref.student_ms)
    else:
        floor_net = prune_structure(student, space.example, floor_masks)
        student_ms, floor_ms, noise = measure_reference(backend, student, floor_net, space.shape)
        fp32_ms = (measure_fp32_student(backend, student, student_ms, space.shape,
                                        max(cfg.loop_readings, cfg.reference_readings))
                   if needs_fp32_reference(backend, cfg) else None)
        ref = Reference(student_ms, floor_ms, noise, floor_pred, fp32_ms=fp32_ms)
    if ref.fp32_ms is not None:
        log.info("the student measures %.4f ms in fp32 and %.4f ms in %s (%.2fx): the budget's fraction is of "
                 "the fp32 student (prune.budget_reference: fp32)", ref.fp32_ms, ref.student_ms, backend.precision,
                 ref.fp32_ms / ref.student_ms)
    budget = ref.budget(cfg)
    if min(floor_pred, ref.floor_ms) > budget.bounds_ms()[1]:
        raise BudgetError(_unreachable_message(budget, ref, space, cfg))
    log.info("budget %.4f ms (%.2f of the student's %.4f ms%s); smallest allowed network measures %.4f ms; a "
             "measurement repeats within %.1f%%, so the closed loop aims at [%.3f, %.3f] of the budget",
             budget.target_ms, budget.target_ms / ref.student_ms, ref.student_ms,
             f" in {backend.precision}, {budget.target_ms / ref.fp32_ms:.2f} of its {ref.fp32_ms:.4f} ms in fp32"
             if ref.fp32_ms is not None else "", ref.floor_ms, 100 * ref.noise, *budget.band_effective)
    return ref


def _unreachable_message(budget: Budget, ref: Reference, space: PruneSpace, cfg: PruneConfig) -> str:
    blocks = space.blocks
    how = (f"(student {ref.student_ms:.4f} ms; "
           + (f"every prunable group at its smallest allowed width, multiples of {space.multiple} from "
              f"{space.min_fraction:.0%} of the full width, coupled groups: {cfg.coupled}; " if cfg.channels
              else "prune.channels: false, every channel group at its full width; ")
           + (f"all {len(blocks)} removable blocks removed)" if blocks else
              "no block removed: prune.depth is false or the network has no removable block)"))
    return (f"prune.latency_budget {cfg.latency_budget:g} {cfg.budget_unit} = {budget.target_ms:.4f} ms is below what "
            f"the smallest allowed network reaches: measured {ref.floor_ms:.4f} ms "
            f"({ref.floor_ms / ref.student_ms:.2f} "
            f"of the student), predicted {ref.floor_predicted_ms:.4f} ms {how}. Raise the budget, lower "
            f"profile.min_fraction{', use prune.coupled: gate' if cfg.coupled == 'keep' else ''}"
            f"{', set prune.channels: true' if not cfg.channels else ''}, or search a smaller student.")


def share_reference(ref: Reference, ctx: DistContext, device: torch.device, state: ResumeState, key: str) -> Reference:
    """Under DDP every rank measured the student; rank 0's reference is the one all use. Rank 0
    records a fresh reference in ``state`` (for a resumed run, under ``key``)."""
    if ctx.enabled:
        fp32 = float("nan") if ref.fp32_ms is None else ref.fp32_ms
        b = torch.tensor([ref.student_ms, ref.floor_ms, ref.noise, fp32], dtype=torch.float64, device=device)
        torch.distributed.broadcast(b, 0)
        student_ms, floor_ms, noise, fp32 = b.tolist()
        ref = Reference(student_ms, floor_ms, noise, ref.floor_predicted_ms, ref.resumed,
                        None if math.isnan(fp32) else fp32)
    if not ref.resumed and ctx.is_main:
        state.write("reference.json", key, {"student_ms": ref.student_ms, "floor_ms": ref.floor_ms, "noise": ref.noise,
                                            "fp32_ms": ref.fp32_ms})
    return ref


def measure_alone(backend: Backend, model: nn.Module, space: PruneSpace) -> Callable[[Masks], float]:
    """masks -> ms of ``model`` (a copy; its weights do not matter) slimmed to them, measured alone."""
    plain = copy.deepcopy(model)

    def measure(masks: Masks) -> float:
        return backend.measure(prune_structure(plain, space.example, masks), space.shape).ms

    return measure


def paired_with(fp32: bool) -> str:
    """What a reading on a budget's scale is paired with (``fp32``: the budget is a fraction of the fp32 student)."""
    return "the student in fp32" if fp32 else "the student"


@dataclass
class BudgetReading:
    """How a latency judged against a budget is read on the target (the prune stage's closed loop,
    compare's matching and verdicts, the engine's check): ``subject`` measured paired with the
    budget's reference (interleaved windows, so a slow spell of the machine moves both), the ratio
    times the reference's latency, the median over ``readings`` independent readings, each with
    ``protocol`` (the backend's own when None).

    The reference is ``student`` as deployed (scale ``student_ms``) or, when the budget is a
    fraction of the student in fp32 (``fp32_ms``: ``prune.budget_reference: fp32`` while the target
    deploys another precision), that fp32 student on the same runtime (scale ``fp32_ms``): the budget
    is then a ratio to the very model it names, and the fp32 / deployed ratio read once at the start
    enters no verdict (read with one reading, it was 2.14x in a prune run and 1.92x in a later
    judgement on an Intel Xeon). On a shared machine that ratio also moves between readings (±10-17%
    on a 2-core Xeon, more than two networks in one precision move), so such a reading takes at
    least the budget's ``readings`` (``Budget.readings``; docs/history.md, sections 47-49)."""

    backend: Backend
    student: nn.Module
    shape: tuple[int, ...]
    student_ms: float
    fp32_ms: float | None = None
    protocol: TimingProtocol | None = None
    readings: int = 1

    @classmethod
    def of(cls, backend: Backend, student: nn.Module, shape: tuple[int, ...], budget: Budget,
           protocol: TimingProtocol | None = None, readings: int = 1) -> BudgetReading:
        """Paired with ``budget``'s reference (the fp32 student when the budget was derived from
        it), the median of ``readings`` readings and at least the budget's own ``readings``."""
        return cls(backend, student, tuple(shape), budget.student_ms, budget.reference_ms, protocol,
                   budget.reading_count(readings))

    @property
    def reference(self) -> str:
        return paired_with(self.fp32_ms is not None)

    @property
    def scale_ms(self) -> float:
        return self.student_ms if self.fp32_ms is None else self.fp32_ms

    @functools.cached_property
    def fp32_call(self) -> TimedCall:
        """The student in fp32 on the backend's runtime, prepared once."""
        return self.backend.at_precision("fp32").prepare(self.student, self.shape)

    def pairs(self, subject: nn.Module | TimedCall) -> list[tuple[Timing, Timing]]:
        """(subject, reference) timings of every reading; ``subject``: a network (prepared by the
        backend, in its precision) or a call prepared elsewhere (an engine)."""
        net = isinstance(subject, nn.Module)
        if self.fp32_ms is not None:
            models, extra = ([subject], [self.fp32_call]) if net else ([], [subject, self.fp32_call])
            order = (0, 1)
        elif net:
            models, extra, order = [subject, self.student], [], (0, 1)
        else:
            models, extra, order = [self.student], [subject], (1, 0)
        reads = self.backend.measure_readings(models, self.shape, self.protocol, self.readings, extra=extra)
        return [(r[order[0]], r[order[1]]) for r in reads]

    def values(self, subject: nn.Module | TimedCall) -> list[float]:
        """``subject``'s ms in every reading, on the budget's scale."""
        return self.scaled(self.pairs(subject))

    def scaled(self, pairs: list[tuple[Timing, Timing]]) -> list[float]:
        """The subject's ms of every (subject, reference) pair, on the budget's scale."""
        return [paired_ms(self.scale_ms, s, r) for s, r in pairs]

    def __call__(self, subject: nn.Module | TimedCall) -> float:
        """``subject``'s ms on the budget's scale: the median over the readings."""
        return statistics.median(self.values(subject))


def measure_paired(model: nn.Module, reading: BudgetReading, space: PruneSpace) -> Callable[[Masks], float]:
    """masks -> ms of ``model`` slimmed to them, read paired with the budget's reference (``reading``)."""
    return lambda masks: reading(prune_structure(model, space.example, masks))
