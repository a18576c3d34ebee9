"""Tables of the pruning protocol's result files (benchmarks/prune_protocol.py): which runs are
today's, per budget, and the ablations."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.tables.fmt import (
    BASELINES,
    METHODS,
    RESULTS,
    Refs,
    device_text,
    mean_std,
    median_range,
    overrides,
    read_json,
    span,
)

# --------------------------------------------------------------------------------------------
# The pruning protocol (benchmarks/prune_protocol.py)


@dataclass(frozen=True)
class ProtocolRun:
    """One directory of ``python -m benchmarks.prune_protocol`` output, and what it is used for."""

    rows: Path
    preset: str | None  # the preset the upstream was prepared with (None: the default params)
    holdout_per_class: int = 0

    def load(self) -> list[dict[str, Any]]:
        return [r for r in read_json(self.rows) if "failed" not in r]

    def command(self) -> str:
        rs = self.load()
        budgets = " ".join(f"{b:g}" for b in sorted({r["budget"] for r in rs}))
        seeds = " ".join(str(s) for s in sorted({r["seed"] for r in rs}))
        cmd = ["python -m benchmarks.prune_protocol --upstream UPSTREAM"]
        if self.preset:
            cmd.append(f"--preset {self.preset}")
        cmd.append(f"--budgets {budgets} --seeds {seeds}")
        if self.holdout_per_class:
            cmd.append(f"--holdout-per-class {self.holdout_per_class}")
        sets = overrides(self.rows)
        if sets:
            cmd.append("--set " + " ".join(f'"{s}"' for s in sets))
        cmd.append(f"--out {self.rows.parent}")
        return " ".join(cmd)

    def machine(self) -> str:
        pr = self.load()[0]["prune"]
        torch = (pr.get("train_device") or {}).get("torch")
        backend = pr.get("backend", "")
        return device_text(pr.get("device"), f"{backend}, torch {torch}" if torch else backend)


def _acc(r: dict[str, Any], method: str, split: str) -> float | None:
    """``method``'s accuracy on ``split`` (``holdout_acc`` | ``test_acc``) in one run; ours from the
    prune stage when the run has no compare stage (ablations)."""
    c = r.get("compare", {})
    if method == "ours" and split == "test_acc" and not c:
        return r["prune"]["test_acc"]
    return c.get(method, {}).get(split)


def by_seed(runs: list[dict[str, Any]], method: str, split: str) -> dict[int, float]:
    return {r["seed"]: v for r in runs if (v := _acc(r, method, split)) is not None}


def _split(runs: list[dict[str, Any]]) -> str:
    """The holdout when every run was scored on it, else the test split."""
    return "holdout_acc" if all("holdout_acc" in r.get("compare", {}).get("ours", {}) for r in runs) else "test_acc"


def _params(runs: list[dict[str, Any]], method: str) -> list[int]:
    return [r["compare"][method]["params"] if method in r.get("compare", {}) else r["prune"]["params"]
            for r in runs if method in r.get("compare", {}) or method == "ours"]


def seed_list(seeds: Any) -> str:
    return ", ".join(str(s) for s in sorted(seeds))


def landing_of(runs: list[dict[str, Any]], method: str) -> tuple[list[float], str]:
    """Measured / budget of ``method`` in compare's final joint run per seed, and where it read
    outside the band compare recorded: "below band 4/5", "over budget 1/5" (or "-")."""
    ratios, below, above, over = [], 0, 0, 0
    for r in runs:
        c = r.get("compare", {})
        if method in c:
            x = c[method]["measured_over_budget"]
        elif method == "ours":  # no compare stage (ablations): the prune stage's reading
            x = r["prune"]["measured_over_budget"]
        else:
            continue
        ratios.append(x)
        lo, hi = (c.get("protocol", {}).get("band") or r["prune"].get("band_effective") or [0.9, 1.0])
        over += x > 1.0
        above += hi < x <= 1.0
        below += x < lo
    n = len(ratios)
    marks = [f"{what} {k}/{n}" for what, k in (("below band", below), ("above band top", above),
                                               ("over budget", over)) if k]
    return ratios, ", ".join(marks) or "-"


def better_baseline(runs: list[dict[str, Any]], split: str) -> tuple[dict[int, float], int]:
    """Per seed the accuracy of the better baseline, whatever its latency (the conservative rival),
    and in how many seeds that baseline read over the budget in compare's final run."""
    best, over = {}, 0
    for r in runs:
        c = r["compare"]
        m = max((m for m in BASELINES if m in c), key=lambda m: c[m][split])
        best[r["seed"]] = c[m][split]
        over += c[m]["measured_over_budget"] > 1.0
    return best, over


