"""Data preparation: read a source into uint8 arrays, split it, measure normalisation statistics.

Arrays are ``(N, C, H, W)`` uint8 images and ``(N,)`` int64 labels throughout. Prepared splits
are stored as ``train.npz``, ``val.npz``, ``test.npz`` (keys ``x`` and ``y``) plus ``meta.json``.
Normalisation and augmentation happen per batch at training time (see ``normalize`` and
``augment_batch``), so the same tensors serve CPU and GPU training without a DataLoader.
"""

from __future__ import annotations

import hashlib
import io
import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from sklearn.model_selection import train_test_split

from pipeline.config import PrepareConfig
from pipeline.errors import DataError
from pipeline.io import atomic_dir, read_json, write_json

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png"})
SPLITS = ("train", "val", "test")
_MAX_LISTED = 20


@dataclass
class RawImages:
    """A source read into memory. ``test_*`` is None when the source has no test split."""

    train_x: np.ndarray
    train_y: np.ndarray
    classes: list[str]
    source_hash: str
    test_x: np.ndarray | None = None
    test_y: np.ndarray | None = None
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # (N, C, H, W) uint8
    y: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return int(self.y.numel())


@dataclass(frozen=True)
class PreparedData:
    train: Split
    val: Split
    test: Split
    meta: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def channels(self) -> int:
        return int(self.meta["channels"])

    def norm(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (mean, std) measured on train, as float32 tensors of shape (C,)."""
        return torch.tensor(self.meta["mean"]), torch.tensor(self.meta["std"])


# ----------------------------------------------------------------------------------------------
# Reading sources


def _to_chw(img: Image.Image, channels: int, size: int | None) -> np.ndarray:
    img = img.convert("L" if channels == 1 else "RGB")
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def load_digits_source(image_size: int | None, channels: int) -> RawImages:
    """scikit-learn's embedded 8x8 digits (1,797 images, values 0..16) as uint8 0..255."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    raw = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    x = np.stack([_to_chw(Image.fromarray(im), channels, image_size) for im in raw])
    digest = hashlib.sha256(raw.tobytes() + bunch.target.astype(np.int64).tobytes()).hexdigest()
    return RawImages(x, bunch.target.astype(np.int64), [str(c) for c in bunch.target_names], f"sha256:{digest}")


@dataclass
class _Entry:
    split: str
    cls: str
    name: str
    data: bytes


def _walk_directory(root: Path) -> tuple[Iterator[_Entry], dict[str, set[str]]]:
    folders: dict[str, set[str]] = {}
    for split in ("train", "test"):
        d = root / split
        if d.is_dir():
            folders[split] = {p.name for p in d.iterdir() if p.is_dir()}

    def entries() -> Iterator[_Entry]:
        for split, classes in folders.items():
            for cls in sorted(classes):
                for p in sorted((root / split / cls).rglob("*")):
                    if p.is_file():
                        yield _Entry(split, cls, str(p.relative_to(root)), p.read_bytes())

    return entries(), folders


def _split_parts(name: str) -> tuple[str, str] | None:
    parts = [p for p in Path(name).parts if p not in (".", "")]
    for i, p in enumerate(parts[:-1]):
        if p in ("train", "test"):
            return p, parts[i + 1]
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
                                    "only plain files under train/<class>/ and test/<class>/ are allowed")
                loc = _split_parts(m.name)
                if loc is None:
                    continue
                split, cls = loc
                parts = Path(m.name).parts
                if m.isdir() and parts[-1] == cls:
                    folders.setdefault(split, set()).add(cls)
                elif m.isfile() and parts[-1] != cls:
                    folders.setdefault(split, set()).add(cls)
                    f = tar.extractfile(m)
                    found.append(_Entry(split, cls, m.name, f.read() if f else b""))
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"prepare.root: cannot read archive {path}: {err}") from err
    return found, folders


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def load_imagefolder(root: str | Path, image_size: int | None, channels: int, skip_corrupt: bool) -> RawImages:
    """``root/train/<class>/*`` and optionally ``root/test/<class>/*`` (jpg, jpeg, png).

    ``root`` may be a directory or a ``.tar``/``.tar.gz`` archive of that layout. Class names come
    from the train folders. Errors: missing root or train folder, empty class folders, different
    class sets in train and test, images of different sizes when ``image_size`` is None, and
    unreadable images unless ``skip_corrupt`` (then they are listed in ``skipped``).
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(
            f"prepare.root: {root} does not exist; expected a directory or .tar/.tar.gz with "
            "train/<class>/<image> (and optionally test/<class>/<image>)"
        )
    if root.is_dir():
        entries, folders = _walk_directory(root)
        hasher = hashlib.sha256()
    else:
        entries, folders = _walk_tar(root)
        hasher = None
    if "train" not in folders or not folders["train"]:
        raise DataError(f"prepare.root: {root} has no train/<class>/ folders")

    images: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    labels: dict[str, list[str]] = {"train": [], "test": []}
    counts: dict[tuple[str, str], int] = {}
    corrupt: list[str] = []
    ignored = 0
    for e in entries:
        if hasher is not None:
            hasher.update(e.name.encode() + b"\0" + hashlib.sha256(e.data).digest())
        if Path(e.name).suffix.lower() not in IMAGE_EXTENSIONS:
            ignored += 1
            continue
        try:
            with Image.open(io.BytesIO(e.data)) as img:
                img.load()
                arr = _to_chw(img, channels, image_size)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            corrupt.append(e.name)
            continue
        images[e.split].append(arr)
        labels[e.split].append(e.cls)
        counts[(e.split, e.cls)] = counts.get((e.split, e.cls), 0) + 1

    if corrupt and not skip_corrupt:
        listed = "\n  ".join(corrupt[:_MAX_LISTED])
        more = f"\n  ... and {len(corrupt) - _MAX_LISTED} more" if len(corrupt) > _MAX_LISTED else ""
        raise DataError(
            f"{len(corrupt)} unreadable image(s) under {root}:\n  {listed}{more}\n"
            "Fix or remove them, or set prepare.skip_corrupt: true to skip them (counted in metrics)."
        )
    empty = sorted(f"{s}/{c}" for s, cs in folders.items() for c in cs if counts.get((s, c), 0) == 0)
    if empty:
        raise DataError(f"empty class folder(s) under {root} (no readable .jpg/.jpeg/.png): {', '.join(empty)}")
    classes = sorted(folders["train"])
    if "test" in folders and folders["test"] != folders["train"]:
        only_train = sorted(folders["train"] - folders["test"])
        only_test = sorted(folders["test"] - folders["train"])
        raise DataError(
            f"class folders differ between train and test under {root}: "
            f"only in train: {only_train or 'none'}; only in test: {only_test or 'none'}"
        )
    if ignored:
        log.warning("ignored %d file(s) without a .jpg/.jpeg/.png extension under %s", ignored, root)
    index = {c: i for i, c in enumerate(classes)}

    def stack(split: str) -> tuple[np.ndarray, np.ndarray]:
        shapes = {a.shape for a in images[split]}
        if len(shapes) > 1:
            raise DataError(
                f"images under {root}/{split} have different sizes {sorted(shapes)[:5]}; "
                "set prepare.image_size to resize them to one square size"
            )
        return np.stack(images[split]), np.array([index[c] for c in labels[split]], dtype=np.int64)

    train_x, train_y = stack("train")
    test_x = test_y = None
    if "test" in folders:
        test_x, test_y = stack("test")
    digest = f"sha256:{hasher.hexdigest()}" if hasher is not None else _file_sha256(root)
    return RawImages(train_x, train_y, classes, digest, test_x, test_y, skipped=corrupt)


def load_cifar(name: str, root: str | Path, download: bool, image_size: int | None, channels: int) -> RawImages:
    """CIFAR-10/100 through torchvision from ``root`` (downloads only when ``download``)."""
    from models._tvcompat import import_torchvision

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
            x = np.stack([_to_chw(Image.fromarray(im), channels, image_size) for im in x])
        else:
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        return x, np.asarray(ds.targets, dtype=np.int64)

    tx, ty = convert(train)
    vx, vy = convert(test)
    digest = hashlib.sha256(train.data.tobytes() + test.data.tobytes()).hexdigest()
    return RawImages(tx, ty, list(train.classes), f"sha256:{digest}", vx, vy)


def load_source(cfg: PrepareConfig) -> RawImages:
    channels = cfg.channels or (1 if cfg.source == "digits" else 3)
    if cfg.source == "digits":
        return load_digits_source(cfg.image_size, channels)
    if cfg.source == "imagefolder":
        return load_imagefolder(cfg.root, cfg.image_size, channels, cfg.skip_corrupt)
    return load_cifar(cfg.source, cfg.root, cfg.download, cfg.image_size, channels)


# ----------------------------------------------------------------------------------------------
# Splitting and statistics


def _cap_per_class(y: np.ndarray, cap: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(y == c))[:cap] for c in np.unique(y)]
    return np.sort(np.concatenate(keep))


def split_indices(
    y: np.ndarray, val_fraction: float, test_fraction: float | None, seed: int
) -> dict[str, np.ndarray]:
    """Deterministic stratified split of ``range(len(y))``; fractions are of the whole pool.
    ``test_fraction=None``: no test split is carved (the source has its own)."""
    idx = np.arange(len(y))
    _, per_class = np.unique(y, return_counts=True)
    needed = 2 if test_fraction is None else 3
    if per_class.min() < needed:
        raise DataError(
            f"a class has only {per_class.min()} image(s); each needs at least {needed} to be "
            "split into train/val/test"
        )
    out: dict[str, np.ndarray] = {}
    try:
        if test_fraction is not None:
            idx, out["test"] = train_test_split(idx, test_size=test_fraction, stratify=y, random_state=seed)
        rel_val = val_fraction / (1.0 - (test_fraction or 0.0))
        out["train"], out["val"] = train_test_split(idx, test_size=rel_val, stratify=y[idx], random_state=seed)
    except ValueError as err:  # too few samples for a stratified split at these fractions
        raise DataError(f"cannot split {len(y)} images stratified by class: {err}") from err
    return {k: np.sort(v) for k, v in out.items()}


def channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1]."""
    v = x.astype(np.float64) / 255.0
    return v.mean(axis=(0, 2, 3)).tolist(), v.std(axis=(0, 2, 3)).tolist()


