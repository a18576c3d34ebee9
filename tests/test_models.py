"""Registry models build from (arch, arch_config), run forward/backward, and reject bad configs."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from models import build_model, is_known, list_models
from pipeline.errors import ConfigError

CASES = [
    ("resnet_tiny", {}, 1, 8),
    ("resnet20", {"width_mult": 0.25}, 3, 16),
    ("cifar_resnet", {"blocks": [2, 1], "stage_widths": [6, 10], "stem_width": 4,
                      "mid_widths": [[3, 5], [7]]}, 3, 8),
    ("mobilenetv2_tiny", {}, 1, 16),
    ("mobilenetv2", {"width_mult": 0.25}, 3, 32),
    ("torchvision:resnet18", {}, 1, 32),
    ("torchvision:mobilenet_v3_small", {}, 3, 32),
    ("user_models.example:build", {"width": 6}, 1, 8),
]


@pytest.mark.parametrize(("arch", "config", "channels", "size"), CASES)
def test_forward_backward(arch: str, config: dict, channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(arch, num_classes=7, in_channels=channels, **config)
    x = torch.randn(4, channels, size, size)
    out = model(x)
    assert out.shape == (4, 7) and torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_resnet_presets_have_the_published_depths() -> None:
    def convs(arch: str) -> int:
        m = build_model(arch, num_classes=10, in_channels=3)
        # stem + 2 per block + FC = depth (projection shortcuts are not counted in the depth)
        blocks = sum(len(s) for s in m.stages)
        return 1 + 2 * blocks + 1

    for depth in (20, 32, 56, 110):
        assert convs(f"resnet{depth}") == depth
    n = sum(p.numel() for p in build_model("resnet56", num_classes=10, in_channels=3).parameters())
    assert 0.85e6 < n < 0.9e6  # ResNet-56 on CIFAR-10 has ~0.85M parameters (plus 1x1 projections)


def test_cifar_resnet_explicit_widths_are_used() -> None:
    m = build_model("cifar_resnet", num_classes=3, in_channels=1, blocks=[1, 2], stage_widths=[8, 12],
                    mid_widths=[[5], [3, 9]])
    assert m.stages[0][0].conv1.out_channels == 5
    assert [b.conv1.out_channels for b in m.stages[1]] == [3, 9]
    assert m.fc.in_features == 12


def test_unknown_arch_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown architecture 'resnet21'.*resnet20"):
        build_model("resnet21", num_classes=10, in_channels=3)
    with pytest.raises(ConfigError, match="unknown architecture 'torchvision:nope'"):
        build_model("torchvision:nope", num_classes=10, in_channels=3)


def test_bad_arch_config_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['widht_mult'\]; allowed: .*width_mult"):
        build_model("resnet20", num_classes=10, in_channels=3, widht_mult=0.5)
    with pytest.raises(ConfigError, match="mid_widths"):
        build_model("cifar_resnet", num_classes=10, in_channels=3, blocks=[1], stage_widths=[4], mid_widths=[[1, 2]])
    with pytest.raises(ConfigError, match="stage_widths.*same non-zero length"):
        build_model("resnet20", num_classes=10, in_channels=3, stage_widths=[4, 4])
    assert "resnet_tiny" in list_models() and "mobilenetv2_tiny" in list_models()


@pytest.fixture
def user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A package of the user's own outside the project, importable for this test only."""
    pkg = tmp_path / "my_nets"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "broken.py").write_text("import not_an_installed_package_xyz  # noqa\n")
    (pkg / "nets.py").write_text(
        "import torch\n"
        "WIDTH = 8\n"
        "def not_a_module(num_classes, in_channels):\n    return {'fc': torch.zeros(num_classes)}\n"
        "def no_classes(in_channels):\n    return torch.nn.Identity()\n"
        "def ok(num_classes, in_channels, width=4):\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(in_channels, width, 3), torch.nn.AdaptiveAvgPool2d(1),\n"
        "                               torch.nn.Flatten(), torch.nn.Linear(width, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_nets"
    for name in [m for m in sys.modules if m == "my_nets" or m.startswith("my_nets.")]:
        del sys.modules[name]


def test_user_arch_is_known_by_form_and_built_with_its_config(user_package: str) -> None:
    assert is_known("user_models.example:build") and is_known("a.b.c:Net.small")
    assert not is_known("user_models.example") and not is_known("user_models.example:") and not is_known("a b:c")
    model = build_model(f"{user_package}.nets:ok", num_classes=5, in_channels=2, width=3)
    assert model(torch.zeros(2, 2, 8, 8)).shape == (2, 5)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['widht'\]; allowed: \['width'\]"):
        build_model(f"{user_package}.nets:ok", num_classes=5, in_channels=2, widht=3)
    with pytest.raises(ConfigError, match="unknown architecture 'user_models.example'.*package.module:callable"):
        build_model("user_models.example", num_classes=5, in_channels=2)


@pytest.mark.parametrize(("attr", "message"), [
    ("broken:build", "module 'my_nets.broken' does not import: ModuleNotFoundError: No module named "
                     "'not_an_installed_package_xyz'; fix that import"),
    ("missing:build", "module 'my_nets.missing' does not import: ModuleNotFoundError.*put your model in user_models/"),
    ("nets:nope", "module 'my_nets.nets' has no attribute 'nope'"),
    ("nets:WIDTH", "'WIDTH' is not callable \\(it is a int\\)"),
    ("nets:not_a_module", "returned a dict, not a torch nn.Module"),
    ("nets:no_classes", "must accept the keyword arguments num_classes and in_channels \\(lacks num_classes\\)"),
])
def test_user_arch_errors_name_the_problem(user_package: str, attr: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_model(f"{user_package}.{attr}", num_classes=3, in_channels=1)


def test_user_arch_in_the_project_must_live_in_user_models() -> None:
    # a project file outside user_models/ is no stage's DVC dependency: a change would re-run nothing
    with pytest.raises(ConfigError, match="stages/__init__.py is a project file outside user_models/"):
        build_model("stages.prune:main", num_classes=3, in_channels=1)


def test_the_stem_fits_the_input_size() -> None:
    from models.resnet_cifar import stem_stride_for

    assert [stem_stride_for(s) for s in (8, 32, 33, 64, 96, 224)] == [1, 1, 2, 2, 4, 4]
    x = torch.zeros(2, 3, 224, 224)
    seen = {}
    for stride in (1, 2, 4):
        net = build_model("cifar_resnet", num_classes=5, in_channels=3, blocks=[1, 1, 1], stage_widths=[8, 8, 8],
                          stem_stride=stride).eval()
        net.stages[0].register_forward_hook(lambda m, i, o, s=stride: seen.__setitem__(s, o.shape[-1]))
        assert net(x).shape == (2, 5)
    assert seen == {1: 224, 2: 112, 4: 56}  # the first stage's resolution
    with pytest.raises(ConfigError, match="arch_config for 'resnet20' is invalid: stem_stride must be one of"):
        build_model("resnet20", num_classes=5, in_channels=3, stem_stride=3)
