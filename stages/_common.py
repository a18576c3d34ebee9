"""What every entry point shares: params loading, logging, and turning user errors into exit 2."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError, SlimdeployError

log = logging.getLogger("slimdeploy")
EXIT_USER_ERROR = 2


def load_params(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of sections")
    from pipeline.config import validate_params

    validate_params(data)  # the whole file, whichever stage runs first
    return data


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return p


def setup_logging() -> None:
    rank = os.environ.get("RANK")
    fmt = "%(levelname)s %(name)s: %(message)s" if rank is None else f"[rank {rank}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, stream=sys.stderr)


def run(body: Callable[[], None]) -> int:
    """Run a stage body; a SlimdeployError is printed without a traceback and gives exit 2."""
    setup_logging()
    try:
        body()
    except SlimdeployError as err:
        log.error("%s", err)
        return EXIT_USER_ERROR
    return 0


def read_artifact(path: str | Path, keys: tuple[str, ...], what: str, stage: str) -> dict[str, Any]:
    """A JSON file another stage wrote, with ``keys`` required, or a CheckpointError naming the
    file and what is wrong (missing, not JSON, not that stage's file)."""
    from pipeline.errors import CheckpointError
    from pipeline.io import read_json

    try:
        data = read_json(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist; run the {stage} stage first") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}; it is not {what} written by the {stage} stage")
    return data


def read_arch(path: str | Path) -> dict[str, Any]:
    """The search stage's arch.json."""
    return read_artifact(path, ("arch", "arch_config"), "an arch.json", "search")


def read_pruned(path: str | Path, *keys: str) -> dict[str, Any]:
    """The prune stage's masks.json, with ``keys`` required."""
    return read_artifact(path, keys, "a masks.json", "prune")


def digest(*parts: Any) -> str:
    """Stable sha256 of JSON-serialisable parts (configs, hashes)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def deployed_target(params: dict[str, Any], precision_file: str | Path | None, model: str | Path | None = None) -> Any:
    """The params' ``target`` with the precision it deploys in: ``target.precision: auto`` is the
    precision stage's choice, read from ``precision_file`` (its output; dvc.yaml passes it to every
    stage that measures or deploys). A fixed precision is checked against the file when one is
    given, so a choice made for other params is never used; an auto choice also records the target
    settings it was measured under and the model's hash, checked against the params and ``model``
    (the checkpoint the stage compresses) when given."""
    from pipeline.config import TargetConfig, parse_section

    target = parse_section(params, "target", TargetConfig)
    if precision_file is None:
        if target.precision == "auto":
            raise ConfigError("target.precision auto is chosen by the precision stage: pass --precision with its "
                              "output (dvc.yaml does), or set target.precision to fp32, fp16 or int8")
        return target
    from pipeline.config.deploy import AUTO_PRECISIONS

    choice = read_artifact(precision_file, ("requested", "precision"), "a precision choice", "precision")
    again = "run the precision stage again (dvc repro does)"
    if choice["requested"] != target.precision:
        raise ConfigError(f"{precision_file} is the choice for target.precision {choice['requested']!r}, but the params "
                          f"say {target.precision!r}: {again}")
    allowed = AUTO_PRECISIONS.get((target.backend, target.device), ()) if target.precision == "auto" else (
        target.precision,)
    if choice["precision"] not in allowed:
        raise ConfigError(f"{precision_file} chose precision {choice['precision']!r}, which target.precision "
                          f"{target.precision} on {target.backend}/{target.device} cannot choose (allowed: "
                          f"{', '.join(allowed) or 'none'}): {again}")
    lacking = [k for k in ("target", "model_sha256") if target.precision == "auto" and k not in choice]
    if lacking:  # an auto choice is a measurement: one that does not say of what cannot be checked
        raise ConfigError(f"{precision_file} is an auto choice without {' and '.join(lacking)} (the target settings "
                          f"and the model it was measured on; written by hand or by an older precision stage), so it "
                          f"cannot be checked against these params: {again}")
    measured = choice.get("target") or {}
    differ = [f"target.{k} {v!r} (the params say {getattr(target, k)!r})" for k, v in measured.items()
              if hasattr(target, k) and getattr(target, k) != v]
    if differ:
        raise ConfigError(f"{precision_file} was measured with {', '.join(differ)}: {again}")
    from pipeline.io import file_sha256

    if model is not None and choice.get("model_sha256") not in (None, file_sha256(model)):
        raise ConfigError(f"{precision_file} was chosen on another model than {model} (its sha256 differs): {again}")
    return target.model_copy(update={"precision": choice["precision"]})


def add_precision_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default=None, help="the precision stage's output (target.precision auto: the "
                   "precision chosen; required then)")
