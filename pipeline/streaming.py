"""Images read from disk as they are used (``prepare.storage: files``): the prepared splits hold file
names and labels, not pixels, so a dataset may be larger than memory.

Two views of an image, both torchvision transforms on the uint8 tensor that ``pipeline.images``
decodes (one decoding rule everywhere):

- evaluation (``eval_view``): resize the shorter side to ``shorter`` pixels (bilinear, antialiased),
  then the centre ``size`` x ``size`` crop. ``pipeline.predict`` applies this same function, so a
  bundle's preprocessing is the training data's, byte for byte.
- training (``train_view``): torchvision's RandomResizedCrop to ``size`` (area fraction
  ``train.crop_scale``) and a random horizontal flip.

Training batches are decoded in DataLoader worker processes (``loader``); the random crops are drawn
from the DataLoader's seeded generator, so a run with the same seed and worker count draws the same
crops. Other readers (a batch of importance samples, a split's evaluation) decode in threads
(``FileSplit.take``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.errors import DataError
from pipeline.images import ImageError, decode_image

_tv_functional = None
_tv_v2 = None


def _tvf():  # noqa: ANN202  (torchvision.transforms.v2.functional, imported once, lazily)
    global _tv_functional, _tv_v2
    if _tv_functional is None:
        from models.tvcompat import import_torchvision

        import_torchvision()
        from torchvision.transforms import v2
        from torchvision.transforms.v2 import functional

        _tv_functional, _tv_v2 = functional, v2
    return _tv_functional


def default_workers() -> int:
    """One DataLoader worker per CPU core this process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def eval_view(img: torch.Tensor, shorter: int, size: int) -> torch.Tensor:
    """uint8 (C, H, W) -> (C, size, size): shorter side resized to ``shorter`` (bilinear, antialias),
    then the centre crop. What evaluation, the engine and ``pipeline.predict`` all apply."""
    f = _tvf()
    img = f.resize(img, [shorter], interpolation=f.InterpolationMode.BILINEAR, antialias=True)
    return f.center_crop(img, [size, size])


def train_view(img: torch.Tensor, size: int, scale: tuple[float, float]) -> torch.Tensor:
    """uint8 (C, H, W) -> (C, size, size): torchvision's RandomResizedCrop (area ``scale``, aspect
    3/4..4/3) and RandomHorizontalFlip, drawing from torch's global generator (seeded per worker)."""
    f = _tvf()  # once per process, not per image
    top, left, h, w = _tv_v2.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3])  # type: ignore[union-attr]
    img = f.resized_crop(img, top, left, h, w, [size, size], interpolation=f.InterpolationMode.BILINEAR,
                         antialias=True)
    return f.horizontal_flip(img) if torch.rand(()) < 0.5 else img


@dataclass(frozen=True)
class View:
    """How a file becomes a network input: channels, the input size, the evaluation view's shorter
    side, the decoding limit; ``crop_scale`` set: the training view instead."""

    channels: int
    size: int
    shorter: int
    max_pixels: int
    crop_scale: tuple[float, float] | None = None

    def __call__(self, path: Path) -> torch.Tensor:
        img = torch.tensor(decode_image(path, self.channels, None, max_pixels=self.max_pixels,  # a copy: writable
                                        name=str(path), limit_hint="prepare.max_image_pixels"))
        if self.crop_scale is not None:
            return train_view(img, self.size, self.crop_scale)
        return eval_view(img, self.shorter, self.size)


class _Files(Dataset):
    """(image, label, error) per file: a file that cannot be read gives a blank image and its error
    (raised by the reader in the main process, naming the file, not as a worker's traceback)."""

    def __init__(self, root: Path, files: Sequence[str], labels: torch.Tensor, view: View) -> None:
        self.root, self.files, self.labels, self.view = root, files, labels, view
        _tvf()  # imported here, before DataLoader workers fork: each would import torchvision again

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        try:
            return self.view(self.root / self.files[i]), int(self.labels[i]), ""
        except ImageError as err:
            blank = torch.zeros((self.view.channels, self.view.size, self.view.size), dtype=torch.uint8)
            return blank, -1, str(err)


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # workers decode; the training process owns the cores' math


