"""The current results, generated from the committed benchmark result files under
benchmarks/results/: docs/results.md (one table per benchmark) and the README's one results table
(between ``<!-- results:begin -->`` and ``<!-- results:end -->``).

    python -m benchmarks.results_table            # rewrite both
    python -m benchmarks.results_table --check    # exit 1 and print the differences when either is stale

Which result files are today's is decided here (``C10_RUNS``, ``ABLATIONS``, ``LATENCY_RUNS`` and
the other constants: the runs of the current protocol and defaults; the dated journal,
docs/history.md, says why each superseded the one before). Every
figure comes from the files: accuracies as mean ± std over seeds (sample std), differences paired
per seed, latencies as median (min-max). A row's machine is the device the file records, its date
the one the file (or its run's table.md or log) records; a file that records none gets the date
of its last commit, or "uncommitted". Nothing is trained or measured: it reads JSON and text.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path("benchmarks/results")
README = Path("README.md")
RESULTS_MD = Path("docs/results.md")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
_DATE = re.compile(r"\b(20\d\d-[01]\d-[0-3]\d)\b")
_OVERRIDES = re.compile(r"overrides (\[.*?\])")
METHODS = (("ours", "ours"), ("uniform", "uniform width scaling"), ("l1", "Torch-Pruning L1"),
           ("unpruned", "unpruned, trained as long"))
BASELINES = ("uniform", "l1")


# --------------------------------------------------------------------------------------------
# Formatting


def mean_std(xs: list[float], scale: float = 100.0, digits: int = 1, signed: bool = False) -> str:
    """``xs`` (fractions, e.g. accuracies 0.555) as "55.5 ± 0.1" in points (``scale`` 100): the mean
    and the sample standard deviation over seeds. One value: the value alone. No values: "-"."""
    if not xs:
        return "-"
    sign = "+" if signed else ""
    m = scale * statistics.mean(xs)
    if len(xs) == 1:
        return f"{m:{sign}.{digits}f}"
    return f"{m:{sign}.{digits}f} ± {scale * statistics.stdev(xs):.{digits}f}"


def median_range(xs: list[float], digits: int = 2, unit: str = "") -> str:
    """"0.90 (0.83-0.96)": median and range; one value, or all equal: the value alone; none: "-"."""
    if not xs:
        return "-"
    f = f"{{:.{digits}f}}"
    med = f.format(statistics.median(xs)) + unit
    return med if min(xs) == max(xs) else f"{med} ({f.format(min(xs))}-{f.format(max(xs))})"


def span(xs: list[int]) -> str:
    """Parameter counts over seeds: "246,054" or "246,054-323,000"."""
    lo, hi = min(xs), max(xs)
    return f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]


# --------------------------------------------------------------------------------------------
# Where a figure comes from: file, command, machine, date


def _read(path: Path) -> Any:
    return json.loads((REPO / path).read_text())


def _companion(path: Path) -> Path | None:
    """The Markdown table a benchmark wrote next to its JSON (``b0.7_rows.json`` -> ``b0.7_table.md``)."""
    name = re.sub(r"(rows|runs|timing_noise)\.json$", "table.md", path.name)
    cand = path.with_name(name)
    return cand if name != path.name and (REPO / cand).is_file() else None


def recorded_date(path: Path) -> str:
    """The date the result file records: its JSON ``date``, else the date in the first line of its
    run's table.md, else in a ``## `` heading of the file itself (a console log); else its last
    commit's date; else "uncommitted"."""
    text = (REPO / path).read_text(errors="replace")
    if path.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict) and isinstance(data.get("date"), str):
            return data["date"]
    comp = _companion(path)
    if comp:
        first = next((line for line in (REPO / comp).read_text().splitlines() if line.strip()), "")
        if m := _DATE.search(first):
            return m.group(1)
    for line in text.splitlines():
        if line.startswith("## ") and (m := _DATE.search(line)):
            return m.group(1)
    return commit_date(path)


def commit_date(path: Path) -> str:
    """``git log``'s date of the last commit of ``path``; "uncommitted" when it has none (untracked, or no
    git)."""
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%cs", "--", str(path)], cwd=REPO, capture_output=True,
                             text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return "uncommitted"
    return out.stdout.strip() or "uncommitted"


