"""Property-based tests (Hypothesis): the decoding rule against a reference computed here with
numpy, damaged image files, random manifests and random edits of params.yaml.

`make test` runs a bounded number of examples with a fixed seed (``derandomize=True``): the same
examples every run, a few seconds per property. ``benchmarks/fuzz_inputs.py`` runs the same
properties (``PROPERTIES``) with many more, randomly seeded examples.
"""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from pipeline.config import validate_params
from pipeline.errors import ConfigError
from pipeline.images import ImageError, decode_image, to_chw
from tests.conftest import REPO


def fast(examples: int) -> settings:
    """`make test`'s settings: ``examples`` fixed examples, no example database, no deadline."""
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# ----------------------------------------------------------------------------------------------
# Decoding: every mode, size and bit depth against a reference scaling written here


# mode -> (numpy dtype of the raw buffer, values per pixel, file formats that store it losslessly)
MODES: dict[str, tuple[str, int, tuple[str, ...]]] = {
    "1": ("bool", 1, ("PNG", "TIFF")), "L": ("u1", 1, ("PNG", "TIFF")), "P": ("u1", 1, ("PNG", "TIFF")),
    "RGB": ("u1", 3, ("PNG", "TIFF")), "RGBA": ("u1", 4, ("PNG", "TIFF")), "CMYK": ("u1", 4, ("TIFF",)),
    "LA": ("u1", 2, ("PNG", "TIFF")), "PA": ("u1", 2, ("TIFF",)),
    "I;16": ("<u2", 1, ("PNG", "TIFF")), "I;16L": ("<u2", 1, ("TIFF",)), "I;16B": (">u2", 1, ("PNG", "TIFF")),
    "I;16N": ("=u2", 1, ()), "I": ("=i4", 1, ("TIFF",)), "F": ("=f4", 1, ("TIFF",)),
}


@dataclass
class ImageCase:
    mode: str
    raw: np.ndarray  # (H, W) or (H, W, values per pixel), the buffer the image is built from
    palette: np.ndarray | None  # (256, 3) uint8 for P and PA
    via: str  # "memory" (to_chw on the Image) or a file format (decode_image on the bytes)
    channels: int
    size: int | None

    def image(self) -> Image.Image:
        h, w = self.raw.shape[:2]
        if self.mode == "1":
            img = Image.frombytes("1", (w, h), np.packbits(self.raw, axis=1).tobytes())
        else:
            img = Image.frombytes(self.mode, (w, h), self.raw.tobytes())
        if self.palette is not None:
            img.putpalette(self.palette.tobytes())
        return img


def _elements(mode: str) -> st.SearchStrategy[Any] | None:
    if mode == "I":  # 16-bit data stored as 32-bit, and anything a 32-bit integer holds
        return st.one_of(st.integers(0, 65535), st.integers(-(2**31), 2**31 - 1))
    if mode == "F":  # [0, 1] as the rule reads it, and anything else a float holds
        return st.one_of(st.floats(0, 1, width=32), st.floats(width=32, allow_nan=True, allow_infinity=True))
    return None  # every value of the dtype


@st.composite
def image_cases(draw: st.DrawFn) -> ImageCase:
    mode = draw(st.sampled_from(sorted(MODES)))
    dtype, per_pixel, formats = MODES[mode]
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    shape = (h, w) if per_pixel == 1 else (h, w, per_pixel)
    raw = draw(hnp.arrays(np.dtype(dtype), shape, elements=_elements(mode)))
    palette = draw(hnp.arrays(np.uint8, (256, 3))) if mode in ("P", "PA") else None
    return ImageCase(mode, raw, palette, draw(st.sampled_from(("memory", *formats))), draw(st.sampled_from((1, 3))),
                     draw(st.none() | st.integers(1, 12)))


