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
    # expected values worked out by hand (T = 2), not with the code's own formula:
    # sample 0, teachers 0 and 1: mean logits (3.5, 0.5, 0) / 2 -> softmax (1.75, 0.25, 0)
    assert torch.allclose(target[0], torch.tensor([0.71587, 0.15973, 0.12440]), atol=1e-5)
    # sample 1, teachers 0 and 2 (teacher 1 is wrong): mean logits (0, 2, 0.25) / 2
    assert torch.allclose(target[1], torch.tensor([0.20612, 0.56031, 0.23357]), atol=1e-5)
    probs, _ = distillation_target(z, labels, T, "oracle", "probs")
    # mean of softmax (2, 0, 0) = (.78699, .10650, .10650) and softmax (1.5, .5, 0) = (.62853, .23122, .14024)
    assert torch.allclose(probs[0], torch.tensor([0.70776, 0.16886, 0.12337]), atol=1e-5)
    ens, has_all = distillation_target(z, labels, T, "ensemble", "logits")
    # every teacher on sample 2, right or not: mean logits (1, 1, 0) / 2
    assert has_all.all() and torch.allclose(ens[2], torch.tensor([0.38365, 0.38365, 0.23270]), atol=1e-5)


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


def test_memoized_teachers_give_the_teachers_logits_and_run_on_rows_they_have_not_seen() -> None:
    from pipeline.distill import memoize_split

    torch.manual_seed(0)
    members = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)) for _ in range(2)]
    ens = TeacherEnsemble(members)
    calls = {"n": 0}
    ens.members[0].register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    split = torch.randn(10, 1, 4, 4)
    assert not memoize_split(ens, split, "padcrop_flip", torch.device("cpu"), 4)  # augmented: rows never repeat
    assert memoize_split(ens, split, "none", torch.device("cpu"), 4)
    seen = calls["n"]  # the memo's own passes: ceil(10 / 4)
    assert seen == 3
    batch = split[[7, 2, 2, 9]]
    assert torch.equal(ens(batch), ens.run(batch)) and calls["n"] == seen + 1  # looked up; only run() ran
    fresh = batch + 1e-3  # not in the split (an augmented or a validation image): the teachers run
    assert torch.equal(ens(fresh), ens.run(fresh)) and calls["n"] == seen + 3
