"""The prune stage's resume directory: what an interrupted run left, found again only by a run of
the same configuration (every record carries the fingerprint, ``key``, of what it depends on)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pipeline.io import write_json


class ResumeState:
    """JSON records and training checkpoints under ``root`` (the stage's ``--resume-dir``/prune)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / name

    def read(self, name: str, key: str) -> dict[str, Any] | None:
        """The record ``name`` when an interrupted run of the same configuration (``key``) left it."""
        try:
            state = json.loads(self.path(name).read_text())
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) and state.get("key") == key else None

    def write(self, name: str, key: str, record: dict[str, Any]) -> None:
        write_json(self.path(name), {"key": key, **record})

    def clear(self) -> None:
        """Remove every record and checkpoint (after success, or when nothing may be resumed)."""
        shutil.rmtree(self.root, ignore_errors=True)
