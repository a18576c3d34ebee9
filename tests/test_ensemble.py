"""Ensemble and oracle metrics on hand-made logits."""

from __future__ import annotations

import pytest
import torch

from pipeline.ensemble import confusion_matrix, ensemble_report


def onehot_logits(preds: list[int], k: int = 3, scale: float = 5.0) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(preds), k).float() * scale


def test_members_ensemble_oracle_agreement() -> None:
    labels = torch.tensor([0, 1, 2, 0])
    a = onehot_logits([0, 1, 1, 1])  # right on samples 0, 1
    b = onehot_logits([0, 2, 2, 1])  # right on 0, 2
    c = onehot_logits([0, 1, 1, 2])  # right on 0, 1
    r = ensemble_report(torch.stack([a, b, c]), labels, ["a", "b", "c"], ["x", "y", "z"])
    assert r["members"] == {"a": 0.5, "b": 0.5, "c": 0.5}
    assert r["oracle_acc"] == 0.75  # sample 3 is wrong for everyone
    assert r["all_right"] == 0.25  # only sample 0
    assert r["none_right"] == 0.25
    # Ensemble (mean softmax): sample 0 -> 0 right; 1 -> class 1 (2 of 3) right;
    # 2 -> class 1 (2 of 3) wrong although b is right; 3 -> class 1 wrong.
    assert r["ensemble_acc"] == 0.5
    assert r["per_class_ensemble_acc"] == {"x": 0.5, "y": 1.0, "z": 0.0}


def test_ensemble_averages_probabilities_not_votes() -> None:
    labels = torch.tensor([1])
    confident = torch.tensor([[[0.0, 10.0]]])  # very sure of class 1
    unsure_a = torch.tensor([[[0.2, 0.0]]])  # slightly prefers 0
    unsure_b = torch.tensor([[[0.2, 0.0]]])
    r = ensemble_report(torch.cat([confident, unsure_a, unsure_b]), labels, ["c", "a", "b"], ["0", "1"])
    assert r["ensemble_acc"] == 1.0  # majority vote would say 0


def test_confusion_matrix_and_shape_check() -> None:
    cm = confusion_matrix(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 0]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]
    with pytest.raises(ValueError, match="do not match"):
        ensemble_report(torch.zeros(2, 4, 3), torch.zeros(5, dtype=torch.long), ["a", "b"], ["x", "y", "z"])