def overrides(path: Path) -> list[str]:
    """The ``--set`` overrides a prune_protocol run recorded in its table.md header."""
    comp = _companion(path)
    m = _OVERRIDES.search((REPO / comp).read_text()) if comp else None
    if not m:
        return []
    return re.findall(r"'([^']*)'", m.group(1))


def device_text(dev: dict[str, Any] | None, extra: str = "") -> str:
    if not dev:
        return "not recorded"
    parts = [dev.get("name", "?")]
    if dev.get("cores"):
        parts.append(f"{dev['cores']} cores")
    if dev.get("machine"):
        parts.append(dev["machine"])
    return ", ".join(parts) + (f"; {extra}" if extra else "")


@dataclass
class Refs:
    """Sources of one table, keyed A, B, ...: each with its file, command, machine and date."""

    items: list[tuple[str, Path, str, str]] = field(default_factory=list)

    def key(self, path: Path, command: str, machine: str) -> str:
        for i, (_, p, _, _) in enumerate(self.items):
            if p == path:
                return chr(ord("A") + i)
        self.items.append((chr(ord("A") + len(self.items)), path, command, machine))
        return self.items[-1][0]

    def run(self, run: ProtocolRun) -> str:
        return self.key(run.rows, run.command(), run.machine())

    def legend(self) -> list[str]:
        return [f"- **{k}** `{p}` ({recorded_date(p)}; {m}): `{c}`" for k, p, c, m in self.items]


# --------------------------------------------------------------------------------------------
# The pruning protocol (benchmarks/prune_protocol.py)


@dataclass(frozen=True)
class ProtocolRun:
    """One directory of ``python -m benchmarks.prune_protocol`` output, and what it is used for."""

    rows: Path
    preset: str | None  # the preset the upstream was prepared with (None: the default params)
    holdout_per_class: int = 0

    def load(self) -> list[dict[str, Any]]:
        return [r for r in _read(self.rows) if "failed" not in r]

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


def _by_seed(runs: list[dict[str, Any]], method: str, split: str) -> dict[int, float]:
    return {r["seed"]: v for r in runs if (v := _acc(r, method, split)) is not None}


def _split(runs: list[dict[str, Any]]) -> str:
    """The holdout when every run was scored on it, else the test split."""
    return "holdout_acc" if all("holdout_acc" in r.get("compare", {}).get("ours", {}) for r in runs) else "test_acc"


def _params(runs: list[dict[str, Any]], method: str) -> list[int]:
    return [r["compare"][method]["params"] if method in r.get("compare", {}) else r["prune"]["params"]
            for r in runs if method in r.get("compare", {}) or method == "ours"]


def _seeds(seeds: Any) -> str:
    return ", ".join(str(s) for s in sorted(seeds))


