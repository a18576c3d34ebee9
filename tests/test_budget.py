"""The one latency budget (pipeline/prune/budget.py): its band, its verdict at the edges, its record."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from pipeline.prune import Budget


def _budget(noise: float = 0.02, band: tuple[float, float] = (0.9, 1.0)) -> Budget:
    return Budget.derive(0.5, "fraction", band, 0.2, noise)  # 0.1 ms


def test_derive_takes_a_fraction_of_the_student_or_milliseconds() -> None:
    assert _budget().target_ms == pytest.approx(0.1)
    b = Budget.derive(0.07, "ms", (0.9, 1.0), 0.2, 0.0)
    assert b.target_ms == 0.07 and b.unit == "ms" and b.student_ms == 0.2


def test_effective_band_leaves_room_for_measured_noise() -> None:
    assert _budget(0.0).band_effective == (0.9, 1.0)
    lo, hi = _budget(0.03).band_effective
    assert hi == pytest.approx(0.97) and lo == 0.9
    lo, hi = _budget(0.04, (0.95, 1.0)).band_effective  # keeps 0.05 of width
    assert hi == pytest.approx(0.96) and lo == pytest.approx(0.91)
    b = _budget(0.02)
    assert b.bounds_ms() == pytest.approx((0.09, 0.098)) and b.limit_ms == pytest.approx(0.102)
    assert b.aim_ms(0.0) == pytest.approx(0.09) and b.aim_ms(1.0) == pytest.approx(0.098)


def test_verdict_at_every_edge() -> None:
    b = _budget(0.02)
    lo, hi = b.bounds_ms()
    assert b.verdict(lo)[0] == "in_band" and b.verdict(hi)[0] == "in_band"  # the band is closed
    assert b.verdict(math.nextafter(lo, 0))[0] == "below_band"
    assert b.verdict(math.nextafter(hi, 1))[0] == "within"
    assert b.verdict(b.limit_ms)[0] == "within" and b.verdict(math.nextafter(b.limit_ms, 1))[0] == "over"
    assert b.meets(b.limit_ms) and not b.meets(math.nextafter(b.limit_ms, 1)) and b.meets(0.001)
    assert b.at_budget(hi) and b.at_budget(b.limit_ms) and not b.at_budget(0.001) and not b.at_budget(1.0)


def test_the_engines_rule_allows_the_measured_noise_and_no_more() -> None:
    # what pipeline.deploy.budget_verdict decided, now the one rule every stage uses
    b = _budget(0.02)
    assert b.verdict(0.099)[0] == "within"
    status, how = b.verdict(0.1015)  # 1.5% over the target, noise 2%: meets the budget, said so
    assert status == "within" and "meets the budget" in how
    status, how = b.verdict(0.103)
    assert status == "over" and "over it by 3.0%" in how and "2.0%" in how
    assert not _budget(0.0).meets(0.1001)


def test_round_trip_through_json_and_masks_json() -> None:
    b = _budget(0.013, (0.85, 0.98))
    d = json.loads(json.dumps(b.to_dict()))
    assert Budget.from_dict(d) == b and d["band_effective"] == list(b.band_effective)
    assert Budget.from_masks({"budget": d, "budget_ms": 123.0}) == b  # the object wins over the flat keys
    old = Budget.from_masks({"budget_ms": 0.2, "noise": 0.01})  # by hand, or an older prune stage
    assert old.target_ms == 0.2 and old.noise == 0.01 and old.meets(0.202) and not old.meets(0.2021)
    with pytest.raises(ValueError, match="lacks"):
        Budget.from_dict({"target_ms": 1.0})
    from pipeline.errors import CheckpointError

    for broken in ({"budget": {"target_ms": 1.0}}, {"budget": None}, {"noise": 0.1}, {"budget_ms": "x"}):
        with pytest.raises(CheckpointError, match="re-run the prune stage"):  # exit 2 with a message, no traceback
            Budget.from_masks(broken)


def test_budget_is_frozen_and_validated() -> None:
    b = _budget()
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.target_ms = 1.0  # type: ignore[misc]
    assert hash(b) == hash(_budget())
    with pytest.raises(ValueError, match="band"):
        Budget(0.1, (1.0, 0.9), 0.0, "ms", 0.1, 0.2)
    with pytest.raises(ValueError, match="target_ms"):
        Budget(0.0, (0.9, 1.0), 0.0, "ms", 0.0, 0.2)
    with pytest.raises(ValueError, match="noise"):
        Budget(0.1, (0.9, 1.0), 1.5, "ms", 0.1, 0.2)


def test_a_fraction_of_the_fp32_student_when_the_target_deploys_int8() -> None:
    # the int8 student measures 0.2 ms, the fp32 student 0.5 ms: half of the fp32 student is 0.25 ms,
    # which the int8 student meets unpruned; the pair scale stays the int8 student
    b = Budget.derive(0.5, "fraction", (0.9, 1.0), 0.2, 0.01, reference_ms=0.5)
    assert b.target_ms == pytest.approx(0.25) and b.student_ms == 0.2 and b.reference_ms == 0.5
    assert Budget.derive(0.07, "ms", (0.9, 1.0), 0.2, 0.0, reference_ms=0.5).target_ms == 0.07  # ms: as given
    d = json.loads(json.dumps(b.to_dict()))
    assert Budget.from_dict(d) == b
    d.pop("reference_ms")  # a record from before the key existed
    assert Budget.from_dict(d).reference_ms is None
    with pytest.raises(ValueError, match="reference_ms"):
        Budget(0.1, (0.9, 1.0), 0.0, "ms", 0.1, 0.2, 0.0)


def _quantized_backend():  # noqa: ANN202
    """A fake int8 backend: a model's call takes (output channels) ms in int8, 2.5x that in fp32."""
    from torch import nn

    from pipeline.latency import Backend, TimingProtocol

    class Quantized(Backend):
        name = "fake"

        def device(self) -> dict:
            return {"type": "cpu", "name": "fake"}

        def versions(self) -> dict:
            return {}

        def prepare(self, model: nn.Module, input_shape: tuple[int, ...]):  # noqa: ANN201
            ms = {"int8": 1.0, "fp32": 2.5}[self.precision] * model.out_channels
            return lambda: ms

    fast = TimingProtocol(passes=2, window_s=0.0, min_calls=2, warmup=1, min_span_s=0.0)
    return Quantized(batch_size=1, precision="int8", threads=1, protocol=fast)


