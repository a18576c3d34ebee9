"""The house's size rules, measured: the largest modules and functions, every stage's `main`, and
private names imported across modules.

    python -m benchmarks.structure

Counts lines of every `.py` file outside tests/, benchmarks/ and virtual environments (a module:
its lines; a function: from its `def` to its last line, decorators excluded), with `ast`; private
imports (`from x import _name`) are looked for in every file, tests and benchmarks included.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from benchmarks._runner import REPO

ENVS = {".venv", ".lock-venv", ".git"}
SKIP = ENVS | {"tests", "benchmarks"}  # sizes: the product's code; private imports: every file


def sources(skip: set[str]) -> list[Path]:
    return [p for p in sorted(REPO.glob("**/*.py")) if not skip & set(p.relative_to(REPO).parts)]


def main() -> int:
    modules, functions, mains, private = [], [], {}, []
    for path in sources(ENVS):
        rel = str(path.relative_to(REPO))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module != "__future__":
                private += [f"{rel}: from {node.module} import {a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")]
    for path in sources(SKIP):
        rel, text = str(path.relative_to(REPO)), path.read_text()
        tree = ast.parse(text)
        modules.append((len(text.splitlines()), rel))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{rel}:{node.name}"))
        if rel.startswith("stages/"):
            for n in tree.body:
                if isinstance(n, ast.FunctionDef) and n.name == "main":
                    mains[rel] = n.end_lineno - n.lineno + 1
    print("largest modules:", ", ".join(f"{f} {n}" for n, f in sorted(modules)[:-6:-1]))
    print("largest functions:", ", ".join(f"{f} {n}" for n, f in sorted(functions)[:-6:-1]))
    print("stage mains:", ", ".join(f"{Path(f).stem} {n}" for f, n in sorted(mains.items(), key=lambda x: -x[1])))
    print("private names imported across modules:", "; ".join(private) or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
