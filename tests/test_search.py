"""TAS search machinery: channel-wise interpolation, gradients to architecture logits, budget
checks, and a searched arch.json that rebuilds through the registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models import build_model
from pipeline.checkpoint import load_model, save_checkpoint
from pipeline.errors import ConfigError
from pipeline.search import SearchSpace, cost_loss, family_params, tau_at
from pipeline.supernet import SuperNet, cwi


def test_cwi_shapes_and_identity() -> None:
    x = torch.randn(2, 5, 4, 4)
    assert cwi(x, 5) is x
    up = cwi(x, 8)
    assert up.shape == (2, 8, 4, 4)
    down = cwi(torch.randn(2, 8, 3, 3), 4)
    assert down.shape == (2, 4, 3, 3)
    const = torch.ones(1, 3, 2, 2)
    assert torch.allclose(cwi(const, 7), torch.ones(1, 7, 2, 2))  # averaging keeps constants


def test_gradients_reach_architecture_parameters() -> None:
    torch.manual_seed(0)
    net = SuperNet(10, 1, [2, 2], [8, 16])
    net.set_mode("sample", 1.0)
    out = net(torch.randn(4, 1, 8, 8))
    assert out.shape == (4, 10)
    out.square().mean().backward()
    alphas = [c.alpha.grad for c in net.choices()]
    betas = [d.beta.grad for d in net.depth]
    assert any(g is not None and g.abs().sum() > 0 for g in alphas)
    assert all(g is not None and g.abs().sum() > 0 for g in betas)
    net.zero_grad()
    net.expected_params().backward()  # the cost is differentiable in every distribution
    assert all(c.alpha.grad.abs().sum() > 0 for c in net.choices())


def test_expected_params_bounds_and_derive() -> None:
    net = SuperNet(10, 3, [3, 3, 3], [16, 32, 64])
    full = family_params(10, 3, {"blocks": [3, 3, 3], "stage_widths": [16, 32, 64]})
    with torch.no_grad():  # put all mass on the largest candidate and the deepest depth
        for c in net.choices():
            c.alpha.fill_(-50)
            c.alpha[-1] = 50
        for d in net.depth:
            d.beta.fill_(-50)
            d.beta[-1] = 50
    assert net.expected_params().item() == pytest.approx(full, rel=0.01)
    arch = net.derive()
    assert arch["blocks"] == [3, 3, 3] and arch["stage_widths"] == [16, 32, 64]
    assert family_params(10, 3, arch) == full


def test_cost_loss_direction() -> None:
    e = torch.tensor(100.0, requires_grad=True)
    cost_loss(e, current=120, budget=100, largest=200, tolerance=0.05).backward()
    assert e.grad > 0  # over budget: minimising pushes the expected cost down
    e.grad = None
    cost_loss(e, current=50, budget=100, largest=200, tolerance=0.05).backward()
    assert e.grad < 0  # far under budget: pushes up
    assert cost_loss(e, current=95, budget=100, largest=200, tolerance=0.05).item() == 0.0
    assert tau_at(0, 10, 5.0, 0.1) == 5.0 and tau_at(9, 10, 5.0, 0.1) == pytest.approx(0.1)


def test_budget_below_family_is_an_error_before_training() -> None:
    space = SearchSpace((3, 3, 3), (16, 32, 64), (0.3, 0.5, 1.0))
    small, large = space.check_budget(10, 3, 1e9)
    assert small < large
    with pytest.raises(ConfigError, match="below the smallest member of the family"):
        space.check_budget(10, 3, small - 1)


def test_arch_json_round_trips_through_registry(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = SuperNet(4, 1, [2, 1], [8, 12])
    with torch.no_grad():
        for c in net.choices():
            c.alpha.normal_()
        for d in net.depth:
            d.beta.normal_()
    arch = json.loads(json.dumps(net.derive()))  # what arch.json stores
    cfg = {"num_classes": 4, "in_channels": 1, **arch}
    model = build_model("cifar_resnet", **cfg)
    save_checkpoint(tmp_path / "s.pt", "cifar_resnet", cfg, model.state_dict())
    loaded, _ = load_model(tmp_path / "s.pt")  # strict load
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(loaded(x), model.eval()(x))


def test_two_distinct_candidates_even_when_softmax_underflows() -> None:
    from pipeline.supernet import WidthChoice

    c = WidthChoice(16, (0.25, 0.5, 1.0))
    with torch.no_grad():
        c.alpha.copy_(torch.tensor([0.0, 0.0, 80.0]))
    c.tau = 0.01  # softmax((log_softmax(alpha) + g) / tau) is one-hot in float32
    for _ in range(20):
        c.resample()
        idx = [i for i, _ in c.choices()]
        assert len(set(idx)) == 2


def test_a_downsampling_stem_is_searched_and_kept_in_the_derived_architecture() -> None:
    net = SuperNet(10, 3, [2, 2], [8, 16], stem_stride=4)
    x = torch.randn(2, 3, 64, 64)
    assert net(x).shape == (2, 10)
    arch = net.derive()
    assert arch["stem_stride"] == 4
    student = build_model("cifar_resnet", num_classes=10, in_channels=3, **arch).eval()
    assert student(x).shape == (2, 10) and isinstance(student.stem[-1], torch.nn.MaxPool2d)
    assert "stem_stride" not in SuperNet(10, 3, [2, 2], [8, 16]).derive()  # CIFAR's stem: arch.json as before
