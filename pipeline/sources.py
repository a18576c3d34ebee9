"""Data sources read into memory as uint8 ``(N, C, H, W)`` arrays: scikit-learn's digits, an image
folder (a directory or a .tar/.tar.gz of ``train/<class>/*`` and optionally ``val/<class>/*`` and
``test/<class>/*``, used as they are instead of being carved from train/) and
CIFAR through torchvision. Every image goes through ``pipeline.images`` (one decoding rule).

What the image-folder reader skips, and why: files without an image extension (counted, logged) and
hidden files, i.e. any name starting with ``.`` (``._x.jpg`` AppleDouble files that macOS writes
beside copied files, ``.DS_Store``, ``.ipynb_checkpoints/``): they are never part of a dataset, as in
most tools. Hidden class folders are not classes.
"""

from __future__ import annotations

import hashlib
import logging
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.errors import DataError
from pipeline.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageError, decode_image, is_hidden, to_chw

log = logging.getLogger(__name__)
_MAX_LISTED = 20
_EXTS = "/".join(sorted(IMAGE_EXTENSIONS))

# (train labels of the images about to be decoded, class names, the splits the source has of its own
# besides train: "val", "test" or both): raises DataError when such a dataset cannot be trained on,
# before any image is decoded
ShapeCheck = Callable[[np.ndarray, list[str], tuple[str, ...]], None]
OWN_SPLITS = ("val", "test")  # folders beside train/ that are used as they are, not carved from train/


@dataclass
class RawImages:
    """A source read into memory. ``test_*`` (``val_*``) is None when the source has no test (val)
    split of its own."""

    train_x: np.ndarray
    train_y: np.ndarray
    classes: list[str]
    source_hash: str
    test_x: np.ndarray | None = None
    test_y: np.ndarray | None = None
    skipped: list[str] = field(default_factory=list)
    pooled: bool = False
    val_x: np.ndarray | None = None
    val_y: np.ndarray | None = None  # train_* holds only the training pool (prepare.max_per_class applied before decoding)