def reference(case: ImageCase) -> np.ndarray:
    """(channels, H, W) uint8 by the documented rule, computed from the raw values with numpy."""
    a, m = case.raw, case.mode
    if m == "1":
        v = a.astype(np.uint8) * 255
    elif m in ("P", "PA"):
        v = case.palette[a if m == "P" else a[..., 0]]
    elif m in ("L", "LA"):
        v = a if m == "L" else a[..., 0]
    elif m in ("RGB", "RGBA"):
        v = a[..., :3]
    elif m == "CMYK":
        v = np.rint((255.0 - a[..., :3]) * (255.0 - a[..., 3:]) / 255.0)
    elif m == "F":
        f = np.clip(np.where(np.isnan(a), 0.0, a.astype(np.float64)), 0.0, 1.0)
        v = np.floor(f * 255.0 + 0.5)
    else:  # the 16-bit modes and I: nearest of 0..255 to v * 255 / 65535 (exactly halfway never occurs)
        v = np.rint(np.clip(a.astype(np.float64), 0, 65535) * 255.0 / 65535.0)
    v = v.astype(np.uint8)
    if case.channels == 1 and v.ndim == 3:  # ITU-R 601-2 luma with Pillow's 16-bit fixed-point weights
        v = np.floor(v.astype(np.float64) @ np.array([19595, 38470, 7471]) / 65536 + 0.5).astype(np.uint8)
    elif case.channels == 3 and v.ndim == 2:
        v = np.repeat(v[..., None], 3, axis=2)
    if case.size is not None and v.shape[:2] != (case.size, case.size):
        v = np.asarray(Image.fromarray(v).resize((case.size, case.size), Image.Resampling.BILINEAR))
    return v[None] if v.ndim == 2 else v.transpose(2, 0, 1)


def check_decoding(case: ImageCase) -> None:
    """The decoded array equals the reference, in memory or through a file."""
    img = case.image()
    if case.via == "memory":
        got = to_chw(img, case.channels, case.size)
    else:
        buf = io.BytesIO()
        img.save(buf, format=case.via)
        got = decode_image(buf.getvalue(), case.channels, case.size, name=f"case.{case.via.lower()}")
    want = reference(case)
    assert got.dtype == np.uint8 and got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_array_equal(got, want)


@st.composite
def damaged_files(draw: st.DrawFn) -> tuple[bytes, str]:
    """A valid image file cut short, with bytes overwritten, or with bytes inserted."""
    case = draw(image_cases().filter(lambda c: c.via != "memory"))
    fmt = draw(st.sampled_from(("JPEG", "BMP", "GIF", "WEBP", case.via))) if case.mode in ("L", "RGB") else case.via
    buf = io.BytesIO()
    case.image().save(buf, format=fmt)
    data = bytearray(buf.getvalue())
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, max(0, len(data) - 1)))
        how = draw(st.sampled_from(("cut", "overwrite", "insert")))
        if how == "cut":
            del data[at:]
        elif how == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[at : at + len(chunk)] = chunk
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data), fmt


def check_damaged(file: tuple[bytes, str]) -> None:
    """A damaged file decodes (to uint8 of the asked shape) or is an ImageError: never another error."""
    data, fmt = file
    try:
        got = decode_image(data, 3, 8, max_pixels=1 << 20, name=f"damaged.{fmt.lower()}")
    except ImageError as err:
        assert str(err).startswith(f"damaged.{fmt.lower()}: {err.cause}: ")
        return
    assert got.dtype == np.uint8 and got.shape == (3, 8, 8)


@fast(300)
@given(image_cases())
def test_decoding_matches_the_reference(case: ImageCase) -> None:
    check_decoding(case)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns of what it skips in a damaged file
@fast(200)
@given(damaged_files())
def test_damaged_files_decode_or_name_their_cause(file: tuple[bytes, str]) -> None:
    check_damaged(file)


# ----------------------------------------------------------------------------------------------
# Manifests: any JSON value, and one field of a valid manifest changed to any JSON value


def json_values() -> st.SearchStrategy[Any]:
    scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
               | st.text(max_size=12))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


PLACEHOLDER = "0" * 64  # model.onnx's sha256, replaced by the real one where a bundle is used


def valid_manifest() -> dict[str, Any]:
    from pipeline.deploy import model_card
    from tests.test_images import META

    card = model_card(META)
    return {"format": "slimdeploy-handoff/1", "model": {"onnx": "model.onnx"}, "engine": {"file": "model.onnx"},
            "input": card["input"], "output": card["output"], "preprocessing": card["preprocessing"],
            "classes": card["classes"], "accuracy": {}, "latency": {}, "budget": {}, "device": {}, "versions": {},
            "git_revision": "x", "files": {"model.onnx": PLACEHOLDER}}


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a JSON value: dict keys and list indices."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def edits(draw: st.DrawFn, base: Callable[[], dict[str, Any]], values: st.SearchStrategy[Any]) -> tuple[Any, tuple]:
    """``base()`` with one path replaced by a drawn value, deleted, or given an extra key."""
    doc = copy.deepcopy(base())
    path = draw(st.sampled_from([p for p in _paths(doc) if p]))
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    how = draw(st.sampled_from(("replace", "delete", "add")))
    if how == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    elif how == "add" and isinstance(parent[path[-1]], dict):
        parent[path[-1]][draw(st.text(min_size=1, max_size=8))] = draw(values)
    else:
        parent[path[-1]] = draw(values)
    return doc, path


