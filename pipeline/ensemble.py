"""What an ensemble of classifiers gets right, and what its oracle would.

The oracle of an ensemble is right on a sample when at least one member is right (Kang et al.,
AAAI 2020): the upper bound an oracle-distilled student can learn from.
"""

from __future__ import annotations

from typing import Any

import torch


def ensemble_probs(logits: torch.Tensor) -> torch.Tensor:
    """Mean of the members' softmax. ``logits``: (M, N, K) -> (N, K)."""
    return logits.float().softmax(-1).mean(0)


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) counts, rows = true class, columns = predicted class."""
    flat = labels.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def ensemble_report(logits: torch.Tensor, labels: torch.Tensor, names: list[str], classes: list[str]) -> dict[str, Any]:
    """Accuracy of every member, of the ensemble and of its oracle, plus agreement fractions.

    ``logits``: (M, N, K) for M members on N samples; ``labels``: (N,). Fractions in [0, 1].
    """
    if logits.ndim != 3 or logits.shape[0] != len(names) or logits.shape[1] != labels.numel():
        raise ValueError(f"logits {tuple(logits.shape)} do not match {len(names)} members x {labels.numel()} labels")
    right = logits.argmax(-1) == labels[None]  # (M, N)
    ens_pred = ensemble_probs(logits).argmax(-1)
    k = logits.shape[-1]
    cm = confusion_matrix(labels, ens_pred, k)
    per_class = (cm.diag().double() / cm.sum(1).clamp(min=1)).tolist()
    return {
        "members": {n: right[i].double().mean().item() for i, n in enumerate(names)},
        "best_member_acc": right.double().mean(1).max().item(),
        "mean_member_acc": right.double().mean().item(),
        "ensemble_acc": (ens_pred == labels).double().mean().item(),
        "oracle_acc": right.any(0).double().mean().item(),
        "all_right": right.all(0).double().mean().item(),
        "none_right": (~right.any(0)).double().mean().item(),
        "per_class_ensemble_acc": dict(zip(classes, per_class)),
        "num_samples": int(labels.numel()),
    }
