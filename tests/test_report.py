"""`python -m pipeline.report`: what `make run` prints at the end, from the metrics files."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.report import budget_notes, rows


def _compare(tmp_path: Path, statuses: dict[str, str]) -> Path:
    m = tmp_path / "metrics"
    m.mkdir()
    record = {name: {"measured_ms": 1.0, "measured_over_budget": ratio, "budget_status": status, "params": 1000,
                     "test_acc": 0.5, "budget_verdict": f"{ratio:.3f} of the budget"}
              for name, (status, ratio) in {k: (v, {"over": 1.2, "below_band": 0.7}.get(v, 0.95))
                                            for k, v in statuses.items()}.items()}
    (m / "compare.json").write_text(json.dumps(record))
    return m


def test_a_network_not_at_the_budget_is_named_and_why(tmp_path: Path) -> None:
    m = _compare(tmp_path, {"ours": "in_band", "uniform": "over", "l1": "below_band", "unpruned": "over"})
    notes = budget_notes(m)
    assert len(notes) == 2  # the unpruned reference is never cut to the budget: not flagged
    assert notes[0].startswith("NOTE: uniform read over the budget") and "not a comparison at equal latency" in notes[0]
    assert notes[1].startswith("NOTE: l1 read below the budget's band")
    table = {r[0].split(",")[0]: r for r in rows(m)}
    assert "1.200 of budget, over" in table["uniform scaling"][0] and table["pruned (ours)"][3] == "50.00%"


def test_networks_at_the_budget_need_no_note(tmp_path: Path) -> None:
    assert budget_notes(_compare(tmp_path, {"ours": "within", "uniform": "in_band", "l1": "in_band"})) == []
    assert budget_notes(tmp_path / "nothing") == []