def check_manifest_value(doc: Any, path: tuple = ()) -> None:
    """Valid, or a DeployError that starts with manifest.json and names the changed field."""
    from pipeline.deploy import DeployError, check_manifest

    try:
        check_manifest(json.loads(json.dumps(doc)))  # as read from a file
    except DeployError as err:
        msg = str(err)
        assert msg.startswith("manifest.json "), msg
        if path:
            assert str(path[0]) in msg, f"{path} not named in: {msg}"


@fast(200)
@given(json_values())
def test_any_json_value_as_manifest(doc: Any) -> None:
    check_manifest_value(doc)


@fast(300)
@given(edits(valid_manifest, json_values()))
def test_one_field_changed(edit: tuple[Any, tuple]) -> None:
    check_manifest_value(*edit)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.test_images import make_bundle

    return make_bundle(tmp_path_factory.mktemp("properties"))


def predict_check(bundle: Path, tmp: Path) -> Callable[[tuple[Any, tuple]], None]:
    """A check of one edited manifest through ``python -m pipeline.predict`` on a copy of ``bundle``:
    exit 0 or 2, never an exception (a traceback); exit 2 prints one `error:` message. The edit's
    placeholder hash of model.onnx is replaced by the real one, so edits reach past the hash check."""
    import contextlib
    import shutil

    from pipeline.predict import main as predict_main

    real = json.loads((bundle / "manifest.json").read_text())["files"]["model.onnx"]
    img = tmp / "x.png"
    Image.new("L", (8, 8), 100).save(img)

    def check(edit: tuple[Any, tuple]) -> None:
        doc = edit[0]
        if isinstance(doc.get("files"), dict) and doc["files"].get("model.onnx") == PLACEHOLDER:
            doc["files"]["model.onnx"] = real
        b = tmp / "b"
        shutil.rmtree(b, ignore_errors=True)
        shutil.copytree(bundle, b)
        (b / "manifest.json").write_text(json.dumps(doc))
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = predict_main(["--bundle", str(b), str(img)])
        assert code in (0, 2) and (code == 0 or err.getvalue().startswith("error: ")), (code, err.getvalue())

    return check


@fast(40)
@given(edit=edits(valid_manifest, json_values()))
def test_predict_exits_cleanly_on_any_edited_manifest(bundle: Path, tmp_path: Path, edit: tuple[Any, tuple]) -> None:
    predict_check(bundle, tmp_path)(edit)


# ----------------------------------------------------------------------------------------------
# params.yaml: one value changed, deleted or added


def yaml_values() -> st.SearchStrategy[Any]:
    scalars = (st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True)
               | st.text(max_size=12) | st.dates(min_value=date(1900, 1, 1)))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


def repo_params() -> dict[str, Any]:
    return copy.deepcopy(_PARAMS)


_PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def check_params_edit(edit: tuple[Any, tuple]) -> None:
    """Valid, or a ConfigError that names the changed section and key."""
    params, path = edit
    try:
        validate_params(params)
    except ConfigError as err:
        msg = str(err)
        names = [str(p) for p in path if isinstance(p, str)]
        assert names[0] in msg, f"{path} not named in: {msg}"
        if len(names) > 1:
            assert any(n in msg for n in names[1:]), f"{path}: no key named in: {msg}"


@fast(300)
@given(edits(repo_params, yaml_values()))
def test_params_edit_is_valid_or_names_the_key(edit: tuple[Any, tuple]) -> None:
    check_params_edit(edit)


# name -> (strategy, check): what benchmarks/fuzz_inputs.py runs for longer
PROPERTIES: dict[str, tuple[Callable[[], st.SearchStrategy[Any]], Callable[[Any], None]]] = {
    "decoding_matches_reference": (image_cases, check_decoding),
    "damaged_files": (damaged_files, check_damaged),
    "manifest_any_json": (json_values, check_manifest_value),
    "manifest_one_field": (lambda: edits(valid_manifest, json_values()), lambda e: check_manifest_value(*e)),
    "params_one_edit": (lambda: edits(repo_params, yaml_values()), check_params_edit),
}
