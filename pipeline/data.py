"""Data preparation: read a source into uint8 arrays, split it, measure normalisation statistics.

Arrays are ``(N, C, H, W)`` uint8 images and ``(N,)`` int64 labels throughout. Prepared splits
are stored as ``train.npz``, ``val.npz``, ``test.npz`` (keys ``x`` and ``y``) plus ``meta.json``.
Normalisation and augmentation happen per batch at training time (see ``normalize`` and
``augment_batch``), so the same tensors serve CPU and GPU training without a DataLoader.

``prepare.storage: files`` (an image folder larger than memory) stores file names instead of
pixels (keys ``files`` and ``y``); its splits are ``pipeline.streaming.FileSplit``, read from disk
in DataLoader workers. Readers use what both kinds of split offer: ``len``, ``y``, ``take(idx)``
(uint8 rows) and ``batches(n)`` (in order).
"""

from __future__ import annotations

import hashlib
import logging
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.config import PrepareConfig
from pipeline.errors import DataError
from pipeline.images import DECODE_RULE
from pipeline.io import atomic_dir, read_json, write_json
from pipeline.sources import RawImages, list_imagefolder, load_cifar, load_digits_source, load_imagefolder
from pipeline.streaming import FileSplit, View, default_workers, file_split

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MIN_IMAGE_SIDE = 4  # the smallest prepare.image_size: the networks downsample


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # (N, C, H, W) uint8
    y: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return int(self.y.numel())

    def take(self, idx: torch.Tensor | None = None, train: bool = False) -> torch.Tensor:
        """uint8 rows ``idx`` (every row: None). ``train`` is for ``FileSplit``'s training view;
        images in memory are augmented per batch (``augment_batch``)."""
        return self.x if idx is None else self.x[idx]

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images, labels) in order."""
        for i in range(0, len(self), batch_size):
            yield self.x[i:i + batch_size], self.y[i:i + batch_size]


AnySplit = Split | FileSplit


@dataclass(frozen=True)
class PreparedData:
    train: AnySplit
    val: AnySplit
    test: AnySplit
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
# Reading sources (pipeline.sources) and checking their shape


def load_source(cfg: PrepareConfig, whole: bool = False) -> RawImages:
    """The configured source in memory. An image folder's shape (``check_listed``) is checked
    from its listing, before any image is decoded, and only its training pool is decoded
    (``prepare.max_per_class``), unless ``whole`` (a benchmark's holdout draws from the rest)."""
    channels = cfg.channels or (1 if cfg.source == "digits" else 3)
    if cfg.source == "digits":
        return load_digits_source(cfg.image_size, channels)
    if cfg.source == "imagefolder":
        return load_imagefolder(cfg.root, cfg.image_size, channels, cfg.skip_corrupt, cfg.max_image_pixels,
                                check=lambda y, classes, own: check_listed(y, classes, own, cfg),
                                pool=None if whole or cfg.max_per_class is None else lambda y: _pool(y, cfg))
    return load_cifar(cfg.source, cfg.root, cfg.download, cfg.image_size, channels)


def _carved(own: tuple[str, ...]) -> tuple[str, ...]:
    """The splits carved from the training pool: those the source has no folder of (``own``)."""
    return tuple(s for s in SPLITS if s not in own)


def _pool(y: np.ndarray, cfg: PrepareConfig) -> np.ndarray:
    """Indices of the training pool ``prepare_splits`` splits (``max_per_class`` applied)."""
    return _cap_per_class(y, cfg.max_per_class, cfg.seed) if cfg.max_per_class is not None else np.arange(len(y))


def check_listed(y: np.ndarray, classes: list[str], own: tuple[str, ...], cfg: PrepareConfig) -> None:
    """What makes training meaningless whatever the images hold, refused before they are decoded:
    fewer than two classes, or a class with fewer images than the splits carved from it.
    ``y``: (N,) labels of the training pool's files; ``own``: the splits the source has of its own
    ("val", "test"), not carved. Raises DataError naming the classes."""
    if len(classes) < 2:
        raise DataError(
            f"prepare: the dataset has {len(classes)} class ({', '.join(map(repr, classes)) or 'none'}); a "
            "classifier needs at least two: put each class's images in its own train/<class>/ folder"
        )
    counts = np.bincount(y[_pool(y, cfg)], minlength=len(classes))
    needed = len(_carved(own))
    short = [f"{classes[i]!r} ({n})" for i, n in enumerate(counts) if n < needed]
    if short:
        raise DataError(
            f"prepare: class(es) {', '.join(short[:10])} have fewer than {needed} images: each class needs at least "
            f"{needed}, one in each of {', '.join(_carved(own))}; add images or remove the class"
        )


def check_splits(parts: dict[str, np.ndarray], y: np.ndarray, classes: list[str], cfg: PrepareConfig) -> None:
    """Every class in every split carved from the pool: a class absent from val or test is never
    measured (and absent from train, never learnt). ``parts``: split -> indices into ``y``."""
    missing = [f"{classes[c]!r} has none in {s}" for s, idx in parts.items()
               for c in sorted(set(range(len(classes))) - set(y[idx].tolist()))]
    if missing:
        used = {k: f for k, f in (("val_fraction", cfg.val_fraction), ("test_fraction", cfg.test_fraction))
                if k.split("_")[0] in parts}
        want = math.ceil(1 / min(used.values())) if used else 1
        raise DataError(
            f"prepare: the stratified split leaves a class out of a split: {'; '.join(missing[:10])}; at "
            + " and ".join(f"prepare.{k} {f}" for k, f in used.items()) +
            f" every class needs about {want} images (1 / the smallest fraction): add images, raise the "
            "fraction, or remove the class"
        )


def check_images(x: np.ndarray, split: str) -> None:
    """Images a network cannot learn from: smaller than ``MIN_IMAGE_SIDE`` pixels, or one constant
    value in a channel over the whole split (std 0: normalisation would divide by zero)."""
    h, w = x.shape[2:]
    if min(h, w) < MIN_IMAGE_SIDE:
        raise DataError(f"prepare: the {split} images are {h}x{w} pixels, below {MIN_IMAGE_SIDE}; set "
                        f"prepare.image_size to resize them")
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    constant = [c for c in range(x.shape[1]) if flat[:, c].min() == flat[:, c].max()]
    if constant:
        hint = "" if len(constant) == x.shape[1] else "; if the images are grey, set prepare.channels: 1"
        raise DataError(f"prepare: every {split} image has the same value {int(flat[0, constant[0], 0])} in channel(s) "
                        f"{constant} (std 0): nothing to learn there, and normalising would divide by zero{hint}")


# ----------------------------------------------------------------------------------------------
# Splitting and statistics


def _cap_per_class(y: np.ndarray, cap: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(y == c))[:cap] for c in np.unique(y)]
    return np.sort(np.concatenate(keep))


