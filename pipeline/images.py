"""Image decoding: one function turns a file into the uint8 pixels the model is trained on, for
every mode Pillow reads, and names the cause and the file when it cannot.

``prepare`` (image folders and archives), ``pipeline.predict`` and the digits/CIFAR sources all
decode through ``decode_image`` / ``to_chw``; the handoff bundle states the rule (``DECODE_RULE``)
in its manifest's ``preprocessing.decode``, so a deploy team can reproduce it without this code.

The rule, by Pillow mode (the first frame of a multi-frame file; EXIF orientation is not applied,
as in torchvision's loaders):

- 8-bit modes keep their values: ``L``; ``1`` (0 or 255); ``RGB``; ``P`` and ``PA`` through their
  palette; ``CMYK`` as ``(255 - C)(255 - K) / 255`` (Pillow's conversion); ``YCbCr`` and ``HSV``
  through Pillow's conversion. Alpha (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``) is dropped: the
  stored colour is used, not composited (what the training data was decoded with before this rule).
- ``I;16``, ``I;16L``, ``I;16B``, ``I;16N`` (16-bit): ``round(v * 255 / 65535)`` = ``(v + 128) // 257``.
- ``I`` (32-bit integer): read as 16-bit (Pillow opens 16-bit TIFFs and older 16-bit PNGs as ``I``):
  clipped to 0..65535, then the 16-bit rule.
- ``F`` (32-bit float): read as [0, 1]: NaN -> 0, clipped to [0, 1], then ``floor(v * 255 + 0.5)``.
- ``LAB`` and anything else: refused (a colour-managed conversion is needed; convert to RGB first).
- Channels: grey from colour is ITU-R 601-2 luma in Pillow's fixed point,
  ``(19595 R + 38470 G + 7471 B + 32768) >> 16``; colour from grey repeats the grey value.
- Resize (when asked) after all of the above, on the 8-bit image, bilinear (Pillow).

Every rule depends on the mode only, never on an image's content (no per-image min-max), so the same
pixel value always gives the same input. 16-bit colour PNGs are reduced to 8 bits by Pillow itself
when opened (high byte, ``v // 256``), within one level of the 16-bit rule.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import DataError

DECODE_ID = "slimdeploy-decode/1"
DECODE_RULE = (
    f"{DECODE_ID}: Pillow, first frame, no EXIF rotation; 8-bit modes keep their values (1: 0/255, P/PA via "
    "palette, CMYK: (255-C)(255-K)/255), alpha dropped; I;16/I;16L/I;16B/I;16N: (v+128)//257; I: clip 0..65535 "
    "then (v+128)//257; F: NaN->0, clip [0,1], floor(v*255+0.5); grey from RGB: (19595R+38470G+7471B+32768)>>16; "
    "RGB from grey: repeated; then bilinear resize on 8 bits"
)
# Pillow's own default (PIL.Image.MAX_IMAGE_PIXELS, 1024 * 1024 * 1024 // 4 // 3): the limit a
# user raises with prepare.max_image_pixels / predict --max-image-pixels for genuine large images.
DEFAULT_MAX_PIXELS = 89_478_485
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"})


class ImageError(DataError):
    """A file that cannot be decoded; ``cause`` is one of "cannot open", "empty file", "not an image",
    "too large", "truncated", "corrupt", "unsupported mode"."""

    def __init__(self, name: str, cause: str, detail: str) -> None:
        self.name, self.cause, self.detail = name, cause, detail
        super().__init__(f"{name}: {cause}: {detail}")


def is_hidden(name: str | Path) -> bool:
    """A dotfile or a file under a dot-folder: ``._x.jpg`` (AppleDouble metadata that macOS writes
    beside a copied file), ``.DS_Store``, ``.ipynb_checkpoints/...``. Never an image of the dataset."""
    return any(p.startswith(".") and p not in (".", "..") for p in Path(name).parts)


# ----------------------------------------------------------------------------------------------
# Pixels by mode: (H, W) grey or (H, W, 3) colour, uint8


def _scale16(v: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255, rounded to nearest (no ties exist: 65535 = 255 * 257)."""
    return ((v.astype(np.int64) + 128) // 257).astype(np.uint8)


def _scale_float(v: np.ndarray) -> np.ndarray:
    v = np.clip(np.nan_to_num(v.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    return np.floor(v * 255.0 + 0.5).astype(np.uint8)


def _array(img: Image.Image) -> np.ndarray:
    return np.asarray(img)


_MODES: dict[str, Callable[[Image.Image], np.ndarray]] = {
    "1": lambda im: _array(im.convert("L")),
    "L": _array,
    "LA": lambda im: _array(im)[..., 0],
    "La": lambda im: _array(im.convert("LA"))[..., 0],
    "P": lambda im: _array(im.convert("RGBA"))[..., :3],
    "PA": lambda im: _array(im.convert("RGBA"))[..., :3],
    "RGB": _array,
    "RGBA": lambda im: _array(im)[..., :3],
    "RGBX": lambda im: _array(im)[..., :3],
    "RGBa": lambda im: _array(im.convert("RGBA"))[..., :3],
    "CMYK": lambda im: _array(im.convert("RGB")),
    "YCbCr": lambda im: _array(im.convert("RGB")),
    "HSV": lambda im: _array(im.convert("RGB")),
    **{m: lambda im: _scale16(_array(im)) for m in ("I;16", "I;16L", "I;16B", "I;16N")},
    "I": lambda im: _scale16(np.clip(_array(im), 0, 65535)),
    "F": lambda im: _scale_float(_array(im)),
}
SUPPORTED_MODES = tuple(_MODES)


def to_uint8(img: Image.Image) -> np.ndarray:
    """A loaded image's pixels by the module's rule: (H, W) for grey modes, (H, W, 3) for colour,
    uint8. Raises ValueError for a mode outside ``SUPPORTED_MODES``."""
    convert = _MODES.get(img.mode)
    if convert is None:
        raise ValueError(f"image mode {img.mode} is not supported (supported: {', '.join(SUPPORTED_MODES)}); "
                         "convert it to RGB or L first")
    return np.ascontiguousarray(convert(img), dtype=np.uint8)


def to_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8 -> (H, W) when ``channels`` is 1, (H, W, 3) when 3."""
    if channels == 1 and arr.ndim == 3:
        r, g, b = (arr[..., i].astype(np.uint32) for i in range(3))
        return ((19595 * r + 38470 * g + 7471 * b + 32768) >> 16).astype(np.uint8)
    if channels == 3 and arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=2)
    return arr


def to_chw(img: Image.Image, channels: int, size: int | None) -> np.ndarray:
    """A loaded image -> (channels, H, W) uint8 by the module's rule, resized to ``size`` x ``size``
    (bilinear, on 8 bits) unless ``size`` is None."""
    arr = to_channels(to_uint8(img), channels)
    if size is not None and arr.shape[:2] != (size, size):
        arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.Resampling.BILINEAR))
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


# ----------------------------------------------------------------------------------------------
# Files


@contextmanager
def _pillow_limit_off() -> Iterator[None]:
    # Pillow's own check warns above its limit and raises only above twice it, and cannot be raised
    # per call: it is switched off while we open, and ours (a size check before any pixel is
    # decoded) applies instead.
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _hint(name: str) -> str:
    if Path(name).name.startswith("._"):
        return " (a '._' file is AppleDouble metadata that macOS writes beside a copied file, not an image)"
    return ""


def _read(source: bytes | str | Path, name: str) -> bytes:
    if isinstance(source, bytes):
        data = source
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as err:
            raise ImageError(name, "cannot open", err.strerror or str(err)) from None
    if not data:
        raise ImageError(name, "empty file", "0 bytes")
    return data


def _cause(err: BaseException) -> str:
    """What Pillow's error means: the data ends early ("truncated"), or is wrong ("corrupt")."""
    return "truncated" if isinstance(err, EOFError) or "truncat" in str(err).lower() else "corrupt"


def _open(data: bytes, name: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(name, "not an image", f"no image format Pillow reads recognises its "
                         f"{len(data)} bytes{_hint(name)}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageError(name, _cause(err), f"{type(err).__name__}: {err}{_hint(name)}") from None


def decode_image(source: bytes | str | Path, channels: int, size: int | None, *,
                 max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None,
                 limit_hint: str = "max_image_pixels") -> np.ndarray:
    """A file's bytes (or its path) -> (channels, H, W) uint8 by the module's rule (``to_chw``).

    ``max_pixels``: images with more pixels (width x height, read from the header before any pixel
    is decoded) are refused; ``limit_hint`` names the setting that raises it in the message.
    ``name``: how the file is named in errors (default: the path). Raises ImageError with the cause.
    """
    name = name if name is not None else str(source)
    data = _read(source, name)
    with _pillow_limit_off(), _open(data, name) as img:
        w, h = img.size
        if w * h > max_pixels:
            raise ImageError(name, "too large", f"{w} x {h} = {w * h:,} pixels, over the limit of "
                             f"{max_pixels:,}; if the image is genuine, raise {limit_hint}")
        if img.mode not in _MODES:
            raise ImageError(name, "unsupported mode", f"{img.mode} (supported: {', '.join(SUPPORTED_MODES)}); "
                             "convert it to RGB or L first")
        try:
            img.load()
            return to_chw(img, channels, size)
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise ImageError(name, _cause(err), f"{type(err).__name__}: {err}") from None
