"""The baselines' side of the protocol: which candidate a baseline gets for a band of the budget."""

from __future__ import annotations

import pytest
from torch import nn

from pipeline.compare import Candidate, match_budget, uniform_widths
from pipeline.prune import allowed_widths
from pipeline.train import epoch_steps


def _cands(measured: list[float], predicted: list[float]) -> tuple[list[Candidate], dict[str, float]]:
    cands, pred = [], {}
    for i, (m, p) in enumerate(zip(measured, predicted)):
        net = nn.Identity()
        net.true_ms = m  # what the target would measure
        cands.append(Candidate(f"c{i}", net, {"g": i}))
        pred[f"c{i}"] = p
    return cands, pred


def _match(measured: list[float], predicted: list[float], high: float) -> tuple[str, int]:
    cands, pred = _cands(measured, predicted)
    m = match_budget(cands, lambda c: pred[c.label], lambda net: net.true_ms, high)
    return m.chosen.label, len(m.probes)


def test_the_largest_candidate_that_measures_under_the_top_is_taken() -> None:
    measured = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    assert _match(measured, measured, 0.75)[0] == "c3"  # exact predictor


def test_a_predictor_that_over_predicts_does_not_hand_the_baseline_a_smaller_network() -> None:
    # predicted 25% high: c1 (0.72) fits 0.75 but is predicted at 0.9, beyond 1.1 x the top
    measured = [0.96, 0.72, 0.64, 0.56, 0.48]
    predicted = [1.2 * m for m in measured]
    label, probes = _match(measured, predicted, 0.75)
    assert label == "c1" and probes >= 2  # walked up from where it started


def test_a_predictor_that_under_predicts_walks_down_until_one_fits() -> None:
    measured = [1.0, 0.9, 0.8, 0.7, 0.6]
    predicted = [0.7 * m for m in measured]  # everything predicted under the top
    assert _match(measured, predicted, 0.65)[0] == "c4"


def test_equal_predictions_take_the_larger_network() -> None:
    # a flat predictor (a tiny network below the table's resolution): the candidates' order must not
    # hand the baseline its smallest network
    cands = [Candidate(f"w{w}", nn.Identity(), {"a": w, "b": 4}) for w in (1, 3, 2)]
    for c in cands:
        c.model.true_ms = 0.01
    m = match_budget(cands, lambda c: 0.011, lambda net: net.true_ms, 1.0)
    assert m.chosen.label == "w3"


def test_nothing_fits_gives_the_smallest() -> None:
    assert _match([1.0, 0.9], [1.0, 0.9], 0.5)[0] == "c1"


def test_epoch_steps_counts_what_the_training_loop_runs() -> None:
    assert epoch_steps(1257, 64) == 20  # 19 full batches and a tail of 41
    assert epoch_steps(1000, 128) == 8  # the tail batch counts
    assert epoch_steps(129, 128) == 1  # a one-sample tail is dropped
    assert epoch_steps(10, 128) == 1
    assert epoch_steps(1000, 128, world_size=2) == 8  # 500 per rank in batches of 64


def _protocol_row(budget: float, seed: int, ours: float, uniform: tuple[float, float], l1: tuple[float, float],
                  unpruned: float | None = None) -> dict:
    prune = {"test_acc": ours, "test_acc_student": 0.6, "measured_over_budget": 0.95, "measured_ms": 0.95 * budget,
             "student_ms": 1.0, "soft_epochs": 0, "settle_epochs": 8}
    compare = {"ours": {"measured_ms": 0.95 * budget},
               "uniform": {"test_acc": uniform[0], "measured_over_budget": uniform[1], "measured_ms": uniform[1] * budget},
               "l1": {"test_acc": l1[0], "measured_over_budget": l1[1], "measured_ms": l1[1] * budget}}
    if unpruned is not None:  # the student trained as long: over any budget, a reference and no rival
        compare["unpruned"] = {"test_acc": unpruned, "measured_over_budget": 1 / budget, "measured_ms": 1.0}
    return {"budget": budget, "seed": seed, "prune": prune, "compare": compare}