def load_digits_source(image_size: int | None, channels: int) -> RawImages:
    """scikit-learn's embedded 8x8 digits (1,797 images, values 0..16) as uint8 0..255."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    raw = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    x = np.stack([to_chw(Image.fromarray(im), channels, image_size) for im in raw])
    digest = hashlib.sha256(raw.tobytes() + bunch.target.astype(np.int64).tobytes()).hexdigest()
    return RawImages(x, bunch.target.astype(np.int64), [str(c) for c in bunch.target_names], f"sha256:{digest}")


# ----------------------------------------------------------------------------------------------
# Image folders: listing


@dataclass
class _Entry:
    split: str
    cls: str
    name: str  # relative to the root (directory) or the archive's member name
    read: Callable[[], bytes]
    inner: str  # the part of the name below <split>/<class>/

    @property
    def hidden(self) -> bool:
        return is_hidden(self.inner)

    @property
    def is_image(self) -> bool:
        return not self.hidden and Path(self.name).suffix.lower() in IMAGE_EXTENSIONS


def _walk_directory(root: Path) -> tuple[list[_Entry], dict[str, set[str]]]:
    folders: dict[str, set[str]] = {}
    for split in ("train", *OWN_SPLITS):
        d = root / split
        if d.is_dir():
            folders[split] = {p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")}
    found = []
    for split, classes in folders.items():
        for cls in sorted(classes):
            base = root / split / cls
            for p in sorted(base.rglob("*")):
                if p.is_file():
                    found.append(_Entry(split, cls, str(p.relative_to(root)), p.read_bytes,
                                        str(p.relative_to(base))))
    return found, folders


def _split_parts(name: str) -> tuple[int, str, str] | None:
    parts = [p for p in Path(name).parts if p not in (".", "")]
    for i, p in enumerate(parts[:-1]):
        if p in ("train", *OWN_SPLITS):
            return i, p, parts[i + 1]
    return None


def _walk_tar(path: Path) -> tuple[list[_Entry], dict[str, set[str]]]:
    folders: dict[str, set[str]] = {}
    found: list[_Entry] = []
    try:
        with tarfile.open(path) as tar:
            for m in tar:
                if m.name.startswith("/") or ".." in Path(m.name).parts or m.issym() or m.islnk():
                    # nothing is ever extracted to disk, but such an entry is a sign of a crafted archive
                    # (and could smuggle a class in from outside train/ and test/): refuse it
                    raise DataError(f"prepare.root: archive {path} has an entry that leaves its folder or links "
                                    f"elsewhere: {m.name!r} ({'link' if m.issym() or m.islnk() else 'path'}); "
                                    "only plain files under train/<class>/, val/<class>/ and test/<class>/ are allowed")
                loc = _split_parts(m.name)
                if loc is None or loc[2].startswith("."):
                    continue
                i, split, cls = loc
                parts = [p for p in Path(m.name).parts if p not in (".", "")]
                if m.isdir() and len(parts) == i + 2:
                    folders.setdefault(split, set()).add(cls)
                elif m.isfile() and len(parts) > i + 2:
                    folders.setdefault(split, set()).add(cls)
                    f = tar.extractfile(m)
                    data = f.read() if f else b""
                    found.append(_Entry(split, cls, m.name, lambda d=data: d, "/".join(parts[i + 2:])))
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"prepare.root: cannot read archive {path}: {err}") from err
    return found, folders


def _list_folder(root: Path) -> tuple[list[_Entry], dict[str, set[str]]]:
    if not root.exists():
        raise DataError(
            f"prepare.root: {root} does not exist; expected a directory or .tar/.tar.gz with "
            "train/<class>/<image> (and optionally val/<class>/<image>, test/<class>/<image>)"
        )
    entries, folders = _walk_directory(root) if root.is_dir() else _walk_tar(root)
    if "train" not in folders or not folders["train"]:
        raise DataError(f"prepare.root: {root} has no train/<class>/ folders")
    for own in OWN_SPLITS:
        if own in folders and folders[own] != folders["train"]:
            only_train = sorted(folders["train"] - folders[own])
            only_own = sorted(folders[own] - folders["train"])
            raise DataError(
                f"class folders differ between train and {own} under {root}: "
                f"only in train: {only_train or 'none'}; only in {own}: {only_own or 'none'}"
            )
    return entries, folders


def _check_not_empty(root: Path, folders: dict[str, set[str]], entries: list[_Entry],
                     counts: dict[tuple[str, str], int], what: str) -> None:
    empty = sorted(f"{s}/{c}" for s, cs in folders.items() for c in cs if counts.get((s, c), 0) == 0)
    if not empty:
        return
    hidden = [e.name for e in entries if e.hidden and f"{e.split}/{e.cls}" in empty]
    note = (f"; skipped there: {len(hidden)} hidden file(s) such as {hidden[0]} (names starting with '.', e.g. "
            "AppleDouble '._' files macOS writes beside copies, are never images)" if hidden else "")
    raise DataError(f"empty class folder(s) under {root} (no {what}, {_EXTS}): {', '.join(empty)}{note}")


# ----------------------------------------------------------------------------------------------
# Image folders: decoding


@dataclass
class _Decoded:
    images: dict[str, list[np.ndarray]] = field(default_factory=lambda: {"train": [], "val": [], "test": []})
    labels: dict[str, list[str]] = field(default_factory=lambda: {"train": [], "val": [], "test": []})
    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    failed: list[ImageError] = field(default_factory=list)


def _decode_all(entries: list[_Entry], image_size: int | None, channels: int, max_pixels: int,
                hasher: Any, skip: set[int] = frozenset()) -> _Decoded:
    out = _Decoded()
    for i, e in enumerate(entries):
        data = e.read()
        if hasher is not None:  # every file, as listed: the same folder always gives the same hash
            hasher.update(e.name.encode() + b"\0" + hashlib.sha256(data).digest())
        if not e.is_image or i in skip:
            continue
        try:
            arr = decode_image(data, channels, image_size, max_pixels=max_pixels, name=e.name,
                               limit_hint="prepare.max_image_pixels")
        except ImageError as err:
            out.failed.append(err)
            continue
        out.images[e.split].append(arr)
        out.labels[e.split].append(e.cls)
        out.counts[(e.split, e.cls)] = out.counts.get((e.split, e.cls), 0) + 1
    return out


def _unreadable(root: Path, failed: list[ImageError]) -> DataError:
    causes: dict[str, int] = {}
    for f in failed:
        causes[f.cause] = causes.get(f.cause, 0) + 1
    listed = "\n  ".join(str(f) for f in failed[:_MAX_LISTED])
    more = f"\n  ... and {len(failed) - _MAX_LISTED} more" if len(failed) > _MAX_LISTED else ""
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(causes.items()))
    return DataError(
        f"{len(failed)} unreadable image(s) under {root} ({summary}):\n  {listed}{more}\n"
        "Fix or remove them, or set prepare.skip_corrupt: true to skip them (counted in metrics)."
    )


def _listed_and_checked(root: Path, check: ShapeCheck | None) -> tuple[list[_Entry], dict[str, set[str]], list[str]]:
    """The folder's entries, its split -> class folders, and the class names (train's, sorted),
    after the listing's checks: no empty class folder, and ``check`` on the training labels."""
    entries, folders = _list_folder(root)
    listed: dict[tuple[str, str], int] = {}
    for e in entries:
        listed[(e.split, e.cls)] = listed.get((e.split, e.cls), 0) + e.is_image
    _check_not_empty(root, folders, entries, listed, "image file")
    classes = sorted(folders["train"])
    if check is not None:
        index = {c: i for i, c in enumerate(classes)}
        check(np.array([index[e.cls] for e in entries if e.split == "train" and e.is_image], dtype=np.int64),
              classes, tuple(o for o in OWN_SPLITS if o in folders))
    return entries, folders, classes