def _raise_unreadable(errors: Sequence[str], root: Path) -> None:
    bad = [e for e in errors if e]
    if bad:
        raise DataError(f"{len(bad)} image(s) under {root} cannot be read now, though prepare read them: "
                        f"{bad[0]}{' ...' if len(bad) > 1 else ''}; the folder changed since the prepare stage: "
                        "run `dvc repro` (prepare hashes every file and re-runs)")


@dataclass(frozen=True)
class FileSplit:
    """A split of image files: ``files`` relative to ``root``, labels ``y``. The interface of
    ``pipeline.data.Split`` that readers use (``len``, ``y``, ``take``, ``batches``)."""

    root: Path
    files: tuple[str, ...]
    y: torch.Tensor
    view: View
    workers: int

    def __len__(self) -> int:
        return len(self.files)

    def take(self, idx: torch.Tensor | Sequence[int] | None = None, train: bool = False) -> torch.Tensor:
        """uint8 (len(idx), C, size, size) of these rows (every row: None), the evaluation view
        (``train``: the training view), decoded in threads."""
        rows = range(len(self)) if idx is None else [int(i) for i in idx]
        ds = self._dataset(train)
        threads = max(1, self.workers)
        with ThreadPoolExecutor(threads) as pool:
            got = list(pool.map(ds.__getitem__, rows))
        _raise_unreadable([g[2] for g in got], self.root)
        if not got:
            return torch.empty((0, self.view.channels, self.view.size, self.view.size), dtype=torch.uint8)
        return torch.stack([g[0] for g in got])

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images, labels) in order, evaluation view, decoded in DataLoader workers."""
        yield from self.loader(self._in_order(batch_size), train=False, seed=0)

    def scan(self, batch_size: int) -> Iterator[tuple[torch.Tensor, list[str]]]:
        """(uint8 images, per-row error or "") in order, evaluation view: what ``prepare`` reads once
        to find unreadable files and measure the statistics. An unreadable row is blank."""
        for x, _, errors in self._decoded(self._in_order(batch_size), False, 0, self.workers):
            yield x, list(errors)

    def loader(self, batches: Sequence[Sequence[int]], train: bool, seed: int,
               workers: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images, labels) for each list of rows in ``batches``, decoded in ``workers``
        DataLoader processes (default: the split's); ``train``: the training view, its random draws
        seeded by ``seed``."""
        for x, y, errors in self._decoded(batches, train, seed, self.workers if workers is None else workers):
            _raise_unreadable(errors, self.root)
            yield x, y

    def _in_order(self, batch_size: int) -> list[list[int]]:
        return [list(range(i, min(i + batch_size, len(self)))) for i in range(0, len(self), batch_size)]

    def _decoded(self, batches: Sequence[Sequence[int]], train: bool, seed: int, workers: int) -> DataLoader:
        """(images, labels, errors) per batch of rows, decoded in ``workers`` DataLoader processes."""
        return DataLoader(self._dataset(train), batch_sampler=batches, num_workers=workers,
                          generator=torch.Generator().manual_seed(seed), worker_init_fn=_one_thread if workers else None,
                          prefetch_factor=2 if workers else None)

    def _dataset(self, train: bool) -> _Files:
        view = self.view if train else View(self.view.channels, self.view.size, self.view.shorter,
                                            self.view.max_pixels)
        if train and view.crop_scale is None:
            raise ValueError("FileSplit: no training view (crop_scale) was given")
        return _Files(self.root, self.files, self.y, view)

    def with_training_view(self, crop_scale: tuple[float, float], workers: int | None = None) -> FileSplit:
        """This split with the training view's crop scale (``train.crop_scale``) and ``workers``."""
        v = self.view
        return FileSplit(self.root, self.files, self.y, View(v.channels, v.size, v.shorter, v.max_pixels, crop_scale),
                         self.workers if workers is None else workers)


def file_split(root: str | Path, files: np.ndarray, y: np.ndarray, meta: dict) -> FileSplit:
    """A ``FileSplit`` from a prepared split's arrays and the prepared data's ``meta``."""
    size = int(meta["image_size"][0])
    view = View(int(meta["channels"]), size, int(meta["shorter_side"]), int(meta["max_image_pixels"]))
    return FileSplit(Path(root), tuple(str(f) for f in files), torch.from_numpy(y).long(), view, default_workers())
