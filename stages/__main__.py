"""Run the pipeline without DVC: every stage of dvc.yaml, in its order, with its own command.

    python -m stages --preset cifar10-cpu --workdir runs/cifar10-cpu
    python -m stages --params my-params.yaml --workdir runs/mine [--from prune] [--until export]
    python -m stages --workdir runs/mine --list

For machines where DVC is not installed (the GPU machines this project is tested on have no
DVC). Commands come from dvc.yaml: ``vars``, params (``${section.key}``) and ``foreach`` over the
teachers are substituted as DVC does, and each command runs from ``--workdir`` (where the params
file is written and ``artifacts/``, ``metrics/``, ``plots/`` appear), with this repository on
PYTHONPATH. There is no caching: every selected stage runs. Wall time per stage is printed and
written to ``<workdir>/metrics/pipeline_times.json``. Use ``dvc repro`` / ``dvc exp run`` where
DVC is available.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
_REF = re.compile(r"\$\{\s*([A-Za-z0-9_.@-]+)\s*\}")


class PlanError(Exception):
    """dvc.yaml cannot be expanded with these params."""


def _lookup(context: dict[str, Any], ref: str) -> Any:
    value: Any = context
    for part in ref.split("."):
        if not isinstance(value, dict) or part not in value:
            raise PlanError(f"dvc.yaml refers to ${{{ref}}}, which the params and vars do not define")
        value = value[part]
    return value


def interpolate(text: str, context: dict[str, Any]) -> str:
    def sub(m: re.Match[str]) -> str:
        value = _lookup(context, m.group(1))
        if isinstance(value, (dict, list)):
            raise PlanError(f"${{{m.group(1)}}} is a {type(value).__name__}; a command needs a string or number")
        return str(value)

    return _REF.sub(sub, text)


def plan(params: dict[str, Any], dvc_yaml: Path = REPO / "dvc.yaml") -> list[tuple[str, str]]:
    """(stage name, command) in dvc.yaml order; ``foreach`` expanded as ``name@key``."""
    spec = yaml.safe_load(dvc_yaml.read_text())
    context: dict[str, Any] = {}
    for entry in spec.get("vars", []):
        if not isinstance(entry, dict):
            raise PlanError(f"dvc.yaml vars entry {entry!r}: only inline mappings are supported here")
        context.update(entry)
    context.update(params)
    out = []
    for name, stage in spec["stages"].items():
        if "foreach" in stage:
            ref = _REF.fullmatch(stage["foreach"].strip())
            items = _lookup(context, ref.group(1)) if ref else None
            if not isinstance(items, dict):
                raise PlanError(f"stage {name}: foreach must name a mapping in params")
            for key, item in items.items():
                cmd = interpolate(stage["do"]["cmd"], {**context, "key": key, "item": item})
                out.append((f"{name}@{key}", " ".join(cmd.split())))
        else:
            out.append((name, " ".join(interpolate(stage["cmd"], context).split())))
    return out


def _argv(cmd: str) -> list[str]:
    argv = shlex.split(cmd)
    if argv and argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    return argv


def _select(stages: list[tuple[str, str]], first: str | None, last: str | None) -> list[tuple[str, str]]:
    names = [n for n, _ in stages]

    def index(name: str, earliest: bool) -> int:
        hits = [i for i, n in enumerate(names) if n == name or n.split("@")[0] == name]
        if not hits:
            raise PlanError(f"no stage {name!r} in dvc.yaml; stages: {', '.join(names)}")
        return hits[0] if earliest else hits[-1]

    lo = index(first, True) if first else 0
    hi = index(last, False) if last else len(names) - 1
    if lo > hi:
        raise PlanError(f"--from {first} comes after --until {last} in dvc.yaml's order ({', '.join(names)}): "
                        "nothing would run")
    return stages[lo : hi + 1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stages", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help="a preset (presets/<name>.yaml) applied to the repository's params.yaml")
    src.add_argument("--params", type=Path, help="a complete params file (a relative prepare.root is relative to "
                                                  "the file's directory)")
    p.add_argument("--workdir", type=Path, required=True,
                   help="where the stages run and write; gets params.yaml (unless it already has one and no "
                        "--preset/--params is given)")
    p.add_argument("--from", dest="first", help="first stage to run (e.g. prune; train_teacher means all of them)")
    p.add_argument("--until", dest="last", help="last stage to run")
    p.add_argument("--list", action="store_true", help="print the commands and stop")
    args = p.parse_args(argv)

    from pipeline.config import validate_params
    from pipeline.errors import SlimdeployError
    from pipeline.preset import absolute_root, load_yaml, resolve

    workdir = args.workdir.resolve()
    target = workdir / "params.yaml"
    try:
        if workdir == REPO and (args.preset or args.params):
            raise PlanError("--workdir is the repository itself: its params.yaml would be overwritten; use another "
                            "directory, or edit params.yaml and run `python -m stages --workdir .`")
        if args.preset:
            params = resolve(args.preset)
        elif args.params:
            params = absolute_root(load_yaml(args.params), args.params.resolve().parent)
            validate_params(params)
        elif target.is_file():
            params = load_yaml(target)
            validate_params(params)
        else:
            raise PlanError(f"{target} does not exist; give --preset NAME or --params FILE")
        stages = _select(plan(params), args.first, args.last)
    except (PlanError, SlimdeployError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    if args.list:
        for name, cmd in stages:
            print(f"{name}: {cmd}")
        return 0
    workdir.mkdir(parents=True, exist_ok=True)
    if args.preset or args.params:
        target.write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    times: list[dict[str, Any]] = []
    start = time.perf_counter()
    for i, (name, cmd) in enumerate(stages, 1):
        print(f"[{i}/{len(stages)}] {name}: {cmd}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(_argv(cmd), cwd=workdir, env=env, check=False).returncode
        seconds = time.perf_counter() - t0
        if rc != 0:
            print(f"error: stage {name} failed with exit code {rc} after {seconds:.1f} s; fix it and resume with "
                  f"--from {name}", file=sys.stderr)
            return rc
        times.append({"stage": name, "seconds": round(seconds, 2)})
        print(f"[{i}/{len(stages)}] {name}: done in {seconds:.1f} s", flush=True)
    total = time.perf_counter() - start
    record = {"finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "stages": times,
              "total_seconds": round(total, 2)}
    from pipeline.io import write_json

    write_json(workdir / "metrics" / "pipeline_times.json", record)
    width = max(len(t["stage"]) for t in times)
    print("\n" + "\n".join(f"{t['stage']:<{width}}  {t['seconds']:8.1f} s" for t in times))
    print(f"{'total':<{width}}  {total:8.1f} s")
    return 0


if __name__ == "__main__":
    from pipeline.cli import run_main  # exit quietly when the output pipe closes (`| head -1`)

    sys.exit(run_main(main))
