"""The property tests of tests/test_properties.py run for longer: many more, randomly seeded examples
of every image mode, damaged image file, manifest and params.yaml edit, to find the inputs the
bounded run of `make test` does not reach.

    python -m benchmarks.fuzz_inputs --out benchmarks/results/fuzz_inputs            # about 5 minutes of CPU, 1 process
    python -m benchmarks.fuzz_inputs --examples 500 --only damaged_files --seed 7      # one property, quickly

Writes ``<out>/runs.json`` (per property: examples, seconds, and the failure with Hypothesis's
shrunk falsifying example, if any) and ``<out>/table.md``. Exit status 1 when a property failed.
The failures earlier runs found, and their fixes, are listed in ``<out>/findings.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hypothesis
import PIL
import pydantic
from hypothesis import HealthCheck, given, settings

from benchmarks._runner import REPO, machine, write_results

# examples per property: 4.75 minutes of CPU in all on the 2-core AMD EPYC build machine (2026-12-04)
EXAMPLES = {"decoding_matches_reference": 12000, "damaged_files": 8000, "manifest_any_json": 12000,
            "manifest_one_field": 12000, "params_one_edit": 12000, "predict_edited_manifest": 1500}


def _properties(tmp: Path) -> dict[str, tuple[Callable[[], Any], Callable[[Any], None]]]:
    from tests.test_images import make_bundle
    from tests.test_properties import PROPERTIES, edits, json_values, predict_check, valid_manifest

    bundle = make_bundle(tmp)
    return {**PROPERTIES, "predict_edited_manifest": (lambda: edits(valid_manifest, json_values()),
                                                      predict_check(bundle, tmp))}


def run_property(name: str, strategy: Any, check: Callable[[Any], None], examples: int, seed: int) -> dict[str, Any]:
    """One property with ``examples`` examples from ``seed``; the first failure, shrunk, is recorded."""
    count = {"n": 0}

    def counted(value: Any) -> None:
        count["n"] += 1
        check(value)

    test = settings(max_examples=examples, database=None, deadline=None, derandomize=False,
                    suppress_health_check=list(HealthCheck))(given(strategy)(counted))
    test = hypothesis.seed(seed)(test)
    t0 = time.perf_counter()
    row: dict[str, Any] = {"property": name, "max_examples": examples, "seed": seed}
    try:
        test()
        row["status"] = "passed"
    except Exception as err:  # noqa: BLE001 - a benchmark records any failure and carries on to the next property
        row.update(status="FAILED", error=f"{type(err).__name__}: {err}"[:2000],
                   falsifying_example="\n".join(getattr(err, "__notes__", []))[:4000],
                   traceback=traceback.format_exc(limit=-6)[-3000:])
    row.update(examples_run=count["n"], seconds=round(time.perf_counter() - t0, 1))
    print(f"{name}: {row['status']} after {row['examples_run']} calls in {row['seconds']} s", flush=True)
    return row


def table(rows: list[dict[str, Any]], header: str) -> str:
    lines = [header, "", "| property | status | examples (calls) | seconds | failure |", "|---|---|---|---|---|"]
    for r in rows:
        failure = (r.get("error", "") or "").splitlines()[0][:160].replace("|", "\\|") if r["status"] != "passed" else ""
        lines.append(f"| `{r['property']}` | {r['status']} | {r['examples_run']} | {r['seconds']} | {failure} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "fuzz_inputs")
    p.add_argument("--seed", type=int, default=31)
    p.add_argument("--examples", type=int, default=None, help="examples per property (default: EXAMPLES)")
    p.add_argument("--only", nargs="*", default=None, help="property names to run (default: all)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning, module="PIL")  # what Pillow skips in damaged files
    with tempfile.TemporaryDirectory() as tmp:
        props = _properties(Path(tmp))
        names = args.only or list(props)
        rows = [run_property(n, props[n][0](), props[n][1], args.examples or EXAMPLES[n], args.seed) for n in names]
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    env = {"machine": machine(), "python": platform.python_version(), "hypothesis": hypothesis.__version__,
           "pillow": PIL.__version__, "pydantic": pydantic.__version__}
    header = (f"# Fuzzing inputs (tests/test_properties.py, longer)\n\n{when}, seed {args.seed}, {env['machine']}; "
              f"Python {env['python']}, Hypothesis {env['hypothesis']}, Pillow {env['pillow']}, pydantic "
              f"{env['pydantic']}. `examples (calls)` counts every call, the shrinking of a failure included. "
              "Failures found and fixed: findings.md.")
    out = {"finished": when, "env": env, "seed": args.seed, "properties": rows}
    write_results(args.out, "runs.json", out, table(rows, header))
    print(json.dumps({r["property"]: r["status"] for r in rows}))
    return 0 if all(r["status"] == "passed" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
