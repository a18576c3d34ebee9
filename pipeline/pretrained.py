"""Models that arrive trained: the weights a model entry names, loaded into the model built for
this dataset, and the accuracy of a model as it is (``epochs: 0``).

The reading and fitting rules are ``models.weights``'s (``weights_only=True``; the classifier
head replaced when only its class count differs; anything else that does not fit is an error).
What this module adds is the project's side: a weights file must lie inside the weights folder
that dvc.yaml lists as a dependency (so changing it re-runs the stages that read it), and the
report (source, sha256, replaced keys) that goes into the stage's metrics and checkpoint.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.weights import (
    WeightsError,
    fit_state_dict,
    is_weights_name,
    load_torchvision_state_dict,
    read_state_dict,
    torchvision_weights,
)
from pipeline.config import TrainConfig
from pipeline.data import PreparedData
from pipeline.io import file_sha256
from pipeline.train import TrainResult, predict_logits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedWeights:
    """What was loaded: ``source`` as written in params, ``file`` it was read from, its
    ``sha256``, and the keys ``replaced`` (fresh head) or ``adapted`` (first conv)."""

    source: str
    file: str
    sha256: str
    replaced: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        """Plain data for metrics and checkpoint meta."""
        return asdict(self)


def weights_file(value: str, weights_dir: str | Path) -> Path:
    """The file a weights value names, which must exist inside ``weights_dir`` (the folder the
    stages depend on). WeightsError otherwise, saying where to put it."""
    path, folder = Path(value), Path(weights_dir)
    # lexically (a link inside the folder is allowed: DVC hashes what it points to)
    if not Path(os.path.abspath(path)).is_relative_to(os.path.abspath(folder)):
        raise WeightsError(f"weights file {value} is not inside {folder}/: put it there (e.g. {folder / path.name}) "
                           f"so that dvc.yaml, which lists {folder}/ as a dependency, re-runs the stages that read it "
                           "when it changes")
    if not path.is_file():
        have = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        raise WeightsError(f"weights file {value} does not exist (files in {folder}/: {', '.join(have) or 'none'})")
    return path


def load_entry_weights(model: nn.Module, arch: str, value: str, weights_dir: str | Path) -> LoadedWeights:
    """Load the weights ``value`` (a file inside ``weights_dir`` or a torchvision weights name of
    ``arch``) into ``model`` (modified in place). Raises WeightsError (exit 2) when they cannot be
    read or do not fit."""
    if is_weights_name(value):
        state, path = load_torchvision_state_dict(torchvision_weights(arch, value))
    else:
        path = weights_file(value, weights_dir)
        state = read_state_dict(path)
    fit = fit_state_dict(model, state, value if str(path) == value else f"{value} ({path})")
    loaded = LoadedWeights(value, str(path), file_sha256(path), fit.replaced, fit.adapted)
    if fit.replaced or fit.adapted:
        log.info("weights %s: replaced %s (fresh initialisation), adapted %s", value, fit.replaced or "nothing",
                 fit.adapted or "nothing")
    return loaded


def evaluate_as_is(model: nn.Module, data: PreparedData, cfg: TrainConfig, device: torch.device) -> TrainResult:
    """The result of zero training epochs: ``model``'s own weights, scored on the train and
    validation splits (eval mode, no augmentation) as one history record with ``epoch: 0``, so
    the stage writes the same metrics and plots as after training."""
    model.to(device)
    mean, std = data.norm()
    record: dict[str, float] = {"epoch": 0, "lr": 0.0}
    for name, split in (("train", data.train), ("val", data.val)):
        logits = predict_logits(model, split, mean, std, device, cfg.eval_batch_size, cfg.amp)
        record[f"{name}_loss"] = nn.functional.cross_entropy(logits, split.y).item()
        record[f"{name}_acc"] = (logits.argmax(1) == split.y).float().mean().item()
    record["epoch_seconds"] = 0.0
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return TrainResult(state, 0, record["val_acc"], [record], "not trained (epochs: 0)")
