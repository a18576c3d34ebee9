"""Training loop: it learns, schedules are right, and an interrupted run resumes exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import build_model
from pipeline.config import OptimizerConfig, TrainConfig
from pipeline.train import lr_factor, predict_logits, train_classifier

CPU = torch.device("cpu")
TRAIN = TrainConfig(batch_size=64, progress=False, augment="padcrop_flip", crop_padding=1)
OPT = OptimizerConfig(lr=0.1, warmup_epochs=1)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet_tiny", num_classes=10, in_channels=1)


def test_training_learns_digits(digits) -> None:  # noqa: ANN001
    model = _model()
    cfg = TrainConfig(batch_size=32, progress=False)  # no flips: digits are not mirror-symmetric
    result = train_classifier(model, digits, cfg, OptimizerConfig(lr=0.2), epochs=4, seed=0, device=CPU)
    assert len(result.history) == 4 and 1 <= result.best_epoch <= 4
    assert result.best_val_acc > 0.8  # chance is 0.1
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    model.load_state_dict(result.best_state)
    mean, std = torch.tensor(digits.meta["mean"]), torch.tensor(digits.meta["std"])
    val_acc = (predict_logits(model, digits.val, mean, std, CPU).argmax(1) == digits.val.y).float().mean()
    assert val_acc.item() == pytest.approx(result.best_val_acc)


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_to_identical_weights(digits, tmp_path: Path) -> None:  # noqa: ANN001
    full = train_classifier(_model(), digits, TRAIN, OPT, epochs=3, seed=7, device=CPU)

    resume = tmp_path / "resume.pt"

    def stop_after_two(record: dict) -> None:  # interrupted at the end of epoch 3, before its state is saved
        if record["epoch"] == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_classifier(_model(), digits, TRAIN, OPT, epochs=3, seed=7, device=CPU,
                         resume_path=resume, fingerprint="f", on_epoch_end=stop_after_two)
    assert resume.is_file()
    seen: list[int] = []
    resumed = train_classifier(_model(), digits, TRAIN, OPT, epochs=3, seed=7, device=CPU,
                               resume_path=resume, fingerprint="f", on_epoch_end=lambda r: seen.append(r["epoch"]))
    assert seen == [3]  # only the missing epoch ran
    assert [h["val_acc"] for h in resumed.history] == [h["val_acc"] for h in full.history]
    assert resumed.best_epoch == full.best_epoch
    for k, v in full.best_state.items():
        assert torch.equal(v, resumed.best_state[k]), k


def test_resume_state_of_another_config_is_ignored(digits, tmp_path: Path) -> None:  # noqa: ANN001
    resume = tmp_path / "resume.pt"
    train_classifier(_model(), digits, TRAIN, OPT, epochs=1, seed=1, device=CPU, resume_path=resume, fingerprint="a")
    seen: list[int] = []
    train_classifier(_model(), digits, TRAIN, OPT, epochs=2, seed=1, device=CPU, resume_path=resume,
                     fingerprint="b", on_epoch_end=lambda r: seen.append(r["epoch"]))
    assert seen == [1, 2]


def test_custom_criterion_sees_the_batch(digits) -> None:  # noqa: ANN001
    shapes: list[tuple[int, ...]] = []

    def crit(logits: torch.Tensor, labels: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(inputs.shape))
        return torch.nn.functional.cross_entropy(logits, labels)

    train_classifier(_model(), digits, TRAIN, OPT, epochs=1, seed=0, device=CPU, criterion=crit)
    assert shapes and all(s[1:] == (1, 8, 8) for s in shapes)
    assert sum(s[0] for s in shapes) == len(digits.train)


def test_lr_schedules() -> None:
    cos = OptimizerConfig(schedule="cosine")
    assert lr_factor(0, 100, 10, cos) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, cos) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, cos) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, cos) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, cos) == pytest.approx(0.0, abs=1e-12)
    step = OptimizerConfig(schedule="multistep", milestones=(0.5, 0.75), gamma=0.1)
    assert [lr_factor(s, 100, 0, step) for s in (0, 49, 50, 75, 99)] == pytest.approx([1, 1, 0.1, 0.01, 0.01])
    assert lr_factor(42, 100, 0, OptimizerConfig(schedule="constant")) == 1.0


def test_nan_loss_stops_training_at_once_and_drops_the_resume_state(digits, tmp_path: Path) -> None:  # noqa: ANN001
    from pipeline.errors import TrainingDiverged

    resume = tmp_path / "resume.pt"
    calls = {"n": 0}
    base = torch.nn.CrossEntropyLoss()

    def criterion(logits: torch.Tensor, labels: torch.Tensor, _x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = base(logits, labels)
        return loss * float("nan") if calls["n"] == 3 + 20 else loss  # step 3 of the second epoch

    with pytest.raises(TrainingDiverged) as err:
        train_classifier(_model(), digits, TrainConfig(batch_size=64, progress=False), OPT, epochs=3, seed=0,
                         device=CPU, criterion=criterion, resume_path=resume, fingerprint="f")
    msg = str(err.value)
    assert "became nan at epoch 2/3, step 3 of 20" in msg and "learning rate" in msg and "optimizer.lr" in msg
    assert calls["n"] == 23  # stopped at once, not at the end of the epoch
    assert not resume.exists()  # the state from epoch 1 is not resumed into the same divergence


def test_a_model_that_learned_nothing_is_refused(digits) -> None:  # noqa: ANN001
    # Finite weights that learned nothing (what a too-high learning rate often leaves): every logit
    # equal, so the model answers one class. Built directly, not trained: whether a given learning
    # rate diverges, collapses or learns depends on the CPU's kernels.
    from pipeline.errors import TrainingDiverged
    from pipeline.train import check_above_chance, test_accuracy

    model = _model()
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    acc = test_accuracy(model, digits, CPU)
    assert acc == pytest.approx((digits.test.y == 0).double().mean().item())  # argmax of ties: class 0
    with pytest.raises(TrainingDiverged, match="at chance level for 10 classes"):
        check_above_chance(acc, 10, len(digits.test.y), "teacher")


def test_chance_limit() -> None:
    from pipeline.errors import TrainingDiverged
    from pipeline.train import check_above_chance

    check_above_chance(0.5, 10, 270, "x")
    with pytest.raises(TrainingDiverged, match="limit 15.48%"):
        check_above_chance(0.15, 10, 270, "x")
    check_above_chance(0.56, 2, 100000, "x")  # 2 classes, many images: 56% is above chance