def load_imagefolder(root: str | Path, image_size: int | None, channels: int, skip_corrupt: bool,
                     max_pixels: int = DEFAULT_MAX_PIXELS, check: ShapeCheck | None = None,
                     pool: Callable[[np.ndarray], np.ndarray] | None = None) -> RawImages:
    """``root/train/<class>/*`` and optionally ``root/val/<class>/*`` and ``root/test/<class>/*``
    (extensions ``IMAGE_EXTENSIONS``).

    ``root`` may be a directory or a ``.tar``/``.tar.gz`` archive of that layout. Class names come
    from the train folders. ``check`` sees the labels of the listed images before any is decoded.
    Errors (DataError): missing root or train folder, class folders without an image, different
    class sets in train and test, images of different sizes when ``image_size`` is None, and
    images that cannot be decoded, each with its cause, unless ``skip_corrupt`` (then they are
    listed in ``skipped``). Images over ``max_pixels`` are refused before they are decoded.
    """
    root = Path(root).expanduser()
    entries, folders, classes = _listed_and_checked(root, check)
    index = {c: i for i, c in enumerate(classes)}
    hasher = hashlib.sha256() if root.is_dir() else None
    skip: set[int] = set()
    if pool is not None:  # the training images outside the pool are read (hashed), not decoded
        train = [i for i, e in enumerate(entries) if e.split == "train" and e.is_image]
        kept = set(pool(np.array([index[entries[i].cls] for i in train], dtype=np.int64)).tolist())
        skip = {i for j, i in enumerate(train) if j not in kept}
    dec = _decode_all(entries, image_size, channels, max_pixels, hasher, skip)
    if dec.failed and not skip_corrupt:
        raise _unreadable(root, dec.failed)
    _check_not_empty(root, folders, entries, dec.counts, "readable image")
    ignored = sum(not e.is_image and not e.hidden for e in entries)
    hidden = sum(e.hidden for e in entries)
    if ignored or hidden:
        log.warning("skipped under %s: %d file(s) without an image extension (%s), %d hidden file(s) (names "
                    "starting with '.')", root, ignored, _EXTS, hidden)

    def stack(split: str) -> tuple[np.ndarray, np.ndarray]:
        shapes = {a.shape for a in dec.images[split]}
        if len(shapes) > 1:
            raise DataError(
                f"images under {root}/{split} have different sizes {sorted(shapes)[:5]}; "
                "set prepare.image_size to resize them to one square size"
            )
        return np.stack(dec.images[split]), np.array([index[c] for c in dec.labels[split]], dtype=np.int64)

    train_x, train_y = stack("train")
    test_x, test_y = stack("test") if "test" in folders else (None, None)
    val_x, val_y = stack("val") if "val" in folders else (None, None)
    digest = f"sha256:{hasher.hexdigest()}" if hasher is not None else _file_sha256(root)
    return RawImages(train_x, train_y, classes, digest, test_x, test_y, skipped=[str(f) for f in dec.failed],
                     pooled=pool is not None, val_x=val_x, val_y=val_y)


