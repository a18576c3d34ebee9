"""dvc.yaml declares, for every stage, each project module the stage's code imports (directly or
transitively): otherwise a code change would not re-run the stage and DVC would serve stale
results."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

PACKAGES = ("pipeline", "stages", "models")
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())


def module_file(name: str) -> Path | None:
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO / Path(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def imported_files(entry: Path) -> set[Path]:
    """Project files reachable by imports from ``entry`` (imports inside functions included)."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        pkg_init = f.parent / "__init__.py"
        if pkg_init.is_file() and pkg_init != f:
            todo.append(pkg_init)
        for node in ast.walk(ast.parse(f.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for n in names:
                parts = n.split(".")
                for i in range(1, len(parts) + 1):
                    mf = module_file(".".join(parts[:i]))
                    if mf is not None:
                        todo.append(mf)
    return seen


def stages() -> list[tuple[str, dict]]:
    out = []
    for name, st in DVC["stages"].items():
        out.append((name, st["do"] if "foreach" in st else st))
    return out


@pytest.mark.parametrize(("name", "stage"), stages(), ids=[n for n, _ in stages()])
def test_stage_deps_cover_imports(name: str, stage: dict) -> None:
    module = re.search(r"-m (stages\.\w+)", stage["cmd"])
    assert module, f"stage {name}: cmd does not run `-m stages.<name>`"
    entry = module_file(module.group(1))
    assert entry is not None
    deps = [d for d in stage["deps"] if "${" not in d]
    missing = []
    for f in imported_files(entry):
        rel = f.relative_to(REPO).as_posix()
        if not any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps):
            missing.append(rel)
    assert not missing, f"stage {name}: dvc.yaml deps lack {sorted(missing)}"


@pytest.mark.parametrize(("name", "stage"), stages(), ids=[n for n, _ in stages()])
def test_stage_params_sections_exist(name: str, stage: dict) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for p in stage.get("params", []):
        section = p.split(".")[0]
        assert section in params, f"stage {name} depends on params section {section!r} that params.yaml lacks"
