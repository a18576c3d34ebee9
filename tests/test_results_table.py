"""docs/results.md and the README's results table are generated from benchmarks/results/: the
committed text must be what the result files give today (regenerated in memory, no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import results_table as rt
from benchmarks.tables import fmt, others, protocol


def test_committed_results_match_the_result_files() -> None:
    diff = rt.differences(rt.expected())
    assert not diff, ("README.md or docs/results.md is stale; run `python -m benchmarks.results_table`:\n"
                      + "\n".join(diff[:80]))


def test_every_current_source_exists_and_is_dated() -> None:
    for path in [r.rows for r in (*protocol.C10_RUNS.values(), protocol.C10_UNPRUNED, protocol.DIGITS_RUN)] + \
            [p for _, p in others.LATENCY_RUNS] + [*others.TIMING_NOISE, *others.THROUGHPUT, others.ROBUSTNESS,
                                                  others.PIPELINE_LOG]:
        assert (fmt.REPO / path).is_file(), path
        assert fmt.recorded_date(path) != "uncommitted", f"{path}: no date in the file or its run's table"


@pytest.mark.parametrize(("xs", "kw", "want"), [
    ([0.55, 0.56, 0.57], {}, "56.0 ± 1.0"),            # points, sample std
    ([0.01, 0.02, 0.03], {"signed": True}, "+2.0 ± 1.0"),
    ([-0.004, -0.004], {"signed": True}, "-0.4 ± 0.0"),  # equal values over seeds still show their spread
    ([0.541], {}, "54.1"),                               # one network: no spread to show
    ([], {}, "-"),
])
def test_mean_std(xs: list[float], kw: dict, want: str) -> None:
    assert fmt.mean_std(xs, **kw) == want


def test_median_range() -> None:
    assert fmt.median_range([0.96, 0.83, 0.90]) == "0.90 (0.83-0.96)"
    assert fmt.median_range([100.0, 100.0], 0, "%") == "100%"
    assert fmt.median_range([]) == "-"


def test_landing_marks_networks_outside_the_band() -> None:
    def run(x: float) -> dict:
        return {"prune": {"measured_over_budget": x},
                "compare": {"protocol": {"band": [0.9, 0.98]}, "l1": {"measured_over_budget": x}}}

    ratios, marks = protocol.landing_of([run(0.85), run(0.95), run(0.99), run(1.05)], "l1")
    assert ratios == [0.85, 0.95, 0.99, 1.05]
    assert marks == "below band 1/4, above band top 1/4, over budget 1/4"
    assert protocol.landing_of([run(0.95)], "l1")[1] == "-"


def test_readme_table_replaces_only_what_is_between_the_markers() -> None:
    text = f"intro\n{rt.BEGIN}\nold table\n{rt.END}\nafter\n"
    out = rt.render_readme(text)
    assert out.startswith(f"intro\n{rt.BEGIN}\n| result |") and out.endswith(f"{rt.END}\nafter\n")
    assert "old table" not in out
    assert rt.render_readme(out) == out


def test_date_from_the_file_else_uncommitted(tmp_path: Path) -> None:
    dated = tmp_path / "r.json"
    dated.write_text(json.dumps({"date": "2026-12-02", "rows": []}))
    assert fmt.recorded_date(dated) == "2026-12-02"
    undated = tmp_path / "u.json"
    undated.write_text("[]")
    assert fmt.recorded_date(undated) == "uncommitted"  # outside the repository: no commit to date it by