def test_protocol_table_compares_only_with_baselines_under_the_budget() -> None:
    from benchmarks.prune_protocol import pareto_points, table

    rows = [_protocol_row(0.5, 0, 0.55, (0.60, 1.10), (0.50, 0.95), 0.70),  # uniform over budget: ours - L1 = +5
            _protocol_row(0.5, 1, 0.55, (0.52, 0.97), (0.54, 0.96), 0.60),  # both under: ours - L1 = +1
            _protocol_row(0.3, 0, 0.50, (0.58, 1.20), (0.59, 1.40))]  # both over: nothing to compare with
    lines = {line.split(" | ")[0].strip("| "): line for line in table(rows, baselines=True).splitlines()[2:]}
    assert "| 3.0 ± 2.8 |" in lines["0.5"] and "(over budget in 1 seed)" in lines["0.5"]
    assert lines["0.5"].split(" | ")[3] == "65.0 ± 7.1"  # the unpruned column; never the baseline to beat
    assert lines["0.3"].split(" | ")[3] == "-"
    assert "no baseline under budget" in lines["0.3"] and "(over budget in 1 seed)" in lines["0.3"]
    points = {(p["method"], p["budget"]): p for p in pareto_points(rows)}
    ours = points[("ours", 0.5)]
    assert ours["seeds"] == 2 and ours["accuracy"] == pytest.approx(0.55) and ours["accuracy_err"] == 0.0
    assert points[("uniform width scaling", 0.5)]["accuracy_err"] == pytest.approx(0.0566, abs=1e-4)
    assert sum(p["method"] == "student" for p in points.values()) == 1
    assert points[("student trained as long", 0.5)]["accuracy"] == pytest.approx(0.65)


def test_uniform_widths_step_one_group_at_a_time_within_one_lattice_step_of_the_ratio() -> None:
    # ten groups of one size on a lattice of 8: rounded to the nearest width all ten step together
    # (80 channels at once); balanced, the sweep passes every total in between
    sizes = {f"g{i}": 64 for i in range(10)} | {"odd": 29}
    allowed = {g: allowed_widths(n, 8, 0.25) for g, n in sizes.items()}
    totals = set()
    for i in range(1001):
        ratio = 0.25 + 0.75 * i / 1000
        w = uniform_widths(sizes, allowed, ratio)
        assert set(w) == set(sizes) and all(x in allowed[g] for g, x in w.items())
        for g, n in sizes.items():  # the width just under or just over ratio x size
            assert max((a for a in allowed[g] if a <= ratio * n), default=min(allowed[g])) <= w[g]
            assert w[g] <= min((a for a in allowed[g] if a >= ratio * n), default=max(allowed[g]))
        totals.add(sum(w[g] for g in sizes if g != "odd"))
    steps = sorted(totals)
    assert steps[0] == 160 and steps[-1] == 640  # 10 x 16 (25% of 64) up to full width
    assert all(b - a == 8 for a, b in zip(steps, steps[1:]))  # never more than one group at a time
    assert uniform_widths(sizes, allowed, 1.0) == sizes


def test_holdout_table_pairs_each_rival_with_ours_per_seed() -> None:
    from benchmarks.prune_protocol import holdout_table

    rows = []
    for seed, (ours, l1, unpruned) in enumerate([(0.56, 0.55, 0.57), (0.58, 0.55, 0.58)]):
        r = _protocol_row(0.7, seed, 0.5, (0.5, 0.9), (0.5, 0.9), 0.6)
        c = r["compare"]
        c["holdout"] = {"images": 10000}
        c["student"] = {"holdout_acc": 0.54}
        c["ours"]["holdout_acc"], c["l1"]["holdout_acc"], c["unpruned"]["holdout_acc"] = ours, l1, unpruned
        del c["uniform"]  # a rival not run: its cells read "-"
        rows.append(r)
    rows.append(_protocol_row(0.5, 0, 0.5, (0.5, 0.9), (0.5, 0.9)))  # not scored on the holdout: left out
    text = holdout_table(rows)
    assert "10,000 images" in text
    cells = text.splitlines()[-1].split(" | ")
    assert cells[0] == "| 0.7" and cells[1] == "0, 1" and cells[2] == "54.0 ± 0.0" and cells[3] == "57.0 ± 1.4"
    assert cells[4] == "-" and cells[5] == "55.0 ± 0.0" and cells[6] == "57.5 ± 0.7"
    assert cells[7] == "-" and cells[8] == "2.0 ± 1.4" and cells[9] == "-0.5 ± 0.7 |"
    assert "| 0.5 |" not in text
    from benchmarks.prune_protocol import pareto_points

    points = {(p["method"], p["budget"]): p for p in pareto_points(rows[:2], "holdout_acc")}
    assert points[("ours", 0.7)]["accuracy"] == pytest.approx(0.57)
    assert points[("student", None)]["accuracy"] == pytest.approx(0.54)
    assert points[("student trained as long", 0.7)]["accuracy"] == pytest.approx(0.575)
