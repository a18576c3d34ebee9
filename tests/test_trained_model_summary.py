"""benchmarks/trained_model.py's summary: ours minus the best peer per seed, FastNAS counted as a peer
only where it ran and did not read over the budget (built on the committed result rows); FastNAS rows of
another run or fine-tuning, and bad arguments, refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.tables.house import TRAINED_MODEL
from benchmarks.trained_model import PEERS, summarise


def _fastnas(budget: float, seed: int, acc: float, status: str) -> dict:
    return {"budget": budget, "seed": seed, "test_acc": acc,
            "verdicts": {"fastnas": {"measured_over_budget": 1.2 if status == "over" else 0.9, "budget_status": status}}}


def test_fastnas_is_a_peer_where_it_ran_and_met_the_budget() -> None:
    rows = [r for r in json.loads(TRAINED_MODEL.read_text())["rows"] if r["budget"] == 0.3]
    assert len(rows) >= 3
    without = summarise(rows, [])["0.3"]
    assert "fastnas" not in without["best_peer"] and without["fastnas"]["test_acc"] == []
    first, second = rows[0], rows[1]
    top = max(first["compare"][m]["test_acc"] for m in PEERS)
    fastnas = [_fastnas(0.3, first["seed"], top + 0.05, "in_band"),        # ahead of every peer: the best one
               _fastnas(0.3, second["seed"], 0.99, "over"),                 # over the budget: not a peer
               _fastnas(0.5, rows[2]["seed"], 0.99, "in_band")]             # another budget: not this one's
    cell = summarise(rows, [], fastnas)["0.3"]
    assert cell["best_peer"][0] == "fastnas"
    assert cell["ours_minus_best_peer"][0] == pytest.approx(first["prune"]["test_acc"] - (top + 0.05))
    assert cell["best_peer"][1:] == without["best_peer"][1:]
    assert cell["ours_minus_best_peer"][1:] == pytest.approx(without["ours_minus_best_peer"][1:])
    assert cell["fastnas"]["seeds"] == [first["seed"], second["seed"]]
    assert cell["fastnas"]["status"] == ["in_band", "over"]


def test_a_variant_of_ours_is_compared_with_the_best_peer_of_its_own_seed() -> None:
    from benchmarks.trained_model import add_variant

    rows = [r for r in json.loads(TRAINED_MODEL.read_text())["rows"] if r["budget"] == 0.3]
    summary = summarise(rows, [])
    worse = json.loads(json.dumps(rows[:2]))  # the same networks, 1 point worse, in two seeds only
    for v in worse:
        v["prune"]["test_acc"] -= 0.01
    add_variant(summary, worse, "ours, worse")
    v = summary["0.3"]["variant"]
    assert v["seeds"] == [r["seed"] for r in rows[:2]]
    assert v["minus_best_peer"] == pytest.approx([d - 0.01 for d in summary["0.3"]["ours_minus_best_peer"][:2]])


def test_a_variant_is_compared_in_a_seed_where_ours_read_over_the_budget() -> None:
    from benchmarks.trained_model import add_variant

    rows = json.loads(json.dumps([r for r in json.loads(TRAINED_MODEL.read_text())["rows"] if r["budget"] == 0.3]))
    first = rows[0]
    first["compare"]["ours"].update(budget_status="over")  # ours of this seed does not count...
    summary = summarise(rows, [])
    assert len(summary["0.3"]["ours_minus_best_peer"]) == len(rows) - 1
    variant = json.loads(json.dumps(rows[:1]))  # ...a variant of ours that met the budget does, against the same peers
    variant[0]["compare"]["ours"].update(budget_status="in_band")
    add_variant(summary, variant, "ours, in the budget")
    top = max(first["compare"][m]["test_acc"] for m in PEERS if first["compare"][m]["budget_status"] != "over")
    assert summary["0.3"]["variant"]["minus_best_peer"] == pytest.approx([first["prune"]["test_acc"] - top])


def test_fastnas_rows_must_come_from_the_same_work_and_settings(tmp_path) -> None:
    from benchmarks.trained_model import fastnas_rows

    row = _fastnas(0.5, 0, 0.6, "in_band")
    old = tmp_path / "old.json"  # as the committed files: the --work only in the command, no overrides
    old.write_text(json.dumps({"meta": {"command": "python -m benchmarks.fastnas --work /w --budgets 0.5"}, "rows": [row]}))
    new = tmp_path / "new.json"
    new.write_text(json.dumps({"meta": {"work": "/w", "overrides": ["prune.optimizer.lr=0.01"]}, "rows": [row]}))
    assert fastnas_rows([old], Path("/w"), []) == [row]
    assert fastnas_rows([new], Path("/w"), ["prune.optimizer.lr=0.01"]) == [row]
    with pytest.raises(ValueError, match="--work /w, this run's is /other"):
        fastnas_rows([old], Path("/other"), [])
    with pytest.raises(ValueError, match="the same fine-tuning"):
        fastnas_rows([old], Path("/w"), ["prune.optimizer.lr=0.01"])
    with pytest.raises(ValueError, match="the same fine-tuning"):
        fastnas_rows([new], Path("/w"), [])
    with pytest.raises(ValueError, match="not a rows.json"):
        fastnas_rows([tmp_path / "missing.json"], Path("/w"), [])


@pytest.mark.parametrize("args, says", [
    (["--budgets", "0.5", "--budget-seeds", "0.3:0,1"], "budget 0.3 is not in --budgets"),
    (["--fastnas", "MISSING"], "not a rows.json"),
    (["--set", "prune.optimzer.lr=0.01"], "params have no section 'optimzer'"),
    (["--set", "prune.optimizer.lr"], "expected KEY=VALUE"),
    (["--variant", "prune.taylor_label=sampled"], "--variant prune.taylor_label=sampled: 'prune.taylor_label': params "
                                                  "have no key 'taylor_label'"),
    (["--aim", "0.9", "--variant", "prune.aim=0.9"], "give one"),
])
def test_bad_arguments_stop_before_any_work(tmp_path, capsys, args, says) -> None:
    from benchmarks.trained_model import main

    work = tmp_path / "work"
    with pytest.raises(SystemExit) as stop:
        main(["--work", str(work), "--out", str(tmp_path / "out"),
              *[str(tmp_path / a) if a == "MISSING" else a for a in args]])
    assert stop.value.code == 2
    assert says in " ".join(capsys.readouterr().err.split())  # argparse wraps long messages
    assert not work.exists() and not (tmp_path / "out").exists()


def test_fastnas_refuses_a_misspelt_override_before_any_work(tmp_path, capsys) -> None:
    from benchmarks.fastnas import main

    with pytest.raises(SystemExit) as stop:  # before nvidia-modelopt is even looked for
        main(["--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--set", "train.augmnt=padcrop_flip"])
    assert stop.value.code == 2
    assert "params have no key 'augmnt'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_prune_protocol_refuses_a_misspelt_override_before_any_work(tmp_path, capsys, monkeypatch) -> None:
    from benchmarks.prune_protocol import main

    monkeypatch.setattr("sys.argv", ["prune_protocol", "--upstream", str(tmp_path / "up"), "--out",
                                     str(tmp_path / "out"), "--set", "prune.taylor_batch=8"])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 2
    assert "--set prune.taylor_batch=8: 'prune.taylor_batch': params have no key 'taylor_batch'" in \
        " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "out").exists()
