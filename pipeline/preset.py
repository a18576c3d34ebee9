"""Params presets: named overlays on params.yaml for a dataset and a machine (``presets/*.yaml``).

A preset holds only the keys it changes. Mappings merge key by key, except ``teachers``, which a
preset replaces whole (its names are the stage names ``train_teacher@<name>``). Relative paths in
``prepare.root`` are relative to the repository root and are made absolute when the preset is
applied, so queued experiments (which run in a temporary copy) find the data.

    python -m pipeline.preset list
    python -m pipeline.preset show cifar10-cpu            # the merged, validated params
    python -m pipeline.preset write cifar10-cpu --out run/params.yaml
    python -m pipeline.preset exp cifar10-cpu [--queue] [--name NAME] [--dry-run] [-- DVC ARGS]

``exp`` runs ``dvc exp run`` with one ``-S key=value`` per changed key, so the experiment records
exactly what the preset changed. Where DVC is absent, ``python -m stages --preset NAME --workdir
DIR`` runs the same stages in dvc.yaml order.
"""

from __future__ import annotations

import argparse
import copy
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import validate_params
from pipeline.errors import ConfigError, SlimdeployError

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "presets"
REPLACED = ("teachers",)  # sections a preset replaces whole instead of merging
_PLAIN = re.compile(r"^[A-Za-z_/][A-Za-z0-9_./:-]*$")


def preset_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    path = PRESETS / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(available()) or 'none'} (in {PRESETS})")
    return path


def available() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of params sections")
    return data


def merge(base: dict[str, Any], overlay: dict[str, Any], _top: bool = True) -> dict[str, Any]:
    """``base`` with ``overlay`` applied (neither is modified)."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        replace = _top and key in REPLACED
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not replace and value:
            out[key] = merge(out[key], value, _top=False)
        else:
            out[key] = copy.deepcopy(value)
    return out


def absolute_root(params: dict[str, Any], root_dir: Path = REPO) -> dict[str, Any]:
    prep = params.get("prepare") or {}
    root = prep.get("root")
    if isinstance(root, str) and prep.get("source", "digits") != "digits" and not Path(root).expanduser().is_absolute():
        params = copy.deepcopy(params)
        params["prepare"]["root"] = str((root_dir / root).resolve())
    return params


def resolve(name: str, base: Path | dict[str, Any] = REPO / "params.yaml") -> dict[str, Any]:
    """The params a preset gives on top of ``base`` (a file or its loaded contents): merged, root
    made absolute, validated."""
    base_params = load_yaml(base) if isinstance(base, Path) else base
    params = absolute_root(merge(base_params, load_yaml(preset_path(name))))
    validate_params(params)
    return params


# ----------------------------------------------------------------------------------------------
# `dvc exp run -S` overrides (Hydra override grammar)


def _value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        if _PLAIN.match(v) and yaml.safe_load(v) == v:  # unambiguous as an unquoted string
            return v
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_value(x)}" for k, x in v.items()) + "}"
    raise ConfigError(f"preset value {v!r} has an unsupported type {type(v).__name__}")


def overrides(base: dict[str, Any], target: dict[str, Any], prefix: str = "") -> list[str]:
    """``-S`` arguments turning ``base`` into ``target``: changed leaves, ``++`` for new keys,
    ``~`` for keys ``target`` drops."""
    out = []
    for key, value in target.items():
        path = f"{prefix}{key}"
        if key not in base:
            out.append(f"++{path}={_value(value)}")
        elif isinstance(value, dict) and isinstance(base[key], dict) and value:
            out.extend(overrides(base[key], value, f"{path}."))
        elif value != base[key]:
            out.append(f"{path}={_value(value)}")
    out.extend(f"~{prefix}{key}" for key in base if key not in target)
    return out


def exp_command(name: str, base: Path, queue: bool, exp_name: str | None, extra: list[str]) -> list[str]:
    base_params = load_yaml(base)
    target = resolve(name, base_params)
    cmd = ["dvc", "exp", "run"]
    if queue:
        cmd.append("--queue")
    if exp_name:
        cmd += ["--name", exp_name]
    for o in overrides(base_params, target):
        cmd += ["-S", o]
    return cmd + extra


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.preset", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="available presets")
    for cmd, text in (("show", "print the merged params"), ("write", "write the merged params to a file"),
                      ("exp", "run `dvc exp run` with the preset's changes as -S overrides")):
        s = sub.add_parser(cmd, help=text)
        s.add_argument("name", help="preset name (presets/<name>.yaml) or a path to a preset file")
        s.add_argument("--base", type=Path, default=REPO / "params.yaml", help="params the preset applies to")
        if cmd == "write":
            s.add_argument("--out", type=Path, required=True)
        if cmd == "exp":
            s.add_argument("--queue", action="store_true", help="queue it (run later with `dvc exp run --run-all`)")
            s.add_argument("--name", dest="exp_name", default=None, help="experiment name")
            s.add_argument("--dry-run", action="store_true", help="print the command only")
            s.epilog = "Arguments after -- go to dvc exp run."
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = p.parse_args(argv[: len(argv) - len(extra) - (1 if "--" in argv else 0)])
    try:
        if args.cmd == "list":
            for n in available():
                first = (PRESETS / f"{n}.yaml").read_text().splitlines()[0].lstrip("# ").strip()
                print(f"{n:16s} {first}")
            return 0
        if args.cmd == "show":
            print(yaml.safe_dump(resolve(args.name, args.base), sort_keys=False), end="")
            return 0
        if args.cmd == "write":
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(yaml.safe_dump(resolve(args.name, args.base), sort_keys=False))
            print(f"wrote {args.out}")
            return 0
        cmd = exp_command(args.name, args.base, args.queue, args.exp_name, extra)
    except SlimdeployError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(shlex.join(cmd))
    if args.dry_run:
        return 0
    dvc = shutil.which("dvc") or shutil.which("dvc", path=str(Path(sys.executable).parent))
    if dvc is None:
        print("error: dvc is not installed here (`make install` installs it); without DVC run the stages with "
              f"`python -m stages --preset {args.name} --workdir DIR`", file=sys.stderr)
        return 2
    return subprocess.run([dvc, *cmd[1:]], cwd=REPO, check=False).returncode


if __name__ == "__main__":
    from pipeline.cli import run_main  # exit quietly when the output pipe closes (`| head -1`)

    sys.exit(run_main(main))
