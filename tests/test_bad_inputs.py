"""Bad input, table-driven: every case runs a real entry point on a broken input and must give exit
code 2, a message that names the thing and what is allowed, and leave nothing valid-looking behind
(no output file that DVC could cache as if it were good).

One tiny pipeline (digits 8x8, two resnet_tiny teachers, a latency table, a pruned network, its
export and a bundle) is built once per session; each case copies what it needs and breaks it.
`python -m tests.test_bad_inputs` prints the cases as the Markdown table in docs/BAD_INPUTS.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import REPO, make_imagefolder


@dataclass(frozen=True)
class Case:
    id: str
    input: str  # what is broken, for the docs table
    message: str  # a fragment the message must contain
    run: Callable[[dict, Path], tuple[int, list[Path]]]  # -> (exit code, paths that must not exist)


# --------------------------------------------------------------------------------------------
# The tiny pipeline every case starts from


def _params(tmp: Path, **sections: dict) -> Path:
    from tests.test_stages import TINY

    params = json.loads(json.dumps(TINY))
    for k, v in sections.items():
        if k == "teachers":
            params[k] = v
        else:
            params.setdefault(k, {}).update(v)
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from stages import export, handoff, prune, slim
    from tests.test_stages import run_prepare, run_profile, run_teacher

    w = tmp_path_factory.mktemp("world")
    params = _params(w, prune={"epochs": 1, "progress": False, "band": [0.05, 1.0], "latency_budget": 1.0,
                               "budget_unit": "ms"},
                     compare={"methods": []}, engine={"timing_passes": 2, "timing_span_s": 0.0})
    assert run_prepare(w, params) == 0
    assert run_teacher(w, params, "a") == 0 and run_teacher(w, params, "b") == 0
    assert run_profile(w, params, w / "prep") == 0
    p = ["--params", str(params), "--data", str(w / "prep")]
    assert prune.main([*p, "--teachers", str(w / "t"), "--student", str(w / "t" / "a.pt"), "--table",
                       str(w / "prof" / "table.json"), "--out-dir", str(w / "pr"), "--metrics",
                       str(w / "m" / "prune.json"), "--plots-dir", str(w / "p" / "prune"),
                       "--resume-dir", str(w / "resume")]) == 0
    assert slim.main([*p, "--model", str(w / "pr" / "model.pt"), "--masks", str(w / "pr" / "masks.json"),
                      "--out", str(w / "s" / "model.pt"), "--metrics", str(w / "m" / "slim.json")]) == 0
    assert export.main([*p, "--model", str(w / "s" / "model.pt"), "--out", str(w / "x" / "model.onnx"),
                        "--metrics", str(w / "m" / "export.json")]) == 0
    from stages import engine

    assert engine.main([*p, "--onnx", str(w / "x" / "model.onnx"), "--pruned", str(w / "pr" / "masks.json"),
                        "--out-dir", str(w / "e"), "--metrics", str(w / "m" / "engine.json")]) == 0
    (w / "p" / "prune" / "widths.png").exists() or pytest.fail("prune wrote no widths.png")
    assert handoff.main([*p, "--teachers", str(w / "t"), "--student", str(w / "t" / "a.pt"), "--slim",
                         str(w / "s" / "model.pt"), "--onnx", str(w / "x" / "model.onnx"), "--engine-dir", str(w / "e"),
                         "--widths-png", str(w / "p" / "prune" / "widths.png"), "--latency-table",
                         str(w / "prof" / "table.json"), "--out-dir", str(w / "bundle")]) == 0
    return {"dir": w, "params": params}


def _copy(world: dict, tmp: Path, *names: str) -> None:
    for n in names:
        src = world["dir"] / n
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp / n)


# --------------------------------------------------------------------------------------------
# Entry points


def _teacher(params: Path, data: Path, tmp: Path, name: str = "a") -> tuple[int, list[Path]]:
    from stages import train_teacher

    out = tmp / "out" / f"{name}.pt"
    code = train_teacher.main(["--params", str(params), "--name", name, "--data", str(data), "--out", str(out),
                               "--metrics", str(tmp / "out" / "m.json"), "--plots", str(tmp / "out" / "h.csv"),
                               "--resume-dir", str(tmp / "resume")])
    return code, [out, tmp / "out" / "m.json", tmp / "out" / "h.csv"]


def _prepare(params: Path, tmp: Path) -> tuple[int, list[Path]]:
    from stages import prepare

    code = prepare.main(["--params", str(params), "--out", str(tmp / "prep_out"), "--metrics", str(tmp / "pm.json")])
    return code, [tmp / "prep_out", tmp / "pm.json"]


def _ensemble(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    from stages import ensemble

    code = ensemble.main(["--params", str(world["params"]), "--data", str(world["dir"] / "prep"), "--teachers",
                          str(tmp / "t"), "--metrics", str(tmp / "em.json"), "--plots-dir", str(tmp / "ep")])
    return code, [tmp / "em.json", tmp / "ep"]


def _prune(world: dict, tmp: Path, table: Path, params: Path | None = None) -> tuple[int, list[Path]]:
    from stages import prune

    w = world["dir"]
    code = prune.main(["--params", str(params or world["params"]), "--data", str(w / "prep"), "--teachers",
                       str(w / "t"), "--student", str(w / "t" / "a.pt"), "--table", str(table),
                       "--out-dir", str(tmp / "pr"), "--metrics", str(tmp / "prm.json"), "--plots-dir",
                       str(tmp / "pp"), "--resume-dir", str(tmp / "resume")])
    return code, [tmp / "pr", tmp / "prm.json"]


def _slim(world: dict, tmp: Path, masks: Path) -> tuple[int, list[Path]]:
    from stages import slim

    w = world["dir"]
    code = slim.main(["--params", str(world["params"]), "--data", str(w / "prep"), "--model", str(w / "pr" / "model.pt"),
                      "--masks", str(masks), "--out", str(tmp / "s" / "model.pt"), "--metrics", str(tmp / "sm.json")])
    return code, [tmp / "s" / "model.pt", tmp / "sm.json"]


def _predict(bundle: Path, tmp: Path, capsys: pytest.CaptureFixture[str] | None = None) -> tuple[int, list[Path]]:
    from PIL import Image

    from pipeline.predict import main as predict_main

    img = tmp / "img.png"
    if not img.exists():
        Image.new("L", (8, 8), 128).save(img)
    return predict_main(["--bundle", str(bundle), str(img)]), []


def _runner(*args: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "stages", *args], cwd=REPO, capture_output=True, text=True)
    return proc.returncode, proc.stderr


# --------------------------------------------------------------------------------------------
# The cases


def c_params_typo_late_section(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    return _teacher(_params(tmp, prune={"latency_budgt": 0.5}), world["dir"] / "prep", tmp)


def c_params_unknown_section(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    params = _params(tmp)
    data = yaml.safe_load(params.read_text())
    data["prunee"] = {"epochs": 3}
    params.write_text(yaml.safe_dump(data))
    return _teacher(params, world["dir"] / "prep", tmp)


def c_params_budget_zero(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    return _teacher(_params(tmp, prune={"latency_budget": 0}), world["dir"] / "prep", tmp)


def c_params_compress_unknown_teacher(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    return _teacher(_params(tmp, compress={"model": "artifacts/teachers/mine"}), world["dir"] / "prep", tmp)


def c_params_taylor_threshold(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    return _prune(world, tmp, world["dir"] / "prof" / "table.json",
                  _params(tmp, prune={"method": "taylor", "allocation": "threshold"}))


def c_params_blocks_only_without_depth(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    return _prune(world, tmp, world["dir"] / "prof" / "table.json",
                  _params(tmp, prune={"channels": False, "depth": False}))


def c_params_compare_twice(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    return _teacher(_params(tmp, compare={"methods": ["l1", "uniform", "l1"]}), world["dir"] / "prep", tmp)


def c_params_lr_nan(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    params = _params(tmp)
    data = yaml.safe_load(params.read_text())
    data["prune"]["optimizer"]["lr"] = float("nan")
    params.write_text(yaml.safe_dump(data))
    assert ".nan" in params.read_text()
    return _teacher(params, world["dir"] / "prep", tmp)


def c_params_not_yaml(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    (tmp / "params.yaml").write_text("prepare: [unclosed\n")
    return _teacher(tmp / "params.yaml", world["dir"] / "prep", tmp)


def c_params_missing(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    return _teacher(tmp / "nope.yaml", world["dir"] / "prep", tmp)


def c_params_bad_timing(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    return _teacher(_params(tmp, target={"timing": {"passes": 0}}), world["dir"] / "prep", tmp)


def _folder_params(tmp: Path, root: Path, **prepare: object) -> Path:
    return _params(tmp, prepare={"source": "imagefolder", "root": str(root), "image_size": 8, **prepare})


def c_data_root_missing(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    return _prepare(_folder_params(tmp, tmp / "missing"), tmp)


def c_data_empty_class(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    root = make_imagefolder(tmp / "ds", per_class=4)
    (root / "train" / "empty").mkdir()
    return _prepare(_folder_params(tmp, root), tmp)


def c_data_corrupt_image(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    root = make_imagefolder(tmp / "ds", per_class=4)
    (root / "train" / "cat" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return _prepare(_folder_params(tmp, root), tmp)


def c_data_mixed_sizes(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    from tests.conftest import write_image

    root = make_imagefolder(tmp / "ds", per_class=4, size=12)
    write_image(root / "train" / "cat" / "big.png", size=20, fmt="PNG")
    return _prepare(_folder_params(tmp, root, image_size=None), tmp)


def c_data_only_non_images(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    root = make_imagefolder(tmp / "ds", per_class=4)
    (root / "train" / "notes").mkdir()
    (root / "train" / "notes" / "readme.txt").write_text("not an image")
    return _prepare(_folder_params(tmp, root), tmp)


def c_data_archive_traversal(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    root = make_imagefolder(tmp / "ds", per_class=4)
    with tarfile.open(tmp / "ds.tar.gz", "w:gz") as tar:
        tar.add(root / "train", arcname="train")
        tar.add(root / "train" / "cat" / "000.jpg", arcname="../../train/evil/000.jpg")
    return _prepare(_folder_params(tmp, tmp / "ds.tar.gz"), tmp)


def c_data_archive_link(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    root = make_imagefolder(tmp / "ds", per_class=4)
    (root / "train" / "cat" / "link.jpg").symlink_to("/etc/passwd")
    with tarfile.open(tmp / "ds.tar", "w") as tar:
        tar.add(root / "train", arcname="train")
    return _prepare(_folder_params(tmp, tmp / "ds.tar"), tmp)


def c_data_archive_corrupt(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    (tmp / "ds.tar.gz").write_bytes(b"\x1f\x8b not really gzip")
    return _prepare(_folder_params(tmp, tmp / "ds.tar.gz"), tmp)


def c_data_classes_differ(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    root = make_imagefolder(tmp / "ds", per_class=4, splits=("train", "test"))
    (root / "test" / "eel").rename(root / "test" / "eels")  # a test folder spelt differently
    return _prepare(_folder_params(tmp, root), tmp)


def c_data_files_archive(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    root = make_imagefolder(tmp / "ds", per_class=4)
    with tarfile.open(tmp / "ds.tar", "w") as tar:
        tar.add(root / "train", arcname="train")
    return _prepare(_folder_params(tmp, tmp / "ds.tar", storage="files"), tmp)


def c_data_files_changed(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    root = make_imagefolder(tmp / "ds", per_class=8, size=12)
    params = _folder_params(tmp, root, storage="files")
    code, _ = _prepare(params, tmp)
    assert code == 0
    for f in (root / "train" / "dog").iterdir():  # the folder changes after prepare listed it
        f.unlink()
    return _teacher(params, tmp / "prep_out", tmp)


def c_params_rrc_in_memory(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    return _teacher(_params(tmp, train={"augment": "random_resized_crop"}), world["dir"] / "prep", tmp)


def c_data_one_class(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    root = make_imagefolder(tmp / "ds", classes=("cat",), per_class=8)
    return _prepare(_folder_params(tmp, root), tmp)


def c_data_class_too_small(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    root = make_imagefolder(tmp / "ds", per_class=8)
    for f in sorted((root / "train" / "eel").iterdir())[2:]:
        f.unlink()
    return _prepare(_folder_params(tmp, root), tmp)


def c_data_constant_images(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    from PIL import Image

    for c in ("a", "b"):
        (tmp / "ds" / "train" / c).mkdir(parents=True)
        for i in range(10):
            Image.new("L", (8, 8), 200).save(tmp / "ds" / "train" / c / f"{i}.png")
    return _prepare(_folder_params(tmp, tmp / "ds", channels=1), tmp)


def c_data_not_an_image(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    root = make_imagefolder(tmp / "ds", per_class=8)
    (root / "train" / "cat" / "notes.png").write_text("a text file named .png")
    return _prepare(_folder_params(tmp, root), tmp)


def c_data_truncated_png(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    from tests.conftest import write_image

    root = make_imagefolder(tmp / "ds", per_class=8)
    write_image(root / "train" / "cat" / "cut.png", size=32, fmt="PNG")
    data = (root / "train" / "cat" / "cut.png").read_bytes()
    (root / "train" / "cat" / "cut.png").write_bytes(data[: len(data) // 2])
    return _prepare(_folder_params(tmp, root), tmp)


def c_data_too_large(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    from tests.test_images import png_header

    root = make_imagefolder(tmp / "ds", per_class=8)
    (root / "train" / "cat" / "huge.png").write_bytes(png_header(20000, 20000))
    return _prepare(_folder_params(tmp, root), tmp)


def c_data_apple_double_only(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    root = make_imagefolder(tmp / "ds", per_class=8)
    (root / "train" / "fox").mkdir()
    for i in range(3):  # what copying from a Mac leaves beside (here: instead of) the images
        (root / "train" / "fox" / f"._{i:03d}.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    return _prepare(_folder_params(tmp, root), tmp)


def c_prepared_data_missing(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    return _teacher(world["params"], tmp / "no_prep", tmp)


def c_ckpt_truncated(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    _copy(world, tmp, "t")
    data = (tmp / "t" / "a.pt").read_bytes()
    (tmp / "t" / "a.pt").write_bytes(data[: len(data) // 2])
    return _ensemble(world, tmp)


def c_ckpt_other_arch(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    _copy(world, tmp, "t")
    ckpt = torch.load(tmp / "t" / "a.pt", weights_only=True)
    ckpt["arch"] = "mobilenetv2_tiny"  # resnet weights under another architecture's name
    ckpt["arch_config"] = {k: v for k, v in ckpt["arch_config"].items() if k in ("num_classes", "in_channels")}
    torch.save(ckpt, tmp / "t" / "a.pt")
    return _ensemble(world, tmp)


def c_ckpt_pickled_module(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    from models import build_model

    _copy(world, tmp, "t")
    torch.save(build_model("resnet_tiny", num_classes=10, in_channels=1), tmp / "t" / "a.pt")  # a whole module
    return _ensemble(world, tmp)


def c_ckpt_not_ours(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    _copy(world, tmp, "t")
    torch.save({"weights": torch.zeros(3)}, tmp / "t" / "a.pt")
    return _ensemble(world, tmp)


def c_table_other_target(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    table = json.loads((world["dir"] / "prof" / "table.json").read_text())
    table["fingerprint"]["threads"] = 8
    (tmp / "table.json").write_text(json.dumps(table))
    return _prune(world, tmp, tmp / "table.json")


def c_table_hand_edited_json(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    (tmp / "table.json").write_text((world["dir"] / "prof" / "table.json").read_text()[:-40])
    return _prune(world, tmp, tmp / "table.json")


def c_table_hand_edited_keys(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    table = json.loads((world["dir"] / "prof" / "table.json").read_text())
    del table["calibration"]
    (tmp / "table.json").write_text(json.dumps(table))
    return _prune(world, tmp, tmp / "table.json")


def c_table_other_network(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    table = json.loads((world["dir"] / "prof" / "table.json").read_text())
    table["model"]["arch_config"] = {**table["model"]["arch_config"], "blocks": [9, 9]}
    (tmp / "table.json").write_text(json.dumps(table))
    return _prune(world, tmp, tmp / "table.json")


def c_table_without_blocks(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    table = json.loads((world["dir"] / "prof" / "table.json").read_text())
    assert table["blocks"], "the tiny student must have a removable block for this case"
    del table["blocks"]  # a table written before depth pruning
    (tmp / "table.json").write_text(json.dumps(table))
    return _prune(world, tmp, tmp / "table.json")


def _masks(world: dict, tmp: Path, edit: Callable[[dict], None]) -> Path:
    masks = json.loads((world["dir"] / "pr" / "masks.json").read_text())
    edit(masks)
    (tmp / "masks.json").write_text(json.dumps(masks))
    return tmp / "masks.json"


def c_masks_unknown_group(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    return _slim(world, tmp, _masks(world, tmp, lambda m: m["kept"].update({"nope.conv": [0]})))


def c_masks_empty_group(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    return _slim(world, tmp, _masks(world, tmp, lambda m: m["kept"].update({next(iter(m["kept"])): []})))


def c_masks_bad_block(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    # stages.1.0 has a projection shortcut (stride 2): it cannot be removed
    return _slim(world, tmp, _masks(world, tmp, lambda m: m["kept"].update({"block:stages.1.0": []})))


def c_engine_torch_int8(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    from stages import engine

    w = world["dir"]
    params = _params(tmp, engine={"backend": "torch", "precision": "int8", "timing_passes": 2, "timing_span_s": 0.0})
    code = engine.main(["--params", str(params), "--data", str(w / "prep"), "--onnx", str(w / "x" / "model.onnx"),
                        "--pruned", str(w / "pr" / "masks.json"), "--model", str(w / "s" / "model.pt"),
                        "--out-dir", str(tmp / "e"), "--metrics", str(tmp / "em.json")])
    return code, [tmp / "e", tmp / "em.json"]


def _engine_int8(world: dict, tmp: Path, **engine_cfg: object) -> tuple[int, list[Path]]:
    from stages import engine

    w = world["dir"]
    params = _params(tmp, engine={"backend": "onnxruntime", "precision": "int8", "timing_passes": 2,
                                  "timing_span_s": 0.0, **engine_cfg})
    code = engine.main(["--params", str(params), "--data", str(w / "prep"), "--onnx", str(w / "x" / "model.onnx"),
                        "--pruned", str(w / "pr" / "masks.json"), "--out-dir", str(tmp / "e"),
                        "--metrics", str(tmp / "em.json")])
    return code, [tmp / "e", tmp / "em.json"]


def c_engine_int8_no_calibration(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    return _engine_int8(world, tmp, calibration_images=0)


def c_engine_int8_calibration_too_many(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    return _engine_int8(world, tmp, calibration_images=99999)


def c_engine_int8_over_accuracy_bound(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    # a quantized model that lost its accuracy: the int8 session's logits rolled by one class
    from unittest import mock

    import stages.engine as se

    real = se.ort_logits

    def rolled(sess, x):  # noqa: ANN001, ANN202
        out = real(sess, x)
        return out.roll(1, dims=1) if "int8" in str(getattr(sess, "_model_path", "")) else out

    with mock.patch.object(se, "ort_logits", rolled):
        code, paths = _engine_int8(world, tmp, calibration_images=64)
    return code, paths[:1]  # engine.json beside the failure says what was measured; the engine dir is not left


def c_engine_auto_empty_val(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    # a prepared dataset whose validation split is empty: auto has no accuracy to choose by
    prep = tmp / "prep"
    shutil.copytree(world["dir"] / "prep", prep)
    with np.load(prep / "val.npz") as f:
        np.savez(prep / "val.npz", x=f["x"][:0], y=f["y"][:0])
    from stages import engine

    params = _params(tmp, engine={"backend": "onnxruntime", "precision": "auto", "timing_passes": 2,
                                  "timing_span_s": 0.0, "calibration_images": 32})
    code = engine.main(["--params", str(params), "--data", str(prep), "--onnx", str(world["dir"] / "x" / "model.onnx"),
                        "--pruned", str(world["dir"] / "pr" / "masks.json"), "--out-dir", str(tmp / "e"),
                        "--metrics", str(tmp / "em.json")])
    return code, [tmp / "e", tmp / "em.json"]


def _precision(world: dict, tmp: Path, params: Path, prep: Path | None = None) -> tuple[int, list[Path]]:
    from stages import precision

    code = precision.main(["--params", str(params), "--data", str(prep or world["dir"] / "prep"), "--student",
                           str(world["dir"] / "t" / "a.pt"), "--out", str(tmp / "pc" / "precision.json"),
                           "--metrics", str(tmp / "pc.json")])
    return code, [tmp / "pc" / "precision.json", tmp / "pc.json"]


def c_params_auto_precision_torch(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    return _precision(world, tmp, _params(tmp, target={"backend": "torch", "precision": "auto"},
                                          engine={"precision": "auto"}))


def c_params_auto_precision_engine_fp32(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    return _precision(world, tmp, _params(tmp, target={"precision": "auto"}, engine={"precision": "fp32"}))


def c_precision_auto_empty_val(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    prep = tmp / "prep"
    shutil.copytree(world["dir"] / "prep", prep)
    with np.load(prep / "val.npz") as f:
        np.savez(prep / "val.npz", x=f["x"][:0], y=f["y"][:0])
    return _precision(world, tmp, _params(tmp, target={"precision": "auto"}, engine={"precision": "auto"}), prep)


def c_precision_stale_choice(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    # the precision stage chose for auto; the params now say fp32 (the choice is another run's)
    from stages import profile

    (tmp / "precision.json").write_text(json.dumps({"requested": "auto", "precision": "int8"}))
    code = profile.main(["--params", str(_params(tmp)), "--data", str(world["dir"] / "prep"), "--arch",
                         str(tmp / "none.json"), "--precision", str(tmp / "precision.json"),
                         "--out", str(tmp / "prof" / "table.json"), "--metrics", str(tmp / "pm.json"),
                         "--plots-dir", str(tmp / "pp")])
    return code, [tmp / "prof" / "table.json", tmp / "pm.json"]


def c_precision_other_target(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    # an auto choice measured with 1 thread; the params now deploy on 2
    from stages import profile

    measured = {"backend": "onnxruntime", "device": "cpu", "batch_size": 1, "threads": 1, "int8_activations": "uint8"}
    (tmp / "precision.json").write_text(json.dumps({"requested": "auto", "precision": "int8", "target": measured,
                                                    "model_sha256": "0"}))
    params = _params(tmp, target={"precision": "auto", "threads": 2}, engine={"precision": "auto"})
    code = profile.main(["--params", str(params), "--data", str(world["dir"] / "prep"), "--arch",
                         str(tmp / "none.json"), "--precision", str(tmp / "precision.json"),
                         "--out", str(tmp / "prof" / "table.json"), "--metrics", str(tmp / "pm.json"),
                         "--plots-dir", str(tmp / "pp")])
    return code, [tmp / "prof" / "table.json", tmp / "pm.json"]


def c_precision_unrecorded(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    # an auto choice that says neither what target settings nor what model it was measured on
    from stages import profile

    (tmp / "precision.json").write_text(json.dumps({"requested": "auto", "precision": "int8"}))
    params = _params(tmp, target={"precision": "auto"}, engine={"precision": "auto"})
    code = profile.main(["--params", str(params), "--data", str(world["dir"] / "prep"), "--arch",
                         str(tmp / "none.json"), "--precision", str(tmp / "precision.json"),
                         "--out", str(tmp / "prof" / "table.json"), "--metrics", str(tmp / "pm.json"),
                         "--plots-dir", str(tmp / "pp")])
    return code, [tmp / "prof" / "table.json", tmp / "pm.json"]


def c_masks_not_json(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    (tmp / "masks.json").write_text("{not json")
    return _slim(world, tmp, tmp / "masks.json")


def _bundle(world: dict, tmp: Path) -> Path:
    shutil.copytree(world["dir"] / "bundle", tmp / "bundle")
    return tmp / "bundle"


def _manifest(b: Path, edit: Callable[[dict], None]) -> None:
    m = json.loads((b / "manifest.json").read_text())
    edit(m)
    (b / "manifest.json").write_text(json.dumps(m))


def c_bundle_missing_file(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    b = _bundle(world, tmp)
    (b / "model.onnx").unlink()
    return _predict(b, tmp)


def c_bundle_altered_file(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    b = _bundle(world, tmp)
    data = bytearray((b / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / "model.onnx").write_bytes(bytes(data))
    return _predict(b, tmp)


def c_bundle_reversed_classes(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    b = _bundle(world, tmp)
    _manifest(b, lambda m: m.update(classes=m["classes"][::-1]))
    return _predict(b, tmp)


def c_bundle_short_classes(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    b = _bundle(world, tmp)
    _manifest(b, lambda m: m.update(classes=m["classes"][:-1]))
    return _predict(b, tmp)


def c_bundle_swapped_model(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    from models import build_model
    from pipeline.deploy import sha256
    from pipeline.runtimes import export_onnx

    b = _bundle(world, tmp)
    export_onnx(build_model("resnet_tiny", num_classes=10, in_channels=1).eval(), (1, 8, 8), b / "model.onnx")
    _manifest(b, lambda m: m["files"].update({"model.onnx": sha256(b / "model.onnx")}))  # hashes rewritten
    return _predict(b, tmp)


def c_bundle_unreadable_image(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    (tmp / "img.png").write_bytes(b"not a png")
    return _predict(world["dir"] / "bundle", tmp)


def c_predict_too_large(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    from tests.test_images import png_header

    (tmp / "img.png").write_bytes(png_header(20000, 20000))
    return _predict(world["dir"] / "bundle", tmp)


def c_predict_apple_double(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    from pipeline.predict import main as predict_main

    (tmp / "._img.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    return predict_main(["--bundle", str(world["dir"] / "bundle"), str(tmp / "._img.png")]), []


def _manifest_text(world: dict, tmp: Path, text: str) -> tuple[int, list[Path]]:
    b = _bundle(world, tmp)
    (b / "manifest.json").write_text(text)
    return _predict(b, tmp)


def c_manifest_null(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    return _manifest_text(world, tmp, "null")


def c_manifest_number(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    return _manifest_text(world, tmp, "42")


def c_manifest_preprocessing_null(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    b = _bundle(world, tmp)
    _manifest(b, lambda m: m.update(preprocessing=None))
    return _predict(b, tmp)


def c_manifest_scalar_mean(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    b = _bundle(world, tmp)
    _manifest(b, lambda m: m["preprocessing"].update(mean=0.5))
    return _predict(b, tmp)


def c_runner_unknown_stage(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    code, err = _runner("--params", str(world["params"]), "--workdir", str(tmp / "w"), "--from", "nope")
    print(err, file=sys.stderr)
    return code, [tmp / "w" / "metrics"]


def c_runner_from_after_until(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    code, err = _runner("--params", str(world["params"]), "--workdir", str(tmp / "w"), "--from", "prune",
                        "--until", "prepare")
    print(err, file=sys.stderr)
    return code, [tmp / "w" / "metrics"]


def _weights_teacher(world: dict, tmp: Path, entry: dict) -> tuple[int, list[Path]]:
    """Teacher `a` of the tiny pipeline as ``entry`` (weights / arch keys), run from ``tmp`` (the
    test's working directory) so that weights/ is the stage's default weights folder."""
    return _teacher(_params(tmp, teachers={"a": {"seed": 0, "epochs": 1, **entry}}), world["dir"] / "prep", tmp)


def c_weights_other_arch(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    (tmp / "weights").mkdir()
    shutil.copy2(world["dir"] / "t" / "b.pt", tmp / "weights" / "b.pt")  # teacher b: a mobilenetv2_tiny
    return _weights_teacher(world, tmp, {"arch": "resnet_tiny", "weights": "weights/b.pt"})


def c_weights_pickled_module(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    from models import build_model

    (tmp / "weights").mkdir()
    torch.save(build_model("resnet_tiny", num_classes=10, in_channels=1), tmp / "weights" / "model.pt")  # whole module
    return _weights_teacher(world, tmp, {"arch": "resnet_tiny", "weights": "weights/model.pt"})


def c_weights_name_not_cached(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    before = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(tmp / "torch")  # an empty hub cache, as on a fresh offline machine
    try:
        return _weights_teacher(world, tmp, {"arch": "torchvision:mobilenet_v3_small", "weights": "IMAGENET1K_V1"})
    finally:
        if before is None:
            del os.environ["TORCH_HOME"]
        else:
            os.environ["TORCH_HOME"] = before


@contextmanager
def _user_module(tmp: Path, package: str, source: str) -> Iterator[str]:
    """``<package>.net``: a module of the user's own in ``tmp``, importable while the case runs."""
    (tmp / package).mkdir()
    (tmp / package / "__init__.py").write_text("")
    (tmp / package / "net.py").write_text(source)
    sys.path.insert(0, str(tmp))
    try:
        yield f"{package}.net"
    finally:
        sys.path.remove(str(tmp))
        for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
            del sys.modules[name]


def c_arch_does_not_import(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    with _user_module(tmp, "nets_import", "import not_an_installed_package\n") as module:
        return _weights_teacher(world, tmp, {"arch": f"{module}:build"})


def c_arch_not_callable(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    with _user_module(tmp, "nets_callable", "WIDTH = 16\n") as module:
        return _weights_teacher(world, tmp, {"arch": f"{module}:WIDTH"})


def c_arch_not_a_module(world: dict, tmp: Path) -> tuple[int, list[Path]]:
    source = "def build(num_classes, in_channels):\n    return [num_classes, in_channels]\n"
    with _user_module(tmp, "nets_module", source) as module:
        return _weights_teacher(world, tmp, {"arch": f"{module}:build"})


CASES = [
    Case("params-typo-late-section", "a typo in `prune` (`latency_budgt`), run by the first training stage",
         "prune.latency_budgt: unknown key; allowed: latency_budget", c_params_typo_late_section),
    Case("params-unknown-section", "an unknown section `prunee:`", "prunee: unknown section; allowed:",
         c_params_unknown_section),
    Case("params-budget-zero", "`prune.latency_budget: 0`", "prune.latency_budget", c_params_budget_zero),
    Case("params-compress-unknown-teacher", "`compress.model: artifacts/teachers/mine` with no teacher `mine`",
         "compress.model: names teacher 'mine', which is not an entry of `teachers`", c_params_compress_unknown_teacher),
    Case("params-taylor-threshold", "`prune.method: taylor` with `prune.allocation: threshold`",
         "set allocation: knapsack", c_params_taylor_threshold),
    Case("params-blocks-only-without-depth", "`prune.channels: false` with `prune.depth: false` (nothing to prune)",
         "channels: false removes whole blocks only, which needs depth: true", c_params_blocks_only_without_depth),
    Case("params-compare-twice", "`compare.methods: [l1, uniform, l1]`",
         "compare.methods: lists l1 more than once; list each method at most once", c_params_compare_twice),
    Case("params-lr-nan", "`prune.optimizer.lr: .nan`", "prune.optimizer.lr", c_params_lr_nan),
    Case("params-not-yaml", "params.yaml that is not YAML", "is not valid YAML", c_params_not_yaml),
    Case("params-missing", "a params file that does not exist", "nope.yaml does not exist", c_params_missing),
    Case("params-timing", "`target.timing.passes: 0`", "target.timing.passes", c_params_bad_timing),
    Case("data-root-missing", "`prepare.root` that does not exist", "does not exist; expected a directory or .tar",
         c_data_root_missing),
    Case("data-empty-class", "an empty class folder", "empty class folder(s)", c_data_empty_class),
    Case("data-corrupt-image", "a truncated JPEG", "unreadable image(s)", c_data_corrupt_image),
    Case("data-mixed-sizes", "images of two sizes with `image_size: null`", "have different sizes",
         c_data_mixed_sizes),
    Case("data-non-images", "a class folder with only a .txt file", "empty class folder(s)", c_data_only_non_images),
    Case("data-archive-traversal", "a .tar.gz entry `../../train/evil/000.jpg`", "leaves its folder or links elsewhere",
         c_data_archive_traversal),
    Case("data-archive-link", "a .tar with a symlink to /etc/passwd", "leaves its folder or links elsewhere",
         c_data_archive_link),
    Case("data-archive-corrupt", "a .tar.gz that is not gzip", "cannot read archive", c_data_archive_corrupt),
    Case("data-classes-differ", "an image folder whose test/ classes differ from train/ (`eel` against `eels`)",
         "only in train: ['eel']; only in test: ['eels']", c_data_classes_differ),
    Case("data-files-archive", "`prepare.storage: files` with a .tar as `prepare.root`",
         "prepare.storage: files reads images from a directory", c_data_files_archive),
    Case("data-files-changed", "`prepare.storage: files`, then a class's images deleted before training",
         "changed since the prepare stage", c_data_files_changed),
    Case("params-rrc-in-memory", "`train.augment: random_resized_crop` with images in memory",
         "random_resized_crop crops the full-size images on disk", c_params_rrc_in_memory),
    Case("data-one-class", "an image folder with one class", "a classifier needs at least two", c_data_one_class),
    Case("data-class-too-small", "a class with 2 images (train, val and test need one each)",
         "have fewer than 3 images: each class needs at least 3", c_data_class_too_small),
    Case("data-constant-images", "every image the same constant grey", "(std 0): nothing to learn there",
         c_data_constant_images),
    Case("data-not-an-image", "a text file named `notes.png`", "notes.png: not an image:", c_data_not_an_image),
    Case("data-truncated-png", "a PNG cut in half", "cut.png: truncated:", c_data_truncated_png),
    Case("data-too-large", "a 20000 x 20000 PNG (over Pillow's 89,478,485-pixel limit)",
         "raise prepare.max_image_pixels", c_data_too_large),
    Case("data-apple-double-only", "a class folder holding only AppleDouble `._*.jpg` files (hidden files are "
         "skipped)", "skipped there: 3 hidden file(s)", c_data_apple_double_only),
    Case("data-prepared-missing", "a training stage without prepared data", "run the prepare stage first",
         c_prepared_data_missing),
    Case("ckpt-truncated", "a teacher checkpoint cut in half", "cannot read checkpoint", c_ckpt_truncated),
    Case("ckpt-other-arch", "a resnet's weights labelled as mobilenetv2_tiny", "weights do not match",
         c_ckpt_other_arch),
    Case("ckpt-pickled-module", "a pickled nn.Module instead of weights", "cannot read checkpoint",
         c_ckpt_pickled_module),
    Case("ckpt-not-ours", "a .pt that is not a slimdeploy checkpoint", "is not a slimdeploy checkpoint",
         c_ckpt_not_ours),
    Case("table-other-target", "a latency table measured with 8 threads", "different target fingerprint",
         c_table_other_target),
    Case("table-edited-json", "a latency table cut short by hand", "not a latency table written by the profile stage",
         c_table_hand_edited_json),
    Case("table-edited-keys", "a latency table without its calibration", "not a latency table written by the profile",
         c_table_hand_edited_keys),
    Case("table-other-network", "a latency table of another network", "not the student", c_table_other_network),
    Case("masks-unknown-group", "masks.json naming a group the network lacks", "unknown channel group",
         c_masks_unknown_group),
    Case("masks-empty-group", "masks.json emptying a group", "removes all", c_masks_empty_group),
    Case("masks-bad-block", "masks.json removing a block with a projection shortcut", "removable blocks:",
         c_masks_bad_block),
    Case("table-without-blocks", "`prune.depth: true` with a latency table from before depth pruning",
         "prices no removal of the blocks", c_table_without_blocks),
    Case("engine-torch-int8", "`engine.backend: torch` with `engine.precision: int8`",
         "the torch engine runs fp16, bf16 or fp32", c_engine_torch_int8),
    Case("engine-int8-no-calibration", "`engine.calibration_images: 0` with `engine.precision: int8`",
         "engine.calibration_images", c_engine_int8_no_calibration),
    Case("engine-int8-calibration-too-many", "`engine.calibration_images` above the training split's count",
         "calibration needs between 1 and the training split's", c_engine_int8_calibration_too_many),
    Case("engine-int8-over-accuracy-bound", "an int8 engine whose accuracy drops more than `engine.max_accuracy_drop`",
         "over engine.max_accuracy_drop", c_engine_int8_over_accuracy_bound),
    Case("masks-not-json", "masks.json that is not JSON", "is not valid JSON", c_masks_not_json),
    Case("bundle-missing-file", "a bundle without model.onnx", "listed in manifest.json is missing",
         c_bundle_missing_file),
    Case("bundle-altered-file", "a bundle whose model.onnx changed by one byte", "does not match its sha256",
         c_bundle_altered_file),
    Case("bundle-reversed-classes", "manifest.json with the class list reversed", "the same names in another order",
         c_bundle_reversed_classes),
    Case("bundle-short-classes", "manifest.json with one class missing", "classes in the manifest",
         c_bundle_short_classes),
    Case("bundle-swapped-model", "another ONNX model swapped in, its sha256 rewritten", "carries no 'slimdeploy' metadata",
         c_bundle_swapped_model),
    Case("predict-unreadable-image", "an image file that is not an image", "cannot read image",
         c_bundle_unreadable_image),
    Case("predict-too-large", "a 20000 x 20000 PNG to `pipeline.predict`", "raise --max-image-pixels",
         c_predict_too_large),
    Case("predict-apple-double", "an AppleDouble `._img.png` to `pipeline.predict`",
         "AppleDouble metadata that macOS writes", c_predict_apple_double),
    Case("manifest-null", "manifest.json that is `null`", "manifest.json must be a JSON object", c_manifest_null),
    Case("manifest-number", "manifest.json that is `42`", "manifest.json must be a JSON object", c_manifest_number),
    Case("manifest-preprocessing-null", "manifest.json with `preprocessing: null`",
         "manifest.json preprocessing: Input should be a valid dictionary", c_manifest_preprocessing_null),
    Case("manifest-scalar-mean", "manifest.json with `preprocessing.mean: 0.5`",
         "manifest.json preprocessing.mean: Input should be a valid list", c_manifest_scalar_mean),
    Case("runner-unknown-stage", "`python -m stages --from nope`", "no stage 'nope'", c_runner_unknown_stage),
    Case("runner-from-after-until", "`python -m stages --from prune --until prepare`", "comes after",
         c_runner_from_after_until),
    Case("weights-other-arch", "`weights:` a mobilenetv2_tiny checkpoint for a resnet_tiny teacher",
         "does not fit the model: missing in the weights", c_weights_other_arch),
    Case("weights-pickled-module", "`weights:` a whole pickled nn.Module (`torch.save(model)`)",
         "is a pickle that needs code to load", c_weights_pickled_module),
    Case("weights-name-not-cached", "`weights: IMAGENET1K_V1` with an empty torch hub cache, offline",
         "are not in the torch hub cache: expected", c_weights_name_not_cached),
    Case("arch-does-not-import", "`arch: <module>:build` whose module imports a package that is not installed",
         "does not import: ModuleNotFoundError", c_arch_does_not_import),
    Case("arch-not-callable", "`arch: <module>:WIDTH`, an int", "is not callable", c_arch_not_callable),
    Case("arch-not-a-module", "`arch: <module>:build` returning a list", "not a torch nn.Module",
         c_arch_not_a_module),
    Case("engine-auto-empty-val", "`engine.precision: auto` on prepared data whose validation split is empty",
         "by their accuracy on the validation split, which is empty", c_engine_auto_empty_val),
    Case("params-auto-precision-torch", "`target.precision: auto` with `target.backend: torch`",
         "target.precision: auto chooses on backend onnxruntime on device cpu", c_params_auto_precision_torch),
    Case("params-auto-precision-engine-fp32", "`target.precision: auto` with `engine.precision: fp32`",
         "but target.precision is auto", c_params_auto_precision_engine_fp32),
    Case("precision-auto-empty-val", "`target.precision: auto` on prepared data whose validation split is empty",
         "target.precision auto chooses by the accuracy on the validation split, which is empty",
         c_precision_auto_empty_val),
    Case("precision-stale-choice", "profile given the precision stage's choice for `auto` while the params say fp32",
         "run the precision stage again", c_precision_stale_choice),
    Case("precision-other-target", "profile given an `auto` choice measured with 1 thread while the params say 2",
         "target.threads 1 (the params say 2)", c_precision_other_target),
    Case("precision-unrecorded", "profile given an `auto` choice that records neither the target settings nor the "
         "model it was measured on (hand-written, or an older precision stage's)",
         "auto choice without target and model_sha256", c_precision_unrecorded),
]


def test_the_docs_table_lists_every_case_in_order() -> None:
    # docs/BAD_INPUTS.md is generated from CASES (below); a case added, removed or renamed
    # without regenerating it would leave the docs describing checks that do not run
    rows = re.findall(r"^\| (\d+) \| `([^`]+)` \|", (REPO / "docs" / "BAD_INPUTS.md").read_text(), re.M)
    assert [(int(n), i) for n, i in rows] == [(k, c.id) for k, c in enumerate(CASES, 1)]
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                   capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, must_not_exist = case.run(world, tmp_path)
    text = caplog.text + capsys.readouterr().err
    assert code == 2, f"exit {code}, expected 2; output:\n{text}"
    assert case.message in text, f"expected {case.message!r} in:\n{text}"
    assert "Traceback" not in text
    left = [str(p) for p in must_not_exist if p.exists()]
    assert not left, f"outputs left behind: {left}"
    if os.environ.get("SLIMDEPLOY_BAD_INPUTS_LOG"):  # what the docs table shows: the real exit and message
        line = next((ln.strip() for ln in text.splitlines() if case.message in ln), "")
        with open(os.environ["SLIMDEPLOY_BAD_INPUTS_LOG"], "a") as f:
            f.write(json.dumps({"id": case.id, "exit": code, "message": line}) + "\n")


if __name__ == "__main__":
    # SLIMDEPLOY_BAD_INPUTS_LOG=/tmp/bad.jsonl python -m pytest tests/test_bad_inputs.py
    # python -m tests.test_bad_inputs /tmp/bad.jsonl > docs/BAD_INPUTS.md.table
    seen = {}
    if len(sys.argv) > 1:
        seen = {r["id"]: r for r in map(json.loads, Path(sys.argv[1]).read_text().splitlines())}
    print("| # | case | broken input | exit | message (as printed; the test checks the fragment in bold) |")
    print("|---|---|---|---|---|")
    for i, c in enumerate(CASES, 1):
        r = seen.get(c.id, {"exit": "not run", "message": ""})
        text = re.sub(r"^(ERROR|WARNING)\s+slimdeploy:\S+:\d+\s+", "", r["message"])
        text = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/]+/", "<tmp>/", text)
        msg = text[:300].replace("|", "\\|").replace(c.message, f"**{c.message}**", 1) or f"**{c.message}**"
        print(f"| {i} | `{c.id}` | {c.input} | {r['exit']} | {msg} |")