def split_indices(
    y: np.ndarray, val_fraction: float | None, test_fraction: float | None, seed: int
) -> dict[str, np.ndarray]:
    """Deterministic stratified split of ``range(len(y))``; fractions are of the whole pool.
    ``test_fraction=None`` (``val_fraction=None``): no test (val) split is carved (the source has its own)."""
    idx = np.arange(len(y))
    _, per_class = np.unique(y, return_counts=True)
    needed = 1 + (val_fraction is not None) + (test_fraction is not None)
    if per_class.min() < needed:
        raise DataError(
            f"a class has only {per_class.min()} image(s); each needs at least {needed} to be "
            "split into train/val/test"
        )
    from sklearn.model_selection import train_test_split  # here: ~1 s of import every other stage skips

    out: dict[str, np.ndarray] = {}
    try:
        if test_fraction is not None:
            idx, out["test"] = train_test_split(idx, test_size=test_fraction, stratify=y, random_state=seed)
        if val_fraction is None:
            out["train"] = idx
        else:
            rel_val = val_fraction / (1.0 - (test_fraction or 0.0))
            out["train"], out["val"] = train_test_split(idx, test_size=rel_val, stratify=y[idx], random_state=seed)
    except ValueError as err:  # too few samples for a stratified split at these fractions
        raise DataError(f"cannot split {len(y)} images stratified by class: {err}") from err
    return {k: np.sort(v) for k, v in out.items()}


