"""Weights from outside the pipeline: every accepted file form, the head and first-conv rule, the
torchvision weights names read offline from the torch hub cache, the teacher stage starting from
them, and the DVC dependencies that re-run the stages when weights or user architectures change."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from models import build_model
from models.weights import (
    WeightsError,
    fit_state_dict,
    hub_cache_file,
    read_state_dict,
    torchvision_weights,
)
from pipeline.checkpoint import load_model, save_checkpoint
from pipeline.io import file_sha256
from pipeline.pretrained import load_entry_weights, weights_file
from tests.conftest import REPO, randomise_bn

TV = "torchvision:mobilenet_v3_small"  # the smallest torchvision classifier with ImageNet weights


def _tiny(num_classes: int = 3, in_channels: int = 1, seed: int = 0, arch: str = "resnet_tiny") -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomise_bn(build_model(arch, num_classes=num_classes, in_channels=in_channels), seed)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------
# Reading a weights file


def test_every_file_form_gives_the_state_dict(tmp_path: Path) -> None:
    sd = _tiny().state_dict()
    torch.save(sd, tmp_path / "plain.pt")
    torch.save({"model": sd, "optimizer": {"lr": 0.1}, "epoch": 3}, tmp_path / "reference.pth")  # torchvision scripts
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "ddp.pt")
    save_checkpoint(tmp_path / "ours.pt", "resnet_tiny", {"num_classes": 3, "in_channels": 1}, sd, {"x": 1})
    for name in ("plain.pt", "reference.pth", "ddp.pt", "ours.pt"):
        assert _same(read_state_dict(tmp_path / name), sd), name


def test_unreadable_files_are_refused_naming_the_file(tmp_path: Path) -> None:
    torch.save(_tiny(), tmp_path / "module.pt")  # a whole pickled module: loading it would run code
    with pytest.raises(WeightsError, match=r"module\.pt is a pickle that needs code to load.*model\.state_dict\(\)"):
        read_state_dict(tmp_path / "module.pt")
    torch.save({"epoch": 3, "note": "no tensors"}, tmp_path / "meta.pt")
    with pytest.raises(WeightsError, match=r"meta\.pt holds no state_dict .*found keys \['epoch', 'note'\]"):
        read_state_dict(tmp_path / "meta.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "module.pt").read_bytes()[:100])
    with pytest.raises(WeightsError, match=r"cannot read weights file .*cut\.pt"):
        read_state_dict(tmp_path / "cut.pt")
    with pytest.raises(WeightsError, match="does not exist"):
        read_state_dict(tmp_path / "none.pt")
    save_checkpoint(tmp_path / "slim.pt", "resnet_tiny", {"num_classes": 3, "in_channels": 1}, _tiny().state_dict(),
                    channel_manifest={"input_shape": [1, 8, 8], "kept": {}})
    with pytest.raises(WeightsError, match="is a slimmed checkpoint"):
        read_state_dict(tmp_path / "slim.pt")


# --------------------------------------------------------------------------------------------
# Fitting weights to the model built for this dataset


def test_head_of_other_classes_is_replaced_and_reported() -> None:
    src, dst = _tiny(num_classes=10, seed=1), _tiny(num_classes=3, seed=2)
    fresh = {k: v.clone() for k, v in dst.state_dict().items()}
    fit = fit_state_dict(dst, src.state_dict(), "src")
    assert fit.replaced == ["fc.weight", "fc.bias"] and fit.adapted == []
    for k, v in dst.state_dict().items():
        expected = fresh[k] if k.startswith("fc.") else src.state_dict()[k]
        assert torch.equal(v, expected), k
    # same classes: nothing replaced, an exact copy
    again = _tiny(num_classes=10, seed=3)
    assert fit_state_dict(again, src.state_dict(), "src").replaced == []
    assert _same(again.state_dict(), src.state_dict())


def test_rgb_weights_on_grey_images_sum_the_first_conv() -> None:
    rgb, grey = _tiny(in_channels=3, seed=1), _tiny(in_channels=1, seed=2)
    fit = fit_state_dict(grey, rgb.state_dict(), "rgb")
    assert fit.adapted == ["stem.0.weight"] and fit.replaced == []
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # exact for a grey image repeated on the three channels
        torch.testing.assert_close(grey.eval()(x), rgb.eval()(x.repeat(1, 3, 1, 1)), rtol=1e-5, atol=1e-5)


def test_weights_of_another_architecture_name_the_first_mismatched_keys() -> None:
    other = _tiny(arch="mobilenetv2_tiny").state_dict()
    with pytest.raises(WeightsError) as err:
        fit_state_dict(_tiny(), other, "b.pt")
    msg = str(err.value)
    assert re.search(r"b\.pt does not fit the model: missing in the weights \(\d+\): stem\.0\.weight, ", msg)
    assert re.search(r"unexpected in the weights \(\d+\): features\.0\.0\.weight, ", msg)
    # same architecture, other widths: shapes named with both sides
    torch.manual_seed(0)
    wide = build_model("resnet20", num_classes=3, in_channels=1, width_mult=0.5).state_dict()
    with pytest.raises(WeightsError, match=r"shape differs \(weights vs model\) \(\d+\): stem\.0\.weight "
                                           r"\(8, 1, 3, 3\) vs \(4, 1, 3, 3\)"):
        fit_state_dict(build_model("resnet20", num_classes=3, in_channels=1, width_mult=0.25), wide, "wide.pt")


# --------------------------------------------------------------------------------------------
# Torchvision weights names, offline through the torch hub cache


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache of this test's own (TORCH_HOME)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_torchvision_name_is_read_from_the_hub_cache(hub: Path, tmp_path: Path) -> None:
    weights = torchvision_weights(TV, "IMAGENET1K_V1")
    assert torchvision_weights(TV, "MobileNet_V3_Small_Weights.IMAGENET1K_V1") is weights
    assert torchvision_weights(TV, "DEFAULT") is weights
    path = hub_cache_file(weights)
    assert path == hub / Path(weights.url).name  # where torch.hub.load_state_dict_from_url looks
    model = build_model(TV, num_classes=10, in_channels=3)
    with pytest.raises(WeightsError, match=f"not in the torch hub cache: expected {re.escape(str(path))}.*"
                                           f"{re.escape(weights.url)}"):
        load_entry_weights(model, TV, "IMAGENET1K_V1", tmp_path / "weights")

    torch.manual_seed(1)  # stand-in for the ImageNet file: a 1000-class model's state_dict, placed in the cache
    imagenet = build_model(TV, num_classes=1000, in_channels=3).state_dict()
    path.parent.mkdir(parents=True)
    torch.save(imagenet, path)
    loaded = load_entry_weights(model, TV, "IMAGENET1K_V1", tmp_path / "weights")
    assert loaded.replaced == ["classifier.3.weight", "classifier.3.bias"] and loaded.adapted == []
    assert loaded.sha256 == file_sha256(path) and loaded.file == str(path)
    assert loaded.report()["source"] == "IMAGENET1K_V1"
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in imagenet.items() if not k.startswith("classifier.3."))


# --------------------------------------------------------------------------------------------
# Weights files live in the weights folder (a DVC dependency)


def test_weights_file_must_lie_in_the_weights_folder(tmp_path: Path) -> None:
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "a.pt").write_bytes(b"x")
    assert weights_file(str(folder / "a.pt"), folder) == folder / "a.pt"
    (tmp_path / "b.pt").write_bytes(b"x")
    with pytest.raises(WeightsError, match=r"b\.pt is not inside .*weights/: put it there"):
        weights_file(str(tmp_path / "b.pt"), folder)
    with pytest.raises(WeightsError, match=r"weights/\.\./b\.pt is not inside"):
        weights_file(str(folder / ".." / "b.pt"), folder)
    with pytest.raises(WeightsError, match=r"c\.pt does not exist \(files in .*weights/: a\.pt\)"):
        weights_file(str(folder / "c.pt"), folder)


# --------------------------------------------------------------------------------------------
# The teacher stage starting from weights


def test_teacher_stage_fine_tunes_from_weights_or_uses_them_as_is(tmp_path: Path, digits_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    from tests.test_stages import TINY, run_teacher, write_params

    monkeypatch.chdir(tmp_path)  # the project root, as under DVC: weights/ is the stage's default folder
    base = TINY["teachers"]["a"]  # learns far above the chance guard (tests/test_stages.py)
    folder = Path("weights")
    folder.mkdir()
    params = write_params(tmp_path, teachers={
        "a": base,
        "asis": {"arch": base["arch"], "epochs": 0, "weights": "weights/a.pt"},
        "other_head": {**base, "epochs": 1, "weights": "weights/seven.pt"},
        "outside": {"arch": base["arch"], "epochs": 0, "weights": "t/a.pt"},
        "fresh_head_as_is": {"arch": base["arch"], "epochs": 0, "weights": "weights/seven.pt"},
    })

    def teacher(name: str) -> tuple[int, dict]:
        code = run_teacher(tmp_path, params, name, digits_dir)
        metrics = tmp_path / "m" / f"{name}.json"
        return code, json.loads(metrics.read_text()) if metrics.exists() else {}

    assert run_teacher(tmp_path, params, "a", digits_dir) == 0
    shutil.copy(tmp_path / "t" / "a.pt", folder / "a.pt")  # our own checkpoint as weights

    code, m = teacher("asis")  # epochs 0: evaluated as it is, checked above chance, saved
    trained = json.loads((tmp_path / "m" / "a.json").read_text())
    assert code == 0 and m["epochs"] == 0 and m["best_epoch"] == 0 and m["test_acc"] == trained["test_acc"]
    assert m["weights"] == {"source": "weights/a.pt", "file": "weights/a.pt", "sha256": file_sha256(folder / "a.pt"),
                            "replaced": [], "adapted": []}
    asis, ckpt = load_model(tmp_path / "t" / "asis.pt")
    assert _same(asis.state_dict(), load_model(tmp_path / "t" / "a.pt")[0].state_dict())
    assert ckpt["meta"]["weights"]["sha256"] == m["weights"]["sha256"]
    assert [r["epoch"] for r in csv_rows(tmp_path / "p" / "asis.csv")] == ["0"]

    # weights trained for 7 classes: the head is replaced (reported), the rest fine-tuned
    state = load_model(tmp_path / "t" / "a.pt")[0].state_dict()
    state["fc.weight"], state["fc.bias"] = torch.zeros(7, state["fc.weight"].shape[1]), torch.zeros(7)
    torch.save(state, folder / "seven.pt")
    code, m = teacher("other_head")
    assert code == 0 and m["weights"]["replaced"] == ["fc.weight", "fc.bias"] and m["epochs"] == 1

    code, m = teacher("outside")  # a file outside the weights folder: no DVC dependency covers it
    assert code == 2 and not m and not (tmp_path / "t" / "outside.pt").exists()
    assert "t/a.pt is not inside weights/" in caplog.text
    code, m = teacher("fresh_head_as_is")  # a fresh head cannot be used as it is
    assert code == 2 and not m and not (tmp_path / "t" / "fresh_head_as_is.pt").exists()
    assert "['fc.weight', 'fc.bias'] were replaced by a fresh initialisation" in caplog.text


def csv_rows(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open() as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------
# DVC: a change to weights or to user architectures re-runs the stages that use them


DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())


def _stages() -> list[tuple[str, dict]]:
    return [(n, st["do"] if "foreach" in st else st) for n, st in DVC["stages"].items()]


def _entry(stage: dict) -> Path:
    from tests.test_dvc_yaml import module_file

    module = re.search(r"-m (stages\.\w+)", stage["cmd"])
    assert module, stage["cmd"]
    return module_file(module.group(1))


@pytest.mark.parametrize(("name", "stage"), _stages(), ids=[n for n, _ in _stages()])
def test_stages_that_build_models_depend_on_user_models(name: str, stage: dict) -> None:
    # models.registry imports a `user_models.<file>:<callable>` architecture at run time, which the
    # import scan of tests/test_dvc_yaml.py cannot see
    from tests.test_dvc_yaml import imported_files

    files = [f for f in imported_files(_entry(stage)) if f.parts[-2] != "models"]
    builds = [f.relative_to(REPO).as_posix() for f in files if re.search(r"\b(build_model|load_model)\(",
                                                                            f.read_text())]
    if builds:
        assert "user_models" in stage["deps"], f"stage {name} builds models ({builds}) but lacks user_models"


@pytest.mark.parametrize(("name", "stage"), _stages(), ids=[n for n, _ in _stages()])
def test_stages_that_read_weights_depend_on_the_weights_folder(name: str, stage: dict) -> None:
    from tests.test_dvc_yaml import imported_files

    reads = REPO / "pipeline" / "pretrained.py" in imported_files(_entry(stage))
    passes = "--weights-dir ${weights_dir}" in stage["cmd"]
    assert reads == passes, f"stage {name}: reads weights {reads}, is given --weights-dir {passes}"
    if reads:
        assert "${weights_dir}" in stage["deps"], f"stage {name} reads weights but does not depend on the folder"


def test_the_weights_folder_exists_and_is_the_stage_default() -> None:
    from stages import train_teacher

    folder = next(v["weights_dir"] for v in DVC["vars"] if "weights_dir" in v)
    assert (REPO / folder).is_dir() and (REPO / folder / "README.md").is_file()  # DVC needs the dependency to exist
    assert (REPO / "user_models" / "__init__.py").is_file()
    # a stage run by hand (python -m stages.train_teacher) looks where dvc.yaml points it
    default = re.search(r'"--weights-dir",\s*default="([^"]+)"', Path(train_teacher.__file__).read_text())
    assert default and default.group(1) == folder
