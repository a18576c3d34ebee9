"""Formatting of figures (mean ± std, median and range) and the sources legend (file, command,
machine, date) every generated table uses."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmarks.tables.protocol import ProtocolRun

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path("benchmarks/results")
README = Path("README.md")
RESULTS_MD = Path("docs/results.md")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
DATE_RE = re.compile(r"\b(20\d\d-[01]\d-[0-3]\d)\b")
OVERRIDES_RE = re.compile(r"overrides (\[.*?\])")
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


def read_json(path: Path) -> Any:
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
        if m := DATE_RE.search(first):
            return m.group(1)
    for line in text.splitlines():
        if line.startswith("## ") and (m := DATE_RE.search(line)):
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
    m = OVERRIDES_RE.search((REPO / comp).read_text()) if comp else None
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