def channel_stats(x: np.ndarray, chunk: int = 256) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1], summed ``chunk`` images at a time
    in float64 (a float64 copy of the whole split would take 8 bytes per pixel: 3.6 GB for 5,000
    images at 224 px)."""
    total = np.zeros(x.shape[1])
    squares = np.zeros(x.shape[1])
    for i in range(0, len(x), chunk):
        v = x[i:i + chunk].astype(np.float64) / 255.0
        total += v.sum(axis=(0, 2, 3))
        squares += (v * v).sum(axis=(0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / n
    return mean.tolist(), np.sqrt(np.maximum(squares / n - mean * mean, 0.0)).tolist()


def _sha(x: np.ndarray, y: np.ndarray) -> str:
    h = hashlib.sha256(memoryview(np.ascontiguousarray(x)).cast("B"))  # no bytes copy of the split
    h.update(memoryview(np.ascontiguousarray(y)).cast("B"))
    return "sha256:" + h.hexdigest()


def prepare_splits(raw: RawImages, cfg: PrepareConfig) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
    """Split ``raw`` into train/val/test and describe the result in a meta dict. The dataset's shape
    is checked first (``check_listed``, ``check_splits``, ``check_images``): DataError, nothing split."""
    own_xy = {k: (x, y) for k, x, y in (("val", raw.val_x, raw.val_y), ("test", raw.test_x, raw.test_y))
              if x is not None}
    own = tuple(own_xy)
    check_listed(raw.train_y, raw.classes, own, cfg)  # again: skipped images may have emptied a class
    keep = np.arange(len(raw.train_y)) if raw.pooled else _pool(raw.train_y, cfg)
    pool_y = raw.train_y[keep]
    parts = split_indices(pool_y, None if "val" in own else cfg.val_fraction,
                          None if "test" in own else cfg.test_fraction, cfg.seed)
    check_splits(parts, pool_y, raw.classes, cfg)
    # one copy of the images per split, indexed from the source (not a copy of the pool first)
    splits = {k: (raw.train_x[keep[v]], pool_y[v]) for k, v in parts.items()}
    splits.update(own_xy)
    splits = {k: splits[k] for k in SPLITS}
    check_images(splits["train"][0], "train")
    mean, std = channel_stats(splits["train"][0])
    n_cls = len(raw.classes)
    meta = {
        "source": cfg.source,
        "classes": raw.classes,
        "num_classes": n_cls,
        "channels": int(splits["train"][0].shape[1]),
        "image_size": list(splits["train"][0].shape[2:]),
        "layout": "NCHW uint8; normalise as (x / 255 - mean) / std",
        "decode": DECODE_RULE,
        "max_image_pixels": cfg.max_image_pixels,
        "mean": mean,
        "std": std,
        "split_sizes": {k: int(len(v[1])) for k, v in splits.items()},
        "class_counts": {k: np.bincount(v[1], minlength=n_cls).tolist() for k, v in splits.items()},
        **_split_origins(own, cfg),
        "split_seed": cfg.seed,
        "source_hash": raw.source_hash,
        "split_hashes": {k: _sha(*v) for k, v in splits.items()},
        "skipped_corrupt": raw.skipped,
    }
    return splits, meta


def prepare_files(cfg: PrepareConfig, workers: int | None = None, batch_size: int = 64
                  ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
    """``prepare.storage: files``: list the image folder, split its file names as ``prepare_splits``
    splits images, and read every image once in its evaluation view (DataLoader workers): unreadable
    files are found now (DataError, or skipped with ``prepare.skip_corrupt``), and the training
    split's mean and std are summed batch by batch. Memory stays that of a few batches, whatever the
    dataset's size. Returns splits of (file names, labels) and the meta dict."""
    listed = list_imagefolder(cfg.root, check=lambda y, classes, own: check_listed(y, classes, own, cfg))
    own = tuple(s for s in ("val", "test") if s in listed.files)
    y = listed.labels["train"]
    keep = _pool(y, cfg)
    parts = split_indices(y[keep], None if "val" in own else cfg.val_fraction,
                          None if "test" in own else cfg.test_fraction, cfg.seed)
    check_splits(parts, y[keep], listed.classes, cfg)
    rows = {k: keep[v] for k, v in parts.items()}
    source = {k: "train" for k in rows}
    for k in own:
        rows[k], source[k] = np.arange(len(listed.labels[k])), k
    channels = cfg.channels or 3
    shorter = int(cfg.eval_shorter_side or 0)
    view = View(channels, int(cfg.image_size or 0), shorter, cfg.max_image_pixels)
    workers = default_workers() if workers is None else workers
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    digests: dict[str, list[bytes]] = {}
    failed: list[str] = []
    total, squares, pixels = np.zeros(channels), np.zeros(channels), 0
    for name in SPLITS:
        src, idx = source[name], rows[name]
        files = np.array([listed.files[src][i] for i in idx], dtype=np.str_)
        labels = listed.labels[src][idx]
        ok = np.ones(len(files), dtype=bool)
        split = FileSplit(listed.root, tuple(files), torch.from_numpy(labels), view, workers)
        done = 0
        for xb, errors in tqdm(split.scan(batch_size), desc=f"prepare {name}", unit="batch",
                               total=math.ceil(len(files) / batch_size), disable=not sys.stderr.isatty()):
            bad = [i for i, e in enumerate(errors) if e]
            failed += [errors[i] for i in bad]
            ok[[done + i for i in bad]] = False
            if name == "train":
                for i in range(len(errors)):  # image by image: a float64 copy of a batch at 224 px is 77 MB
                    if not errors[i]:
                        v = xb[i].double() / 255.0
                        total += v.sum(dim=(1, 2)).numpy()
                        squares += (v * v).sum(dim=(1, 2)).numpy()
                        pixels += v.shape[1] * v.shape[2]
            done += len(errors)
        splits[name] = (files[ok], labels[ok])
        digests[name] = [listed.digests[src][i] for i, keep_it in zip(idx, ok) if keep_it]
    if failed and not cfg.skip_corrupt:
        shown = "\n  ".join(failed[:20])
        raise DataError(f"{len(failed)} unreadable image(s) under {listed.root}:\n  {shown}"
                        f"{chr(10) + '  ...' if len(failed) > 20 else ''}\nFix or remove them, or set "
                        "prepare.skip_corrupt: true to skip them (counted in metrics).")
    if failed:  # skipped images may have emptied a class of a split
        every = np.concatenate([v[1] for v in splits.values()])
        ends = np.cumsum([len(v[1]) for v in splits.values()])
        check_splits({k: np.arange(end - len(v[1]), end) for (k, v), end in zip(splits.items(), ends)}, every,
                     listed.classes, cfg)
    mean = total / max(pixels, 1)
    std = np.sqrt(np.maximum(squares / max(pixels, 1) - mean * mean, 0.0))
    if (std == 0).any():
        raise DataError(f"prepare: every train image has one value in channel(s) {np.flatnonzero(std == 0).tolist()} "
                        "(std 0): nothing to learn there, and normalising would divide by zero")
    n_cls = len(listed.classes)
    meta = {
        "source": cfg.source,
        "storage": "files",
        "root": str(cfg.root),
        "classes": listed.classes,
        "num_classes": n_cls,
        "channels": channels,
        "image_size": [view.size, view.size],
        "shorter_side": shorter,
        "layout": (f"file names under root; decode, resize the shorter side to {shorter} (bilinear, antialias), "
                   f"centre crop {view.size}x{view.size}, normalise as (x / 255 - mean) / std"),
        "decode": DECODE_RULE,
        "max_image_pixels": cfg.max_image_pixels,
        "mean": mean.tolist(),
        "std": std.tolist(),
        "split_sizes": {k: int(len(v[1])) for k, v in splits.items()},
        "class_counts": {k: np.bincount(v[1], minlength=n_cls).tolist() for k, v in splits.items()},
        **_split_origins(own, cfg),
        "split_seed": cfg.seed,
        "source_hash": listed.source_hash,
        "split_hashes": {k: _files_sha(v[0], v[1], digests[k]) for k, v in splits.items()},
        "skipped_corrupt": failed,
    }
    return splits, meta