def protocol_rows(budget: float, runs: list[dict[str, Any]], refs: Refs, run: ProtocolRun,
                  unpruned: ProtocolRun | None = None) -> list[list[str]]:
    """Rows for one budget: the student, ours, each baseline, the better baseline per seed and the
    unpruned reference (from ``unpruned``'s runs of the same seeds when ``runs`` have none; it is not
    cut to a budget, so any budget's run of it will do)."""
    split = _split(runs)
    tag = "" if split == "holdout_acc" else " (test split)"
    key = refs.run(run)
    seeds = sorted(r["seed"] for r in runs)
    ours = by_seed(runs, "ours", split)

    def network(label: str, method: str, src: list[dict[str, Any]], k: str, landing: bool = True) -> list[str]:
        hold, test = by_seed(src, method, "holdout_acc"), by_seed(src, method, "test_acc")
        theirs = hold if split == "holdout_acc" else test
        paired = "" if method == "ours" else \
            mean_std([ours[s] - theirs[s] for s in sorted(theirs) if s in ours], signed=True) + tag
        ratios, marks = landing_of(src, method) if landing else ([], "-")
        params = _params(src, method)
        return [f"{budget:g}", label, seed_list(test), span(params) if params else "-", mean_std(list(hold.values())),
                mean_std(list(test.values())), paired, median_range(ratios), marks, k]

    out = []
    student = next((r["compare"]["student"] for r in runs if "compare" in r), None)
    if student:  # one network, scored once: the same figure in every run
        out.append([f"{budget:g}", "student (as trained)", seed_list(seeds), f"{runs[0]['prune']['params_student']:,}",
                    mean_std([student["holdout_acc"]] if "holdout_acc" in student else []),
                    mean_std([student["test_acc"]]), "", f"{1 / budget:.2f} (1 / budget)", "", key])
    out.append(network("**ours**", "ours", runs, key))
    out += [network(label, m, runs, key) for m, label in METHODS[1:3] if any(m in r.get("compare", {}) for r in runs)]
    if all(any(m in r.get("compare", {}) for m in BASELINES) for r in runs):
        best, over = better_baseline(runs, split)
        cell = mean_std(list(best.values()))
        out.append([f"{budget:g}", "the better baseline in each seed, whatever its latency", seed_list(seeds), "",
                    cell if split == "holdout_acc" else "", cell if split == "test_acc" else "",
                    mean_std([ours[s] - best[s] for s in seeds], signed=True) + tag, "",
                    f"over budget {over}/{len(seeds)}" if over else "-", key])
    if any("unpruned" in r.get("compare", {}) for r in runs):
        out.append(network(METHODS[3][1], "unpruned", runs, key, landing=False))
    elif unpruned:
        src = [r for r in unpruned.load() if r["seed"] in seeds]
        other = ", ".join(f"{b:g}" for b in sorted({r["budget"] for r in src}))
        out.append(network(f"{METHODS[3][1]} (not cut to a budget: the {other} run's seeds)", "unpruned", src,
                           refs.run(unpruned), landing=False))
    return out


PROTOCOL_HEADER = ["budget", "network", "seeds", "params", "holdout acc %", "test acc %",
                   "ours - it, paired, points (holdout)", "measured / budget, median (range)",
                   "outside the band", "src"]

