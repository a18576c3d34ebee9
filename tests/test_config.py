"""Every bad params value is refused before any work, with the offending key named."""

from __future__ import annotations

import copy

import pytest
import yaml

from pipeline.config import (
    EnsembleConfig,
    PrepareConfig,
    ProfileConfig,
    SearchConfig,
    TargetConfig,
    TrainConfig,
    parse_section,
    parse_teachers,
)
from pipeline.errors import ConfigError
from tests.conftest import REPO

DEFAULT = yaml.safe_load((REPO / "params.yaml").read_text())


def test_default_params_are_valid() -> None:
    parse_section(DEFAULT, "prepare", PrepareConfig)
    parse_section(DEFAULT, "train", TrainConfig)
    parse_section(DEFAULT, "ensemble", EnsembleConfig)
    assert set(parse_teachers(DEFAULT)) == {"t0", "t1", "t2"}


def _with(path: str, value: object) -> dict:
    params = copy.deepcopy(DEFAULT)
    node = params
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    return params


def _parse_all(params: dict) -> None:
    parse_section(params, "search", SearchConfig)
    parse_section(params, "profile", ProfileConfig)
    parse_section(params, "target", TargetConfig)
    parse_section(params, "prepare", PrepareConfig)
    parse_section(params, "train", TrainConfig)
    parse_section(params, "ensemble", EnsembleConfig)
    parse_teachers(params)


@pytest.mark.parametrize(
    ("key", "value", "expect"),
    [
        ("prepare.source", "mnist", "prepare.source"),
        ("prepare.val_fraction", 0.7, "prepare.val_fraction"),
        ("prepare.val_fraction", "a lot", "prepare.val_fraction"),
        ("prepare.image_size", 2, "prepare.image_size"),
        ("prepare.channels", 2, "prepare.channels"),
        ("prepare.colour", "rgb", "prepare.colour: unknown key; allowed: source"),
        ("train.batch_size", 0, "train.batch_size"),
        ("train.device", "tpu", "train.device"),
        ("train.augment", "mixup", "train.augment"),
        ("train.label_smoothing", 1.5, "train.label_smoothing"),
        ("teachers.t0.epochs", -3, "teachers.t0.epochs"),
        ("teachers.t0.epochs", "ten", "teachers.t0.epochs"),
        ("teachers.t1.seed", -1, "teachers.t1.seed"),
        ("teachers.t0.arch", "resnet21", "unknown architecture 'resnet21'"),
        ("teachers.t2.optimizer.lr", -0.1, "teachers.t2.optimizer.lr"),
        ("teachers.t2.optimizer.schedule", "linear", "teachers.t2.optimizer.schedule"),
        ("teachers.t2.optimizer.momentun", 0.9, "teachers.t2.optimizer.momentun: unknown key"),
        ("teachers.t0.optimizer.warmup_epochs", 15, "warmup_epochs (15) must be < epochs"),
        ("ensemble.batch_size", -1, "ensemble.batch_size"),
        ("search.tau_min", 10.0, "tau_min (10.0) must be <= tau_max"),
        ("search.blocks", [3, 0, 3], "search.blocks.1"),
        ("profile.arch", "resnet21", "unknown architecture 'resnet21'"),
        ("target.backend", "openvino", "target.backend"),
    ],
)
def test_bad_value_names_its_key(key: str, value: object, expect: str) -> None:
    with pytest.raises(ConfigError) as err:
        _parse_all(_with(key, value))
    assert expect in str(err.value)


def test_all_bad_keys_are_reported_together() -> None:
    params = _with("train.batch_size", 0)
    params["train"]["eval_batch_size"] = 0
    with pytest.raises(ConfigError) as err:
        parse_section(params, "train", TrainConfig)
    assert "train.batch_size" in str(err.value) and "train.eval_batch_size" in str(err.value)


def test_missing_section_and_bad_teacher_names() -> None:
    with pytest.raises(ConfigError, match="no 'train' section"):
        parse_section({}, "train", TrainConfig)
    with pytest.raises(ConfigError, match="non-empty mapping"):
        parse_teachers({"teachers": [{"arch": "resnet20", "epochs": 1}]})
    with pytest.raises(ConfigError, match="name 'bad/name' is not allowed"):
        parse_teachers({"teachers": {"bad/name": {"arch": "resnet20", "epochs": 1}}})


def test_yaml_exponent_without_dot_is_accepted() -> None:
    # PyYAML reads 5e-4 as a string; the config still takes it as the number the user meant.
    cfg = parse_teachers({"teachers": {"a": {"arch": "resnet20", "epochs": 1, "optimizer": {"weight_decay": "5e-4"}}}})
    assert cfg["a"].optimizer.weight_decay == pytest.approx(5e-4)


def test_configs_are_frozen() -> None:
    cfg = parse_section(DEFAULT, "train", TrainConfig)
    with pytest.raises(ValueError):
        cfg.batch_size = 3  # type: ignore[misc]


def _teacher(**entry: object) -> dict:
    return parse_teachers({"teachers": {"a": {"arch": "resnet_tiny", "epochs": 2, **entry}}})["a"]


def test_teacher_weights_key() -> None:
    assert _teacher().weights is None
    cfg = _teacher(weights="weights/a.pt")
    assert cfg.weights == "weights/a.pt" and not cfg.weights_is_name
    # epochs: 0 = use the weights as they are; the optimizer (and its warmup) is then unused
    assert _teacher(weights="weights/a.pt", epochs=0, optimizer={"warmup_epochs": 1}).epochs == 0
    for name in ("IMAGENET1K_V1", "DEFAULT", "ResNet18_Weights.IMAGENET1K_V1"):
        assert _teacher(arch="torchvision:resnet18", weights=name).weights_is_name
    assert _teacher(arch="user_models.example:build", arch_config={"width": 4}).arch == "user_models.example:build"


@pytest.mark.parametrize(
    ("entry", "expect"),
    [
        ({"epochs": 0}, "epochs: 0 uses the weights as they are, so it needs weights"),
        ({"epochs": -1, "weights": "weights/a.pt"}, "teachers.a.epochs"),
        ({"weights": "IMAGENET1K_V1"}, "weights name 'IMAGENET1K_V1' needs a torchvision:<name> architecture"),
        ({"arch": "torchvision:resnet18", "weights": "IMAGENET1K_V9"},
         "has no weights 'IMAGENET1K_V9'; available: IMAGENET1K_V1, DEFAULT"),
        ({"arch": "torchvision:resnet18", "weights": "ResNet50_Weights.IMAGENET1K_V1"},
         "names ResNet50_Weights, but the weights of torchvision:resnet18 are ResNet18_Weights"),
        ({"weights": " weights/a.pt"}, "teachers.a.weights: must be a file path inside weights/"),
        ({"weights": ""}, "teachers.a.weights"),
        ({"wieghts": "weights/a.pt"}, "teachers.a.wieghts: unknown key; allowed: arch, arch_config, weights"),
        ({"arch": "user_models.example"}, "or your own as 'package.module:callable'"),
    ],
)
def test_bad_teacher_weights_name_their_key(entry: dict, expect: str) -> None:
    with pytest.raises(ConfigError) as err:
        _teacher(**entry)
    assert expect in str(err.value)
