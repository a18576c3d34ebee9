"""Oracle distillation on hand-made logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.distill import TeacherEnsemble, distillation_target, kd_criterion, oracle_kd_loss

T = 2.0


def _teachers() -> torch.Tensor:
    # 3 teachers, 3 samples, 3 classes; labels = [0, 1, 2]
    return torch.tensor([
        [[4.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 0.0, 0.0]],  # right, right, wrong
        [[3.0, 1.0, 0.0], [2.0, 0.0, 0.0], [2.0, 0.0, 0.0]],  # right, wrong, wrong
        [[0.0, 5.0, 0.0], [0.0, 1.0, 0.5], [0.0, 3.0, 0.0]],  # wrong, right, wrong
    ])


def test_oracle_target_uses_only_right_teachers() -> None:
    labels = torch.tensor([0, 1, 2])
    z = _teachers()
    target, has = distillation_target(z, labels, T, "oracle", "logits")
    assert has.tolist() == [True, True, False]  # sample 2: nobody is right
    assert torch.allclose(target[0], F.softmax((z[0, 0] + z[1, 0]) / 2 / T, -1))  # teachers 0 and 1
    assert torch.allclose(target[1], F.softmax((z[0, 1] + z[2, 1]) / 2 / T, -1))  # teachers 0 and 2
    probs, _ = distillation_target(z, labels, T, "oracle", "probs")
    assert torch.allclose(probs[0], (F.softmax(z[0, 0] / T, -1) + F.softmax(z[1, 0] / T, -1)) / 2)
    ens, has_all = distillation_target(z, labels, T, "ensemble", "logits")
    assert has_all.all() and torch.allclose(ens[2], F.softmax(z[:, 2].mean(0) / T, -1))


def test_loss_cases_all_some_none_right() -> None:
    labels = torch.tensor([0, 1, 2])
    z = _teachers()
    s = torch.tensor([[1.0, 0.5, -1.0], [0.2, 0.1, 0.3], [0.0, 1.0, 2.0]], requires_grad=True)
    out = oracle_kd_loss(s, z, labels, T, 0.9, "oracle")
    ce = F.cross_entropy(s, labels, reduction="none")
    target, _ = distillation_target(z, labels, T, "oracle")
    kl = (target * (target.log() - F.log_softmax(s / T, -1))).sum(-1) * T**2
    expected = torch.stack([0.1 * ce[0] + 0.9 * kl[0], 0.1 * ce[1] + 0.9 * kl[1], ce[2]]).mean()
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert out["distilled"].item() == pytest.approx(2 / 3)
    # none right on every sample: plain cross-entropy
    wrong = torch.zeros(2, 3, 3)
    wrong[..., 1] = 5.0  # both teachers always say class 1; labels 0 and 2 are never predicted
    lab = torch.tensor([0, 2, 0])
    res = oracle_kd_loss(s, wrong, lab, T, 0.9, "oracle")
    assert res["loss"].item() == pytest.approx(F.cross_entropy(s, lab).item(), rel=1e-6)
    # all right: pure mix of CE and KD on every sample
    right = F.one_hot(labels, 3).float()[None].repeat(2, 1, 1) * 4
    r = oracle_kd_loss(s, right, labels, T, 0.9, "oracle")
    assert r["distilled"].item() == 1.0
    assert oracle_kd_loss(s, z, labels, T, 0.9, "none")["loss"].item() == pytest.approx(ce.mean().item())
    out["loss"].backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_student_matching_the_oracle_has_zero_kd() -> None:
    labels = torch.tensor([0, 1])
    z = _teachers()[:, :2]
    target, _ = distillation_target(z, labels, T)
    s = torch.log(target) * T  # softmax(s / T) == target
    assert oracle_kd_loss(s, z, labels, T, 1.0)["kd"].item() == pytest.approx(0.0, abs=1e-6)


def test_teacher_ensemble_is_frozen_and_stays_in_eval() -> None:
    nets = [torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)) for _ in range(2)]
    ens = TeacherEnsemble(nets)
    ens.train()
    assert not any(m.training for m in ens.modules())
    x = torch.randn(5, 4)
    out = ens(x)
    assert out.shape == (2, 5, 3) and not out.requires_grad
    crit = kd_criterion(ens, 4.0, 0.9, "oracle")
    s = torch.randn(5, 3, requires_grad=True)
    crit(s, torch.tensor([0, 1, 2, 0, 1]), x).backward()
    assert all(p.grad is None for p in ens.parameters()) and s.grad is not None
