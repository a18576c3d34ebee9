"""The latency budget: one value, derived once by the prune stage (``Budget.derive``), written into
its masks.json, and read back by every stage that judges a latency (compare, engine).

One rule, everywhere a latency is judged against the budget:

* ``target_ms``: the budget, ``prune.latency_budget`` times the student's measured latency
  (``budget_unit: fraction``) or in milliseconds as given (``budget_unit: ms``). The student's
  latency is ``reference_ms`` when set: the student in fp32 on the target's runtime while the
  target deploys another precision (``prune.budget_reference: fp32``), so that a fraction means
  the same network cost whatever the precision, and quantization spends its saving on width.
  ``student_ms`` stays the student in the deployed precision: the scale every paired reading
  (a network against that student) is converted to ms with.
* ``readings``: the fewest independent paired readings a measurement against the budget takes,
  the median kept: ``prune.reference_readings`` when the reading pairs two precisions (the
  fp32 reference), else 1 (each judge's own count applies above it). On a shared 2-core Xeon one
  int8 network's ratio to the fp32 model moved by ±10-11% (compare's protocol) to ±14-17%
  (target.timing) between readings a few seconds apart, the median of 5 by ±4-5% and ±7-8% (90%
  intervals; benchmarks/precision_ratio.py), where two networks in one precision read within 5%.
* The band, ``band_effective``: ``prune.band`` (fractions of the target) with its top lowered by
  ``noise``, the relative repeatability of one measurement on this machine (measured by the prune
  stage), so that a network measured inside the band stays under the band's top when measured
  again; the band keeps at least 0.05 of width (its bottom moves down if it must). Searches aim
  inside it: the prune stage's closed loop and compare's baseline matching (``bounds_ms``).
* ``verdict(ms)`` judges one measurement:

  - ``in_band``: inside the band;
  - ``within``: above the band's top, at most ``limit_ms`` = target x (1 + noise): a network in
    the band can read this high when measured again, so it meets the budget;
  - ``below_band``: under the band: meets the budget with latency to spare (a method that lands
    here did not get the latency it could spend);
  - ``over``: above ``limit_ms``: fails the budget.

  *Meets the budget* (``meets``): anything but ``over``; the engine stage fails otherwise.
  *At the budget* (``at_budget``): ``in_band`` or ``within``; compare calls two methods compared
  at equal latency only when both are at the budget in the same final joint measurement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pipeline.config import PruneConfig
from pipeline.errors import CheckpointError, SlimdeployError

Status = Literal["in_band", "within", "below_band", "over"]
MIN_BAND_WIDTH = 0.05  # of the target: the narrowest band the noise may leave


class BudgetError(SlimdeployError):
    """The latency budget cannot be met (before training, or after the closed loop)."""


def band_ms(target_ms: float, band: tuple[float, float]) -> tuple[float, float]:
    """(low, high) ms of a band given as fractions of ``target_ms``."""
    lo, hi = band
    return lo * target_ms, hi * target_ms


def _effective(band: tuple[float, float], noise: float) -> tuple[float, float]:
    hi = band[1] * (1 - noise)
    return min(band[0], hi - MIN_BAND_WIDTH), hi


@dataclass(frozen=True)
class Budget:
    """The budget and its band (module docstring). ``band`` is ``prune.band`` as configured;
    ``value`` and ``unit`` are ``prune.latency_budget`` and ``prune.budget_unit`` (how ``target_ms``
    was derived); ``student_ms`` is the student's measured latency it was derived from."""

    target_ms: float
    band: tuple[float, float]
    noise: float
    unit: Literal["fraction", "ms"]
    value: float
    student_ms: float
    reference_ms: float | None = None
    readings: int = 1

    def __post_init__(self) -> None:
        if not self.target_ms > 0:
            raise ValueError(f"budget target_ms must be > 0, got {self.target_ms}")
        if not 0 < self.band[0] < self.band[1] <= 1:
            raise ValueError(f"budget band must be [low, high] with 0 < low < high <= 1, got {self.band}")
        if not 0 <= self.noise < 1:
            raise ValueError(f"budget noise must be in [0, 1), got {self.noise}")
        if self.unit not in ("fraction", "ms"):
            raise ValueError(f"budget unit must be fraction or ms, got {self.unit!r}")
        if self.reference_ms is not None and not self.reference_ms > 0:
            raise ValueError(f"budget reference_ms must be > 0 or None, got {self.reference_ms}")
        if not (isinstance(self.readings, int) and self.readings >= 1):
            raise ValueError(f"budget readings must be an integer >= 1, got {self.readings!r}")

    @classmethod
    def derive(cls, value: float, unit: Literal["fraction", "ms"], band: tuple[float, float], student_ms: float,
               noise: float, reference_ms: float | None = None, reference_readings: int = 1) -> Budget:
        """The budget of ``prune.latency_budget`` ``value`` in ``unit`` for a student measured at
        ``student_ms`` with relative measurement ``noise``; a fraction is of ``reference_ms`` when
        given (the student in fp32; module docstring), else of ``student_ms``. ``reference_readings``:
        the budget's ``readings`` when it has an fp32 reference (1 otherwise)."""
        base = student_ms if reference_ms is None else reference_ms
        target = value * base if unit == "fraction" else value
        return cls(float(target), (float(band[0]), float(band[1])), float(noise), unit, float(value), float(student_ms),
                   None if reference_ms is None else float(reference_ms),
                   1 if reference_ms is None else int(reference_readings))

    def reading_count(self, requested: int) -> int:
        """Readings a measurement against the budget takes when ``requested`` are asked for: at
        least the budget's own ``readings``."""
        return max(requested, self.readings)

    @property
    def band_effective(self) -> tuple[float, float]:
        """The band searches aim at, fractions of the target (module docstring)."""
        return _effective(self.band, self.noise)

    def bounds_ms(self) -> tuple[float, float]:
        """(low, high) ms of the effective band."""
        return band_ms(self.target_ms, self.band_effective)

    @property
    def limit_ms(self) -> float:
        """The most a measurement may read and meet the budget: target x (1 + noise)."""
        return self.target_ms * (1 + self.noise)

    def aim_ms(self, aim: float) -> float:
        """``prune.aim`` of the way up the effective band (0: its bottom, 1: its top), in ms."""
        lo, hi = self.band_effective
        return self.target_ms * (lo + aim * (hi - lo))

    def status(self, ms: float) -> Status:
        lo, hi = self.bounds_ms()
        if ms > self.limit_ms:
            return "over"
        if ms > hi:
            return "within"
        return "in_band" if ms >= lo else "below_band"

    def meets(self, ms: float) -> bool:
        return self.status(ms) != "over"

    def at_budget(self, ms: float) -> bool:
        return self.status(ms) in ("in_band", "within")

    def verdict(self, ms: float) -> tuple[Status, str]:
        """(status, a sentence saying where ``ms`` lies against the budget)."""
        status = self.status(ms)
        lo, hi = self.band_effective
        where = f"{ms / self.target_ms:.3f} of the budget {self.target_ms:.4f} ms"
        band = f"the band [{lo:.3f}, {hi:.3f}]"
        text = {
            "in_band": f"{where}, in {band}",
            "within": f"{where}, above {band} by no more than the measured noise allows (limit "
                      f"{1 + self.noise:.3f}): meets the budget",
            "below_band": f"{where}, below {band}: meets the budget with latency to spare",
            "over": f"{where}: over it by {ms / self.target_ms - 1:.1%}, more than the measured noise "
                    f"{self.noise:.1%} allows",
        }[status]
        return status, text

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the fields, and the derived band, bounds and limit for a reader's eyes."""
        return {"target_ms": self.target_ms, "band": list(self.band), "noise": self.noise, "unit": self.unit,
                "value": self.value, "student_ms": self.student_ms, "reference_ms": self.reference_ms,
                "readings": self.readings,
                "band_effective": list(self.band_effective),
                "bounds_ms": list(self.bounds_ms()), "limit_ms": self.limit_ms}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Budget:
        """Inverse of ``to_dict`` (the derived keys are recomputed, not read)."""
        missing = [k for k in ("target_ms", "band", "noise", "unit", "value", "student_ms") if k not in d]
        if missing:
            raise ValueError(f"a budget record lacks {missing}")
        ref = d.get("reference_ms")  # absent (as readings) from the records of a prune stage before it existed
        return cls(float(d["target_ms"]), (float(d["band"][0]), float(d["band"][1])), float(d["noise"]), d["unit"],
                   float(d["value"]), float(d["student_ms"]), None if ref is None else float(ref),
                   int(d.get("readings", 1)))

    @classmethod
    def from_masks(cls, record: dict[str, Any]) -> Budget:
        """The budget in a prune stage's masks.json. One without the ``budget`` object (written by
        hand, or by an older prune stage) gives its flat ``budget_ms`` and ``noise`` (0 when absent)
        in milliseconds, with ``prune.band``'s default band."""
        try:
            if "budget" in record:
                return cls.from_dict(record["budget"])
            target = float(record["budget_ms"])
            return cls(target, PruneConfig.model_fields["band"].default, float(record.get("noise", 0.0)), "ms",
                       target, float(record.get("student_ms", float("nan"))))
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise CheckpointError(f"the prune stage's budget record is unusable ({type(err).__name__}: {err}); "
                                  "re-run the prune stage") from None