def _sha(x: np.ndarray, y: np.ndarray) -> str:
    return "sha256:" + hashlib.sha256(np.ascontiguousarray(x).tobytes() + y.tobytes()).hexdigest()


def prepare_splits(raw: RawImages, cfg: PrepareConfig) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
    """Split ``raw`` into train/val/test and describe the result in a meta dict."""
    pool_x, pool_y = raw.train_x, raw.train_y
    if cfg.max_per_class is not None:
        keep = _cap_per_class(pool_y, cfg.max_per_class, cfg.seed)
        pool_x, pool_y = pool_x[keep], pool_y[keep]
    has_test = raw.test_x is not None
    parts = split_indices(pool_y, cfg.val_fraction, None if has_test else cfg.test_fraction, cfg.seed)
    splits = {k: (pool_x[v], pool_y[v]) for k, v in parts.items()}
    if has_test:
        splits["test"] = (raw.test_x, raw.test_y)
    splits = {k: splits[k] for k in SPLITS}
    mean, std = channel_stats(splits["train"][0])
    n_cls = len(raw.classes)
    meta = {
        "source": cfg.source,
        "classes": raw.classes,
        "num_classes": n_cls,
        "channels": int(splits["train"][0].shape[1]),
        "image_size": list(splits["train"][0].shape[2:]),
        "layout": "NCHW uint8; normalise as (x / 255 - mean) / std",
        "mean": mean,
        "std": std,
        "split_sizes": {k: int(len(v[1])) for k, v in splits.items()},
        "class_counts": {k: np.bincount(v[1], minlength=n_cls).tolist() for k, v in splits.items()},
        "test_from": "source test split" if has_test else f"{cfg.test_fraction} of train, stratified",
        "split_seed": cfg.seed,
        "source_hash": raw.source_hash,
        "split_hashes": {k: _sha(*v) for k, v in splits.items()},
        "skipped_corrupt": raw.skipped,
    }
    return splits, meta