def test_the_fp32_reference_is_read_paired_with_the_deployed_student() -> None:
    from torch import nn

    from pipeline.config import PruneConfig
    from pipeline.prune.measure import Reference, measure_fp32_student, needs_fp32_reference

    be = _quantized_backend()
    fp32_ms = measure_fp32_student(be, nn.Conv2d(1, 2, 1), 0.4, (1, 4, 4), readings=3)
    assert fp32_ms == pytest.approx(1.0) and be.precision == "int8"  # 0.4 ms x 2.5; the backend itself unchanged
    cfg = PruneConfig(latency_budget=0.5)
    assert needs_fp32_reference(be, cfg)
    assert not needs_fp32_reference(be, PruneConfig(latency_budget=0.5, budget_reference="target"))
    assert not needs_fp32_reference(be, PruneConfig(latency_budget=2.0, budget_unit="ms"))
    assert not needs_fp32_reference(be.at_precision("fp32"), cfg)
    ref = Reference(0.4, 0.1, 0.01, 0.1, fp32_ms=fp32_ms)
    assert ref.budget(cfg).target_ms == pytest.approx(0.5)  # half of the fp32 student, 1.25x the int8 one
    assert ref.budget(PruneConfig(latency_budget=0.5, budget_reference="target")).target_ms == pytest.approx(0.2)