def _landing(runs: list[dict[str, Any]], method: str) -> tuple[list[float], str]:
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
    ours = _by_seed(runs, "ours", split)

    def network(label: str, method: str, src: list[dict[str, Any]], k: str, landing: bool = True) -> list[str]:
        hold, test = _by_seed(src, method, "holdout_acc"), _by_seed(src, method, "test_acc")
        theirs = hold if split == "holdout_acc" else test
        paired = "" if method == "ours" else \
            mean_std([ours[s] - theirs[s] for s in sorted(theirs) if s in ours], signed=True) + tag
        ratios, marks = _landing(src, method) if landing else ([], "-")
        params = _params(src, method)
        return [f"{budget:g}", label, _seeds(test), span(params) if params else "-", mean_std(list(hold.values())),
                mean_std(list(test.values())), paired, median_range(ratios), marks, k]

    out = []
    student = next((r["compare"]["student"] for r in runs if "compare" in r), None)
    if student:  # one network, scored once: the same figure in every run
        out.append([f"{budget:g}", "student (as trained)", _seeds(seeds), f"{runs[0]['prune']['params_student']:,}",
                    mean_std([student["holdout_acc"]] if "holdout_acc" in student else []),
                    mean_std([student["test_acc"]]), "", f"{1 / budget:.2f} (1 / budget)", "", key])
    out.append(network("**ours**", "ours", runs, key))
    out += [network(label, m, runs, key) for m, label in METHODS[1:3] if any(m in r.get("compare", {}) for r in runs)]
    if all(any(m in r.get("compare", {}) for m in BASELINES) for r in runs):
        best, over = better_baseline(runs, split)
        cell = mean_std(list(best.values()))
        out.append([f"{budget:g}", "the better baseline in each seed, whatever its latency", _seeds(seeds), "",
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
            rows.append([label, f"{b:g}", _seeds(seeds), "holdout" if split == "holdout_acc" else "test split",
                         mean_std([acc[s] for s in seeds]), mean_std(list(dflt.values())),
                         mean_std([acc[s] - dflt[s] for s in seeds], signed=True), median_range(ratios),
                         f"{min(blocks)}-{max(blocks)}" if len(set(blocks)) > 1 else str(blocks[0]),
                         f"{refs.run(run)} vs {refs.run(default)}"])
    header = ["setting (else the default)", "budget", "seeds", "scored on", "acc %", "default's acc %",
              "setting - default, paired, points", "measured / budget (prune stage), median (range)",
              "blocks removed", "src"]
    return header, rows, refs


# --------------------------------------------------------------------------------------------
# Other benchmarks


LATENCY_RUNS = (("quiet machine", RESULTS / "latency_model/runs.json"),
                ("a busy loop on the other core", RESULTS / "latency_model_loaded/runs.json"))


def latency_model() -> tuple[list[str], list[list[str]], Refs]:
    refs = Refs()
    rows = []
    for label, path in LATENCY_RUNS:
        runs = _read(path)
        dev = runs[0].get("device")
        k = refs.key(path, f"python -m benchmarks.latency_model --runs {len(runs)} --out {path.parent}",
                     device_text(dev, runs[0].get("backend", "")))
        steps = sorted({r["step"] for r in runs})
        agree = sum(len(set(r["repeat_steps"])) == 1 for r in runs)
        rows.append([label, str(len(runs)), f"{_seeds(steps)} (repeats agreeing in {agree} of {len(runs)})",
                     median_range([100 * r["mape"] for r in runs], 2, "%"),
                     median_range([100 * r["max_ape"] for r in runs], 1, "%"),
                     median_range([100 * r["within_10pct"] for r in runs], 0, "%"),
                     median_range([r["spearman"] for r in runs], 3),
                     median_range([100 * r["uncalibrated_mape"] for r in runs], 1, "%"),
                     median_range([r["points"] for r in runs], 0),
                     median_range([r["stage_wall_s"] for r in runs], 1), k])
    header = ["condition", "runs", "channel step", "held-out MAPE", "max error", "within +-10%", "Spearman",
              "MAPE before calibration", "table points", "stage s", "src"]
    return header, rows, refs


TIMING_NOISE = (RESULTS / "timing_noise/copies1_rounds40/timing_noise.json",
                RESULTS / "timing_noise/copies2_rounds20/timing_noise.json")


def timing_noise() -> tuple[list[str], list[list[str]], Refs]:
    refs = Refs()
    rows = []
    for path in TIMING_NOISE:
        d = _read(path)
        fp = d.get("fingerprint", {})
        vers = ", ".join(f"{k} {v}" for k, v in sorted((fp.get("versions") or {}).items()))
        copies = len({r["network"] for r in d["rows"] if r["network"].startswith("student copy")})
        rounds = max(r["rounds"] for r in d["rows"])
        cmd = f"python -m benchmarks.timing_noise --run RUN --rounds {rounds} --copies {copies} --out {path.parent}"
        k = refs.key(path, cmd, f"{d.get('machine', 'not recorded')}; {vers or fp.get('backend', '')}")
        for r in d["rows"]:
            if r["estimator"] != "fastest" or not r["network"].startswith("student copy"):
                continue
            proto = f"{r['protocol']} ({r['passes']} windows over {r['span_s']:g} s)"
            rows.append([str(copies), r["load"], proto, r["network"], str(r["rounds"]), f"{r['median']:.3f}",
                         f"{r['min']:.3f}-{r['max']:.3f}", f"{r['sd']:.3f}", k])
    header = ["copies per round", "load", "protocol", "network", "rounds", "median ratio", "min-max", "sd", "src"]
    return header, rows, refs


THROUGHPUT = (RESULTS / "train_throughput_cpu.json",)


def train_throughput() -> tuple[list[str], list[list[str]], Refs]:
    refs = Refs()
    rows = []
    for path in THROUGHPUT:
        d = _read(path)
        dev = d.get("device", {})
        cmd = (f"python -m benchmarks.train_throughput --arch {d['arch']} --device {dev.get('type', 'auto')} "
               f"--batch {d['batch']} --images {d['images']} --matmul {d['matmul']['n']} --json {path}")
        k = refs.key(path, cmd, f"{d.get('host', device_text(dev))}; torch {dev.get('torch', '?')}")
        mm = d["matmul"]
        for r in d["rows"]:
            rows.append([d["arch"], r["variant"], str(d["batch"]),
                         f"{r['images_per_s']:.0f} ({r['min']:.0f}-{r['max']:.0f})",
                         str(r["epochs_timed"]), f"{mm['tflops_median']:.3f} ({mm['dtype'].removeprefix('torch.')}, "
                         f"{mm['n']}x{mm['n']})", f"{100 * r['utilisation']:.0f}%", k])
    header = ["model", "variant", "batch", "images/s, median (range) over epochs", "epochs timed",
              "measured matmul TFLOP/s", "of the matmul rate", "src"]
    return header, rows, refs


PIPELINE_LOG = RESULTS / "cifar10_pipeline/cifar10-cpu-verdict/console.log"
PIPELINE_ENGINE = RESULTS / "cifar10_pipeline/cifar10-cpu-verdict/engine.json"


def _md_tables(text: str) -> list[list[dict[str, str]]]:
    """The Markdown tables in ``text`` (a benchmark's console log), as lists of {header: cell}."""
    tables, cur = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cur.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif cur:
            head, body = cur[0], [r for r in cur[2:]]
            tables.append([dict(zip(head, r)) for r in body])
            cur = []
    return tables


def cifar10_pipeline() -> tuple[list[str], list[list[str]], Refs]:
    refs = Refs()
    text = (REPO / PIPELINE_LOG).read_text()
    head = next(line for line in text.splitlines() if line.startswith("## CIFAR-10 pipeline"))
    preset = re.search(r"preset (\S+)", head).group(1).rstrip(",")
    mach = re.search(r"machine: (.*)$", head).group(1)
    eng = _read(PIPELINE_ENGINE)
    vers = ", ".join(f"{k} {v}" for k, v in sorted((eng.get("versions") or {}).items()))
    k = refs.key(PIPELINE_LOG, f"python -m benchmarks.cifar10_pipeline --preset {preset}", f"{mach}; {vers}")
    ke = refs.key(PIPELINE_ENGINE, f"python -m benchmarks.cifar10_pipeline --preset {preset}", f"{mach}; {vers}")
    models, lat, stages = [t for t in _md_tables(text) if t][:3]
    rows = [[m["model"], m["params"], m["test acc"], "-", k] for m in models]
    for m in lat:
        if m["latency (target)"].startswith("engine"):
            continue  # engine.json's row below says more: the verdict and the p50
        rows.append([f"latency: {m['latency (target)']}", "-", "-", f"{m['ms']} ms = {m['of budget']} of the budget",
                     k])
    lt = eng["latency"]
    rows.append([f"engine ({eng['backend']}): fastest of {lt['windows']} windows, the budget verdict", "-",
                 f"{100 * eng['test_acc']:.1f}%",
                 f"{lt['ms']:.4f} ms = {eng['measured_over_budget']:.3f} of the budget ({eng['verdict']}); "
                 f"p50 of {lt['runs']} calls {eng['p50_over_budget']:.3f}", ke])
    total = next(s for s in stages if "total" in s["stage"])
    secs, _, rest = total["seconds"].replace("*", "").partition(" ")
    rows.append(["the whole preset, every stage run (no DVC cache)", "-", "-", f"{secs} s {rest}".strip(), k])
    header = ["network or figure", "params", "test acc (1,000 images)", "latency / time", "src"]
    return header, rows, refs


ROBUSTNESS = RESULTS / "robustness/results.json"


def robustness() -> tuple[list[str], list[list[str]], Refs]:
    refs = Refs()
    d = _read(ROBUSTNESS)
    k = refs.key(ROBUSTNESS, f"python -m benchmarks.robustness --out {ROBUSTNESS.parent}",
                 d.get("machine", "not recorded"))
    rows = []
    det = d.get("determinism")
    if det:
        rows.append(["`dvc repro -f` of a teacher, params unchanged", "byte-identical checkpoint" if det["identical"]
                     else "checkpoint differs", f"dvc status clean: {det['dvc_status_clean']}", k])
    dv = d.get("diverged")
    if dv:
        rows.append(["teacher with lr 10 (diverges)", f"stage exit 2: {dv['stage_exited_2']}",
                     f"outputs left: {dv['outputs_left']}; lr restored, checkpoint identical: "
                     f"{dv['restored_identical']}", k])
    for name, what in (("killed_teacher", "teacher"), ("killed_prune", "prune stage")):
        kt = d.get(name)
        if kt:
            eq = kt["equal"]
            same = eq if isinstance(eq, bool) else ", ".join(f"{a} {'equal' if v else 'differs'}"
                                                             for a, v in eq.items())
            rows.append([f"`kill -9` of the {what} after one epoch, then `dvc repro`",
                         f"resumed from its state: {kt['resumed_from_state']}",
                         f"against an uninterrupted run: {same}", k])
    for case, res in (d.get("bundle") or {}).items():
        if not isinstance(res, dict):
            continue
        msg = re.sub(r"/tmp/\S+?/", "<tmp>/", res["message"]).strip()
        if res["exit"] == 0 and msg.count("\t") == 2:
            _, cls, prob = msg.split("\t")
            msg = f"predicted class {cls}, probability {prob}"
        rows.append([f"`pipeline.predict` on a bundle: {case.replace('_', ' ')}", f"exit {res['exit']}",
                     msg if len(msg) <= 110 else msg[:107] + "...", k])
    return ["case", "result", "detail", "src"], rows, refs


# --------------------------------------------------------------------------------------------
# The documents


SECTIONS = (
    ("Pruning under a latency budget: the CIFAR-10 CPU preset",
     "Every method starts from the same student and trains `prune.epochs` (8) with the same distillation loss; "
     "each baseline is matched to the same measured-latency band as ours (docs/pruning.md). Accuracy in %, mean ± "
     "std over seeds; the holdout is 10,000 CIFAR-10 images the preset never uses (its own test split, 1,000 "
     "images, has a standard error of about 1.6 points). Latency: compare's final joint measurement, measured / "
     "budget; \"outside the band\" counts the seeds whose network read outside compare's band.", cifar10_protocol),
    ("Ablations of ours", "The same protocol with one setting changed, against the default's networks of the "
     "same seeds.", ablations),
    ("Pruning under a latency budget: digits (the default params)",
     "The default pipeline's data (270 test images: one image is 0.37 points).", digits_protocol),
    ("The CIFAR-10 CPU preset end to end (one run)",
     "Every stage from an empty DVC cache, budget 0.5, one seed; test split of 1,000 images.", cifar10_pipeline),
    ("Latency model (`profile`)", "The real profile stage run several times in a row on the default params: "
     "channel step, held-out error of the calibrated predictor on random sub-networks it never saw "
     "(docs/latency.md).", latency_model),
    ("Timing protocol on identical networks", "The student measured with identical copies of itself (true ratio "
     "1.000) in interleaved rounds, with the product's estimator (the fastest window).", timing_noise),
    ("Training throughput", "ResNet-56 training steps against the device's measured matmul rate. "
     "On a GPU: not measured (no result file).", train_throughput),
    ("Failure handling through real DVC", "What a user sees when training fails, a stage is killed, or a "
     "bundle is tampered with.", robustness),
)


def results_md() -> str:
    out = ["# Current results", "",
           "Generated by `python -m benchmarks.results_table` from the result files under `benchmarks/results/`; "
           "do not edit by hand (`python -m benchmarks.results_table --check` and tests/test_results_table.py fail "
           "when this file and the files disagree). Each row names its source (src), and each source its command, "
           "machine and date. How each result came about, and what it replaced: docs/history.md.", ""]
    for title, intro, build in SECTIONS:
        header, rows, refs = build()
        out += [f"## {title}", "", intro, ""] + table(header, rows) + ["", "Sources:", ""] + refs.legend() + [""]
    out += ["## Not in a result file", "",
            "- `make test` and `make run` on fresh clones (wall time, exit codes): docs/history.md, the latest "
            "dated section on fresh clones.",
            "- Anything on a GPU, and any TensorRT figure: not measured.", ""]
    return "\n".join(out)


def readme_table() -> str:
    """The README's headline rows: the protocol at each budget, the latency model, the preset end to end."""
    refs = Refs()
    rows = []
    unpruned = C10_UNPRUNED.load()
    for b, run in sorted(C10_RUNS.items()):
        runs = [r for r in run.load() if r["budget"] == b]
        split = "holdout" if all("holdout_acc" in r["compare"]["ours"] for r in runs) else "test split"
        key = "holdout_acc" if split == "holdout" else "test_acc"
        k = refs.key(run.rows, run.command(), run.machine())
        accs = {m: _by_seed(runs, m, key) for m, _ in METHODS}
        seeds = sorted(accs["ours"])
        src = k
        if not accs["unpruned"] and b != 0.3:  # the reference is not cut to a budget: the 0.7 run's, same seeds
            accs["unpruned"] = {s: v for s, v in _by_seed(unpruned, "unpruned", key).items() if s in seeds}
            src = f"{k}, {refs.key(C10_UNPRUNED.rows, '', '')} (unpruned)"
        best, over = better_baseline(runs, key)
        acc_cells = [f"**{mean_std(list(accs['ours'].values()))}**"] + \
            [mean_std(list(accs[m].values())) for m in ("uniform", "l1", "unpruned")]
        rows.append([f"budget {b:g}: accuracy % on the {split}, {len(seeds)} seeds", *acc_cells,
                     mean_std([accs["ours"][s] - best[s] for s in seeds], signed=True)
                     + (f" (that baseline over budget in {over}/{len(seeds)})" if over else ""), src])
        lat = []
        for m in ("ours", "uniform", "l1"):
            ratios, marks = _landing(runs, m)
            lat.append(median_range(ratios) + ("" if marks == "-" else f", {marks}"))
        rows.append([f"budget {b:g}: measured / budget, median (range)", *lat, "-", "", k])
    lm = _read(LATENCY_RUNS[0][1])
    k = refs.key(LATENCY_RUNS[0][1], "", "")
    rows.append([f"latency model: held-out error (MAPE), {len(lm)} profile runs on digits",
                 median_range([100 * r["mape"] for r in lm], 2, "%"), "", "", "", "", k])
    _, prow, _ = cifar10_pipeline()
    total = prow[-1][3]
    eng = _read(PIPELINE_ENGINE)
    k = refs.key(PIPELINE_LOG, "", "")
    rows.append(["CIFAR-10 CPU preset end to end, one run: wall time; engine latency / budget",
                 f"{total}; engine {eng['measured_over_budget']:.2f} ({eng['verdict']})", "", "", "", "", k])
    header = ["result", "ours / value", "uniform", "Torch-Pruning L1", "unpruned, trained as long",
              "ours - better baseline, paired", "src"]
    legend = [f"- **{kk}** `{p}` ({recorded_date(p)})" for kk, p, _, _ in refs.items]
    return "\n".join(table(header, rows) + ["", *legend])


def render_readme(text: str) -> str:
    """``text`` (the README) with the generated table between the markers."""
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{README}: the markers {BEGIN} and {END} are missing")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{readme_table()}\n{END}{tail}"


def expected() -> dict[Path, str]:
    """What README.md and docs/results.md should hold, generated in memory."""
    return {README: render_readme((REPO / README).read_text()), RESULTS_MD: results_md()}


def differences(want: dict[Path, str]) -> list[str]:
    out = []
    for path, text in want.items():
        have = (REPO / path).read_text() if (REPO / path).is_file() else ""
        if have != text:
            out += list(difflib.unified_diff(have.splitlines(), text.splitlines(), f"{path} (committed)",
                                             f"{path} (generated)", lineterm="", n=1))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 listing the differences when "
                   "README.md or docs/results.md is not what the result files give")
    args = p.parse_args(argv)
    want = expected()
    if args.check:
        diff = differences(want)
        if diff:
            print("\n".join(diff))
            print("\nstale: run `python -m benchmarks.results_table`", file=sys.stderr)
            return 1
        print("README.md and docs/results.md match the result files")
        return 0
    for path, text in want.items():
        (REPO / path).write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
