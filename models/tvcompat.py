"""Import torchvision on a CPU-only torch whose torchvision wheel is a CUDA build.

The registry's torchvision 0.28.0 wheel ships a CUDA-compiled extension. Next to the CPU build of
torch 2.13 that extension cannot load, and ``import torchvision`` then fails with
``operator torchvision::nms does not exist`` because torchvision registers meta kernels for the
two ops (``nms``, ``qnms``) the extension would have defined. Declaring those two schemas first
makes models, transforms and datasets import; the ops themselves stay unusable (we never call
them). Where the extension loads (a CUDA torch), this module does nothing.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_fallback_lib: torch.library.Library | None = None


def _extension_loads() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        raise ImportError("torchvision is not installed; run `make install` (see README)")
    candidates = sorted(Path(spec.origin).parent.glob("_C*.so"))
    if not candidates:
        return False
    try:
        torch.ops.load_library(str(candidates[0]))
    except OSError as err:  # undefined CUDA symbols next to a CPU torch
        log.debug("torchvision extension does not load (%s); declaring op schemas", err)
        return False
    return True


def import_torchvision() -> ModuleType:
    """Return the ``torchvision`` module, declaring the missing op schemas only when needed."""
    global _fallback_lib
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    if not _extension_loads() and _fallback_lib is None:
        _fallback_lib = torch.library.Library("torchvision", "DEF")  # kept alive: owns the schemas
        for schema in _SCHEMAS:
            _fallback_lib.define(schema)
    import torchvision

    return torchvision