# Today's runs of the protocol on the CIFAR-10 CPU preset, per budget. 0.7: compare's verdicts timed
# with compare.timing_passes (history section 37); 0.5: the 10,000-image holdout (section 35);
# 0.3: the test split only (section 21). The unpruned reference: section 35's 0.7 run.
C10_RUNS = {
    0.3: ProtocolRun(RESULTS / "prune_protocol/cifar10-cpu_taylor/rows.json", "cifar10-cpu"),
    0.5: ProtocolRun(RESULTS / "prune_protocol/cifar10-cpu_holdout/b0.5_rows.json", "cifar10-cpu", 1000),
    0.7: ProtocolRun(RESULTS / "prune_protocol/cifar10-cpu_holdout_verdict/b0.7_rows.json", "cifar10-cpu", 1000),
}
C10_UNPRUNED = ProtocolRun(RESULTS / "prune_protocol/cifar10-cpu_holdout/b0.7_rows.json", "cifar10-cpu", 1000)
DIGITS_RUN = ProtocolRun(RESULTS / "prune_protocol/digits_taylor_unpruned/rows.json", None)
# Ablations of ours, each against the default's networks of the same seeds.
ABLATIONS = (
    ("blocks only (`prune.channels: false`)",
     ProtocolRun(RESULTS / "prune_protocol/cifar10-cpu_holdout_blocks_only/rows.json", "cifar10-cpu", 1000),
     ProtocolRun(RESULTS / "prune_protocol/cifar10-cpu_holdout_verdict/b0.7_rows.json", "cifar10-cpu", 1000)),
    ("`prune.taylor_normalize: group`",
     ProtocolRun(RESULTS / "prune_protocol/cifar10-cpu_taylor_normalize_b0.7/rows.json", "cifar10-cpu"),
     ProtocolRun(RESULTS / "prune_protocol/cifar10-cpu_taylor_5seeds/rows.json", "cifar10-cpu")),
    ("`prune.taylor_normalize: sqrt`",
     ProtocolRun(RESULTS / "prune_protocol/cifar10-cpu_taylor_sqrt_b0.7/rows.json", "cifar10-cpu"),
     ProtocolRun(RESULTS / "prune_protocol/cifar10-cpu_taylor_5seeds/rows.json", "cifar10-cpu")),
    ("`prune.taylor_batches: 1000` (a whole epoch)",
     ProtocolRun(RESULTS / "prune_protocol/cifar10-cpu_taylor_full_epoch_b0.7/rows.json", "cifar10-cpu"),
     ProtocolRun(RESULTS / "prune_protocol/cifar10-cpu_taylor_5seeds/rows.json", "cifar10-cpu")),
)


def cifar10_protocol() -> tuple[list[str], list[list[str]], Refs]:
    refs = Refs()
    rows: list[list[str]] = []
    for b, run in sorted(C10_RUNS.items()):
        runs = [r for r in run.load() if r["budget"] == b]
        rows += protocol_rows(b, runs, refs, run, C10_UNPRUNED if b != 0.3 else None)
    return PROTOCOL_HEADER, rows, refs


def digits_protocol() -> tuple[list[str], list[list[str]], Refs]:
    refs = Refs()
    runs = DIGITS_RUN.load()
    rows: list[list[str]] = []
    for b in sorted({r["budget"] for r in runs}):
        rows += protocol_rows(b, [r for r in runs if r["budget"] == b], refs, DIGITS_RUN)
    return PROTOCOL_HEADER, rows, refs


def ablations() -> tuple[list[str], list[list[str]], Refs]:
    refs = Refs()
    rows = []
    for label, run, default in ABLATIONS:
        runs, base = run.load(), default.load()
        for b in sorted({r["budget"] for r in runs}):
            mine = [r for r in runs if r["budget"] == b]
            ref = {r["seed"]: r for r in base if r["budget"] == b}
            split = _split(mine)
            seeds = sorted(r["seed"] for r in mine if r["seed"] in ref)
            acc = {r["seed"]: _acc(r, "ours", split) for r in mine}
            dflt = {s: _acc(ref[s], "ours", split) for s in seeds}
            ratios = [r["prune"]["measured_over_budget"] for r in mine]
            blocks = [len(r["prune"].get("removed_blocks") or []) for r in mine]
            rows.append([label, f"{b:g}", seed_list(seeds), "holdout" if split == "holdout_acc" else "test split",
                         mean_std([acc[s] for s in seeds]), mean_std(list(dflt.values())),
                         mean_std([acc[s] - dflt[s] for s in seeds], signed=True), median_range(ratios),
                         f"{min(blocks)}-{max(blocks)}" if len(set(blocks)) > 1 else str(blocks[0]),
                         f"{refs.run(run)} vs {refs.run(default)}"])
    header = ["setting (else the default)", "budget", "seeds", "scored on", "acc %", "default's acc %",
              "setting - default, paired, points", "measured / budget (prune stage), median (range)",
              "blocks removed", "src"]
    return header, rows, refs


