"""Image decoding (pipeline.images): the documented rule for every Pillow mode, errors that name
their cause, and the same pixels through `prepare` and `pipeline.predict` whatever the bit depth."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import load_source, prepare_splits
from pipeline.images import DECODE_RULE, ImageError, decode_image, to_chw
from tests.conftest import prepare_cfg

META = {"image_size": [8, 8], "channels": 1, "mean": [0.3], "std": [0.3], "classes": [str(i) for i in range(10)]}


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` grey pixels but holds almost none: what a huge
    image looks like to a decoder before it decodes, without writing one."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def make_bundle(tmp_path: Path, meta: dict = META) -> Path:
    """A verified bundle around a random 1-channel 8x8 network: manifest with the model's own card."""
    from models import build_model
    from pipeline.deploy import model_card, sha256
    from pipeline.runtimes import export_onnx

    torch.manual_seed(0)
    b = tmp_path / "bundle"
    b.mkdir()
    card = model_card(meta)
    export_onnx(build_model("resnet_tiny", num_classes=10, in_channels=1).eval(), (1, 8, 8), b / "model.onnx", card=card)
    manifest = {"format": "slimdeploy-handoff/1", "model": {"onnx": "model.onnx"}, "engine": {"file": "model.onnx"},
                "input": card["input"], "output": card["output"], "preprocessing": card["preprocessing"],
                "classes": card["classes"], "accuracy": {}, "latency": {}, "budget": {}, "device": {}, "versions": {},
                "git_revision": "x", "files": {"model.onnx": sha256(b / "model.onnx")}}
    (b / "manifest.json").write_text(json.dumps(manifest))
    return b


# ----------------------------------------------------------------------------------------------
# The rule, mode by mode


def test_16_bit_is_scaled_not_clipped() -> None:
    v = np.array([[0, 128, 129, 257, 32768, 65535]], dtype=np.uint16)
    for mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        raw = v.astype(">u2" if mode == "I;16B" else "<u2").tobytes()
        img = Image.frombytes(mode, (6, 1), raw)
        assert to_chw(img, 1, None)[0, 0].tolist() == [0, 0, 1, 1, 128, 255], mode
    # mid-grey 32768 was stored as 255 before (issue 31)
    assert decode_image(encode(Image.fromarray(np.full((4, 4), 32768, np.uint16))), 1, None).max() == 128


def test_32_bit_int_and_float_rules() -> None:
    i = Image.frombytes("I", (4, 1), np.array([-5, 257, 65535, 10**6], np.int32).tobytes())
    assert to_chw(i, 1, None)[0, 0].tolist() == [0, 1, 255, 255]
    f = Image.frombytes("F", (6, 1), np.array([np.nan, -1, 0.0, 0.5, 1.0, 7], np.float32).tobytes())
    assert to_chw(f, 1, None)[0, 0].tolist() == [0, 0, 0, 128, 255, 255]


def test_alpha_is_dropped_and_palettes_are_looked_up() -> None:
    rgba = Image.fromarray(np.array([[[10, 20, 30, 0], [40, 50, 60, 255]]], np.uint8), "RGBA")
    assert to_chw(rgba, 3, None)[:, 0].T.tolist() == [[10, 20, 30], [40, 50, 60]]
    la = Image.fromarray(np.array([[[7, 0], [9, 255]]], np.uint8), "LA")
    assert to_chw(la, 1, None)[0, 0].tolist() == [7, 9]
    p = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    p.putpalette([200, 100, 50, 1, 2, 3])
    assert to_chw(p, 3, None)[:, 0].T.tolist() == [[200, 100, 50], [1, 2, 3]]
    assert to_chw(Image.new("1", (2, 1), 1), 1, None)[0, 0].tolist() == [255, 255]


def test_cmyk_and_grey_conversions() -> None:
    cmyk = Image.fromarray(np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 128], [100, 50, 25, 10]]], np.uint8),
                           "CMYK")
    got = to_chw(cmyk, 3, None)[:, 0].T.tolist()
    assert got[:3] == [[255, 255, 255], [0, 255, 255], [127, 127, 127]]
    assert got[3] == [round((255 - c) * 245 / 255) for c in (100, 50, 25)]
    rgb = Image.fromarray(np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]], np.uint8))
    grey = to_chw(rgb, 1, None)[0, 0].tolist()
    assert grey == [(19595 * r + 38470 * g + 7471 * b + 32768) >> 16
                    for r, g, b in ((255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 20, 30))]
    assert grey == np.asarray(rgb.convert("L"))[0].tolist()  # Pillow's own conversion, as before the rule
    assert to_chw(Image.fromarray(np.array([[5, 6]], np.uint8)), 3, None)[:, 0].T.tolist() == [[5, 5, 5], [6, 6, 6]]


# ----------------------------------------------------------------------------------------------
# Errors name the cause and the file