@dataclass
class ListedFiles:
    """An image folder listed, not decoded (``prepare.storage: files``): per split, file names
    relative to ``root``, labels and each file's sha256; ``source_hash`` as ``load_imagefolder``'s."""

    root: Path
    classes: list[str]
    files: dict[str, list[str]]
    labels: dict[str, np.ndarray]
    digests: dict[str, list[bytes]]
    source_hash: str


def list_imagefolder(root: str | Path, check: ShapeCheck | None = None) -> ListedFiles:
    """``root/train/<class>/*`` (and optionally ``val/``, ``test/``) as file names: every file is read once to
    hash it (the dataset's version), none is decoded. Same listing rules and errors as
    ``load_imagefolder``; ``root`` must be a directory (images are read from it while training)."""
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise DataError(f"prepare.root: {root} is an archive; prepare.storage: files reads images from a directory "
                        "while training: extract it (or use prepare.storage: memory)")
    entries, folders, classes = _listed_and_checked(root, check)
    index = {c: i for i, c in enumerate(classes)}
    hasher = hashlib.sha256()
    out = ListedFiles(root, classes, {s: [] for s in folders}, {}, {s: [] for s in folders}, "")
    labels: dict[str, list[int]] = {s: [] for s in folders}
    for e in entries:
        digest = hashlib.sha256(e.read()).digest()
        hasher.update(e.name.encode() + b"\0" + digest)
        if e.is_image:
            out.files[e.split].append(e.name)
            labels[e.split].append(index[e.cls])
            out.digests[e.split].append(digest)
    out.labels = {s: np.array(v, dtype=np.int64) for s, v in labels.items()}
    out.source_hash = f"sha256:{hasher.hexdigest()}"
    return out


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


# ----------------------------------------------------------------------------------------------
# CIFAR


def load_cifar(name: str, root: str | Path, download: bool, image_size: int | None, channels: int) -> RawImages:
    """CIFAR-10/100 through torchvision from ``root`` (downloads only when ``download``)."""
    from models.tvcompat import import_torchvision

    datasets = import_torchvision().datasets
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        root = Path(root).expanduser()
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except RuntimeError as err:
        raise DataError(
            f"prepare.root: {name} not found under {root} ({err}); put the python version of the "
            "dataset there or set prepare.download: true"
        ) from err

    def convert(ds: Any) -> tuple[np.ndarray, np.ndarray]:
        x = ds.data  # (N, 32, 32, 3) uint8
        if channels == 1 or (image_size is not None and image_size != x.shape[1]):
            x = np.stack([to_chw(Image.fromarray(im), channels, image_size) for im in x])
        else:
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        return x, np.asarray(ds.targets, dtype=np.int64)

    tx, ty = convert(train)
    vx, vy = convert(test)
    digest = hashlib.sha256(train.data.tobytes() + test.data.tobytes()).hexdigest()
    return RawImages(tx, ty, list(train.classes), f"sha256:{digest}", vx, vy)