def _split_origins(own: tuple[str, ...], cfg: PrepareConfig) -> dict[str, str]:
    """meta's ``val_from`` and ``test_from``: the source's own folder, or the fraction carved from train."""
    return {f"{k}_from": f"source {k} split" if k in own else f"{f} of train, stratified"
            for k, f in (("val", cfg.val_fraction), ("test", cfg.test_fraction))}


def _files_sha(files: np.ndarray, y: np.ndarray, digests: list[bytes]) -> str:
    h = hashlib.sha256()
    for f, label, d in zip(files.tolist(), y.tolist(), digests):
        h.update(f"{f}\0{label}\0".encode() + d)
    return "sha256:" + h.hexdigest()


def save_prepared(out_dir: str | Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], meta: dict[str, Any]) -> None:
    """Write ``<split>.npz`` and ``meta.json`` into ``out_dir`` atomically (all or nothing). Splits
    of file names (``prepare_files``) are stored under the key ``files`` instead of ``x``."""
    with atomic_dir(out_dir) as tmp:
        for name, (x, y) in splits.items():
            np.savez(tmp / f"{name}.npz", **{"files" if x.dtype.kind == "U" else "x": x}, y=y)
        write_json(tmp / "meta.json", meta)


def holdout_split(raw: RawImages, cfg: PrepareConfig, per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``per_class`` images of every class from the source's training pool that
    ``prepare_splits`` with ``cfg`` did not take (``prepare.max_per_class`` leaves them out), drawn
    with ``seed``: a larger test set for benchmarks than the prepared one, which a small preset keeps
    small (1,000 images read a 0.5-point difference as noise). Raises DataError when the pool
    has no such image (``max_per_class`` null or at least the pool's class sizes)."""
    if per_class < 1:
        raise DataError(f"holdout: per_class must be at least 1, got {per_class}")
    if raw.pooled:
        raise DataError("holdout: the source was read with only its training pool; read it with load_source(cfg, "
                        "whole=True)")
    used = _pool(raw.train_y, cfg)
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
        files = meta.get("storage") == "files"
        if files and not Path(meta["root"]).is_dir():
            raise DataError(f"prepared data in {data_dir} lists images under {meta['root']}, which is not a directory "
                            "here: the image folder must stay where the prepare stage read it (prepare.root)")
        splits: dict[str, AnySplit] = {}
        for s in SPLITS:
            with np.load(data_dir / f"{s}.npz", allow_pickle=False) as f:
                splits[s] = (file_split(meta["root"], f["files"], f["y"], meta) if files else
                             Split(torch.from_numpy(f["x"]), torch.from_numpy(f["y"]).long()))
    except (ValueError, OSError, KeyError) as err:  # bad JSON, truncated or foreign .npz
        raise DataError(f"prepared data in {data_dir} is unreadable ({err}); re-run the prepare stage") from err
    return PreparedData(splits["train"], splits["val"], splits["test"], meta)


# ----------------------------------------------------------------------------------------------
# Per-batch transforms


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 ``(x / 255 - mean) / std``; mean, std of shape (C,)."""
    return (x.float().div_(255.0) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


class Normalized:
    """A split's images normalised (``normalize``) only when rows are asked for: ``len`` and
    indexing by a slice or an index tensor, like the tensor ``normalize(split.take(), mean, std)``
    would give, without holding every image at once (a test split of 224 px files read from disk
    can be gigabytes as float32). Readers that go through it batch by batch (ONNX Runtime, the
    engines) hold one batch."""

    def __init__(self, split: Any, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.split, self.mean, self.std = split, mean, std

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, rows: slice | torch.Tensor) -> torch.Tensor:
        idx = torch.arange(len(self))[rows] if isinstance(rows, slice) else torch.as_tensor(rows)
        return normalize(self.split.take(idx), self.mean, self.std)


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