@pytest.mark.parametrize(("data", "cause"), [
    (b"", "empty file"),
    (b"just some text, not pixels", "not an image"),
    (None, "truncated"),
    (png_header(20000, 20000), "too large"),
    (b"lab", "unsupported mode"),
])
def test_errors_name_the_cause_and_the_file(data: bytes | None, cause: str) -> None:
    if data is None:
        full = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32), np.uint8)))
        data = full[: len(full) // 2]
    elif data == b"lab":
        data = encode(Image.new("LAB", (4, 4)), "TIFF")
    with pytest.raises(ImageError) as err:
        decode_image(data, 1, 8, name="train/cat/x.png", limit_hint="prepare.max_image_pixels")
    assert err.value.cause == cause and str(err.value).startswith(f"train/cat/x.png: {cause}:")
    if cause == "too large":
        assert "20000 x 20000 = 400,000,000 pixels" in str(err.value) and "prepare.max_image_pixels" in str(err.value)


def test_pixel_limit_is_ours_and_can_be_raised(tmp_path: Path) -> None:
    img = encode(Image.new("L", (30, 20), 9))
    with pytest.raises(ImageError, match="30 x 20 = 600 pixels, over the limit of 599"):
        decode_image(img, 1, None, max_pixels=599)
    assert decode_image(img, 1, None, max_pixels=600).shape == (1, 20, 30)
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's own setting is restored after each call


def test_apple_double_files_are_named_as_such(tmp_path: Path) -> None:
    f = tmp_path / "._cat.png"
    f.write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")  # AppleDouble magic
    with pytest.raises(ImageError, match="not an image: .*AppleDouble metadata"):
        decode_image(f, 1, 8)
    with pytest.raises(ImageError, match="cannot open"):
        decode_image(tmp_path / "missing.png", 1, 8)


# ----------------------------------------------------------------------------------------------
# The same pixels through prepare and predict, 8-bit or 16-bit


def _digits_as_files(root: Path, bits: int) -> list[np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.concatenate([np.flatnonzero(d.target == c)[:10] for c in (0, 1)])
    imgs = np.clip(np.rint(d.images[keep] * 255 / 16), 0, 255).astype(np.uint8)
    for k, (im, label) in enumerate(zip(imgs, d.target[keep])):
        path = root / "train" / str(label) / f"{k:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im.astype(np.uint16) * 257 if bits == 16 else im).save(path)
    return list(imgs)


def test_16_bit_pngs_prepare_to_the_same_pixels_as_8_bit(tmp_path: Path) -> None:
    out = {}
    for bits in (8, 16):
        root = tmp_path / f"d{bits}"
        _digits_as_files(root, bits)
        assert Image.open(next((root / "train" / "0").iterdir())).mode == ("L" if bits == 8 else "I;16")
        cfg = prepare_cfg(source="imagefolder", root=str(root), image_size=None, channels=1, val_fraction=0.2,
                          test_fraction=0.2)
        splits, meta = prepare_splits(load_source(cfg), cfg)
        out[bits] = (splits, meta)
    assert out[8][1]["split_hashes"] == out[16][1]["split_hashes"]
    assert out[16][1]["decode"] == DECODE_RULE and out[16][0]["train"][0].max() > 200


def test_16_bit_png_predicts_like_8_bit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.predict import main as predict_main

    b = make_bundle(tmp_path)
    images = _digits_as_files(tmp_path / "imgs", 8)[:4]
    paths8, paths16 = [], []
    for k, im in enumerate(images):
        paths8.append(tmp_path / f"{k}_8.png")
        paths16.append(tmp_path / f"{k}_16.png")
        Image.fromarray(im).save(paths8[-1])
        Image.fromarray(im.astype(np.uint16) * 257).save(paths16[-1])
    assert predict_main(["--bundle", str(b), "--json", *map(str, paths8)]) == 0
    out8 = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert predict_main(["--bundle", str(b), "--json", *map(str, paths16)]) == 0
    out16 = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["index"], r["probability"]) for r in out8] == [(r["index"], r["probability"]) for r in out16]


def test_predict_pixel_limit_from_the_bundle_or_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.predict import main as predict_main

    b = make_bundle(tmp_path, {**META, "max_image_pixels": 100})
    img = tmp_path / "x.png"
    Image.new("L", (20, 20), 50).save(img)
    assert predict_main(["--bundle", str(b), str(img)]) == 2
    err = capsys.readouterr().err
    assert "too large: 20 x 20 = 400 pixels, over the limit of 100" in err and "--max-image-pixels" in err
    assert predict_main(["--bundle", str(b), "--max-image-pixels", "400", str(img)]) == 0
    (tmp_path / "huge.png").write_bytes(png_header(20000, 20000))
    assert predict_main(["--bundle", str(b), "--max-image-pixels", "1000", str(tmp_path / "huge.png")]) == 2
    assert "400,000,000 pixels" in capsys.readouterr().err