def save_prepared(out_dir: str | Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], meta: dict[str, Any]) -> None:
    """Write ``<split>.npz`` and ``meta.json`` into ``out_dir`` atomically (all or nothing)."""
    with atomic_dir(out_dir) as tmp:
        for name, (x, y) in splits.items():
            np.savez(tmp / f"{name}.npz", x=x, y=y)
        write_json(tmp / "meta.json", meta)


def holdout_split(raw: RawImages, cfg: PrepareConfig, per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``per_class`` images of every class from the source's training pool that
    ``prepare_splits`` with ``cfg`` did not take (``prepare.max_per_class`` leaves them out), drawn
    with ``seed``: a larger test set for benchmarks than the prepared one, which a small preset keeps
    small (1,000 images read a 0.5-point difference as noise). Raises DataError when the pool
    has no such image (``max_per_class`` null or at least the pool's class sizes)."""
    if per_class < 1:
        raise DataError(f"holdout: per_class must be at least 1, got {per_class}")
    used = (_cap_per_class(raw.train_y, cfg.max_per_class, cfg.seed) if cfg.max_per_class is not None
            else np.arange(len(raw.train_y)))
    rest = np.setdiff1d(np.arange(len(raw.train_y)), used)
    if not len(rest):
        raise DataError(f"holdout: prepare.max_per_class is {cfg.max_per_class}, so the prepare stage takes every "
                        f"image of the {cfg.source} source and none is left to hold out; lower prepare.max_per_class")
    rng = np.random.default_rng(seed)
    sel = np.sort(np.concatenate([rng.permutation(rest[raw.train_y[rest] == c])[:per_class]
                                  for c in np.unique(raw.train_y[rest])]))
    return raw.train_x[sel], raw.train_y[sel]


def load_split(path: str | Path, meta: dict[str, Any]) -> Split:
    """A split saved as ``.npz`` (``x`` uint8 NCHW, ``y`` labels), checked against the prepared data's
    ``meta`` (channels, image size, classes); raises DataError naming the file and the mismatch."""
    try:
        with np.load(path, allow_pickle=False) as f:
            x, y = f["x"], f["y"]
    except (ValueError, OSError, KeyError) as err:
        raise DataError(f"{path}: not a split file with arrays x and y ({err})") from err
    want = (int(meta["channels"]), *meta["image_size"])
    if x.dtype != np.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != want or y.shape != (len(x),):
        raise DataError(f"{path}: x must be uint8 of shape (N, {', '.join(map(str, want))}) and y of shape (N,) "
                        f"like the prepared data; got x {x.dtype} {tuple(x.shape)}, y {tuple(y.shape)}")
    if len(y) and (y.min() < 0 or y.max() >= int(meta["num_classes"])):
        raise DataError(f"{path}: labels must lie in [0, {int(meta['num_classes']) - 1}], got {y.min()}..{y.max()}")
    return Split(torch.from_numpy(x), torch.from_numpy(y).long())


def load_prepared(data_dir: str | Path) -> PreparedData:
    """Load what ``save_prepared`` wrote; raises DataError naming what is missing."""
    data_dir = Path(data_dir)
    missing = [n for n in (*[f"{s}.npz" for s in SPLITS], "meta.json") if not (data_dir / n).is_file()]
    if missing:
        raise DataError(f"prepared data in {data_dir} is missing {missing}; run the prepare stage first")
    try:
        meta = read_json(data_dir / "meta.json")
        splits = {}
        for s in SPLITS:
            with np.load(data_dir / f"{s}.npz", allow_pickle=False) as f:
                splits[s] = Split(torch.from_numpy(f["x"]), torch.from_numpy(f["y"]).long())
    except (ValueError, OSError, KeyError) as err:  # bad JSON, truncated or foreign .npz
        raise DataError(f"prepared data in {data_dir} is unreadable ({err}); re-run the prepare stage") from err
    return PreparedData(splits["train"], splits["val"], splits["test"], meta)


# ----------------------------------------------------------------------------------------------
# Per-batch transforms


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 ``(x / 255 - mean) / std``; mean, std of shape (C,)."""
    return (x.float().div_(255.0) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def augment_batch(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding by ``padding`` and random horizontal flip, per sample.

    ``x``: (B, C, H, W), any dtype, on any device; ``generator`` must live on the same device.
    Vectorised (one gather), so it runs on the GPU without per-sample host work.
    """
    b, _, h, w = x.shape
    dev = x.device
    if padding > 0:
        padded = torch.nn.functional.pad(x, (padding,) * 4)
        oy = torch.randint(0, 2 * padding + 1, (b,), device=dev, generator=generator)
        ox = torch.randint(0, 2 * padding + 1, (b,), device=dev, generator=generator)
        rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # (B, 1, H, 1)
        cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]  # (B, 1, 1, W)
        bi = torch.arange(b, device=dev)[:, None, None, None]
        ci = torch.arange(x.shape[1], device=dev)[None, :, None, None]
        x = padded[bi, ci, rows, cols]
    flip = torch.rand(b, device=dev, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)