def test_a_budget_of_the_fp32_student_is_read_against_the_fp32_student_itself() -> None:
    """With ``prune.budget_reference: fp32`` every reading (the loop's, compare's, the engine's) pairs
    the subject with the student in fp32 and scales by its latency, so the budget is a ratio to that
    model and the fp32 / int8 ratio read at the start enters no verdict; otherwise the pair is the
    student as deployed. A network or an engine's call may be the subject."""
    from torch import nn

    from pipeline.prune.measure import BudgetReading

    be = _quantized_backend()
    student, net = nn.Conv2d(1, 4, 1), nn.Conv2d(1, 2, 1)  # int8: 4 ms and 2 ms; fp32: 10 ms and 5 ms
    # the budget derived from a once-read fp32 latency that is off (12 ms instead of 10: the ratio moved)
    fp32_budget = Budget.derive(0.5, "fraction", (0.8, 1.0), 4.0, 0.0, 12.0)
    deployed_budget = Budget.derive(0.5, "fraction", (0.8, 1.0), 4.0, 0.0)
    on_fp32 = BudgetReading.of(be, student, (1, 4, 4), fp32_budget, readings=3)
    assert on_fp32.reference == "the student in fp32" and on_fp32.scale_ms == 12.0
    # net in int8 / the fp32 student = 2 / 10: 0.2 of the fp32 student whatever its once-read latency
    assert on_fp32(net) / fp32_budget.target_ms == pytest.approx(0.2 / 0.5)
    assert len(on_fp32.values(net)) == 3 and be.precision == "int8"
    engine = be.prepare(net, (1, 4, 4))  # an engine's own call as the subject
    assert on_fp32(engine) == pytest.approx(on_fp32(net))
    on_student = BudgetReading.of(be, student, (1, 4, 4), deployed_budget, readings=1)
    assert on_student.reference == "the student" and on_student.scale_ms == 4.0
    assert on_student(net) == pytest.approx(2.0) and on_student(engine) == pytest.approx(2.0)  # 2/4 of 4 ms


def test_a_reading_across_precisions_takes_the_budgets_readings_at_least() -> None:
    """A budget with an fp32 reference records ``prune.reference_readings``; every BudgetReading of
    it takes at least that many readings (the int8 / fp32 ratio moves more between readings than two
    networks in one precision do), and a judge asking for more gets more. A budget in one precision
    asks for no floor: each judge's own count holds."""
    from torch import nn

    from pipeline.config import PruneConfig
    from pipeline.prune.measure import BudgetReading, Reference

    cross = Budget.derive(0.5, "fraction", (0.8, 1.0), 4.0, 0.0, 10.0, reference_readings=5)
    same = Budget.derive(0.5, "fraction", (0.8, 1.0), 4.0, 0.0, reference_readings=5)
    assert cross.readings == 5 and same.readings == 1
    d = json.loads(json.dumps(cross.to_dict()))
    assert d["readings"] == 5 and Budget.from_dict(d) == cross
    d.pop("readings")  # a record of a prune stage before the key existed
    assert Budget.from_dict(d).readings == 1
    with pytest.raises(ValueError, match="readings"):
        Budget(0.1, (0.9, 1.0), 0.0, "ms", 0.1, 0.2, 0.5, 0)
    ref = Reference(0.4, 0.1, 0.01, 0.1, fp32_ms=1.0)
    assert ref.budget(PruneConfig(latency_budget=0.5)).readings == 5  # the default
    assert ref.budget(PruneConfig(latency_budget=0.5, reference_readings=2)).readings == 2
    assert ref.budget(PruneConfig(latency_budget=0.5, budget_reference="target")).readings == 1
    be = _quantized_backend()
    student, net = nn.Conv2d(1, 4, 1), nn.Conv2d(1, 2, 1)
    assert len(BudgetReading.of(be, student, (1, 4, 4), cross, readings=1).values(net)) == 5
    assert len(BudgetReading.of(be, student, (1, 4, 4), cross, readings=7).values(net)) == 7
    assert len(BudgetReading.of(be, student, (1, 4, 4), same, readings=1).values(net)) == 1
