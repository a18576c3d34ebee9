"""Data preparation: splits, image folders (directory and archive), bad inputs, augmentation."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import (
    augment_batch,
    channel_stats,
    check_splits,
    holdout_split,
    load_prepared,
    load_source,
    load_split,
    normalize,
    prepare_splits,
    save_prepared,
    split_indices,
)
from pipeline.errors import DataError
from tests.conftest import make_imagefolder, prepare_cfg, write_image


def test_split_is_deterministic_disjoint_and_stratified() -> None:
    y = np.repeat(np.arange(5), 40)
    a = split_indices(y, 0.2, 0.1, seed=3)
    b = split_indices(y, 0.2, 0.1, seed=3)
    c = split_indices(y, 0.2, 0.1, seed=4)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    sets = [set(a[k].tolist()) for k in ("train", "val", "test")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set().union(*sets) == set(range(len(y)))
    assert np.bincount(y[a["test"]]).tolist() == [4] * 5  # 10% of each class
    assert np.bincount(y[a["val"]]).tolist() == [8] * 5


def test_digits_prepared(digits) -> None:  # noqa: ANN001
    m = digits.meta
    assert m["num_classes"] == 10 and m["channels"] == 1 and m["image_size"] == [8, 8]
    assert sum(m["split_sizes"].values()) == 1797
    assert digits.train.x.dtype == torch.uint8 and digits.train.x.shape[1:] == (1, 8, 8)
    mean, std = channel_stats(digits.train.x.numpy())
    assert m["mean"] == pytest.approx(mean) and 0 < m["std"][0] < 1


def test_digits_prepare_is_reproducible(tmp_path: Path) -> None:
    cfg = prepare_cfg(image_size=16, seed=5)
    _, m1 = prepare_splits(load_source(cfg), cfg)
    _, m2 = prepare_splits(load_source(cfg), cfg)
    assert m1["split_hashes"] == m2["split_hashes"] and m1["image_size"] == [16, 16]


def test_imagefolder_directory_without_test(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "ds", per_class=10)
    cfg = prepare_cfg(source="imagefolder", root=str(root), image_size=None, val_fraction=0.2, test_fraction=0.2)
    raw = load_source(cfg)
    assert raw.classes == ["cat", "dog", "eel"] and raw.train_x.shape == (30, 3, 12, 12)
    splits, meta = prepare_splits(raw, cfg)
    assert meta["split_sizes"] == {"train": 18, "val": 6, "test": 6}
    save_prepared(tmp_path / "out", splits, meta)
    data = load_prepared(tmp_path / "out")
    assert data.meta["classes"] == ["cat", "dog", "eel"] and len(data.test) == 6


def test_imagefolder_with_test_folder_and_resize(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "ds", per_class=6, splits=("train", "test"), size=20, fmt="PNG")
    cfg = prepare_cfg(source="imagefolder", root=str(root), image_size=10, channels=1)
    splits, meta = prepare_splits(load_source(cfg), cfg)
    assert meta["split_sizes"]["test"] == 18 and meta["test_from"] == "source test split"
    assert splits["train"][0].shape[1:] == (1, 10, 10)


def test_imagefolder_with_its_own_val_folder_in_memory_and_on_disk(tmp_path: Path) -> None:
    """A val/ folder is the validation split as it is (a trained model has seen its train/ folder:
    a val carved from it would measure memorised images); train/ is not carved at all."""
    from pipeline.data import prepare_files

    root = make_imagefolder(tmp_path / "ds", per_class=6, splits=("train", "val", "test"), size=12)
    (root / "val" / "cat" / "000.jpg").unlink()  # val's own size, not a fraction of train
    cfg = prepare_cfg(source="imagefolder", root=str(root), image_size=8)
    splits, meta = prepare_splits(load_source(cfg), cfg)
    assert meta["split_sizes"] == {"train": 18, "val": 17, "test": 18}
    assert meta["val_from"] == "source val split" and meta["test_from"] == "source test split"
    files, fmeta = prepare_files(prepare_cfg(source="imagefolder", root=str(root), image_size=8, storage="files"),
                                 workers=0)
    assert fmeta["split_sizes"] == meta["split_sizes"]
    assert all(f.startswith("val/") for f in files["val"][0]) and not any(f.startswith("val/") for f in files["train"][0])
    (root / "val" / "cow").mkdir()
    (root / "val" / "cat").rename(root / "val" / "cow" / "x")
    with pytest.raises(DataError, match="class folders differ between train and val"):
        load_source(cfg)


def test_imagefolder_tar_archive_matches_directory(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "ds", per_class=5)
    archive = tmp_path / "ds.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / "train", arcname="train")
    a = load_source(prepare_cfg(source="imagefolder", root=str(root), image_size=None))
    b = load_source(prepare_cfg(source="imagefolder", root=str(archive), image_size=None))
    assert a.classes == b.classes
    order_a, order_b = np.lexsort((a.train_x.reshape(15, -1).sum(1), a.train_y)), np.lexsort((b.train_x.reshape(15, -1).sum(1), b.train_y))
    np.testing.assert_array_equal(a.train_x[order_a], b.train_x[order_b])


def test_missing_root_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="prepare.root: .*does not exist"):
        load_source(prepare_cfg(source="imagefolder", root=str(tmp_path / "nope")))


def test_empty_class_folder_is_an_error(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "ds", per_class=4)
    (root / "train" / "fox").mkdir()
    (root / "train" / "fox" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="empty class folder.*train/fox"):
        load_source(prepare_cfg(source="imagefolder", root=str(root), image_size=None))


def test_mismatched_train_test_classes_are_an_error(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "ds", per_class=4, splits=("train", "test"))
    write_image(root / "test" / "fox" / "000.jpg", fmt="JPEG")
    with pytest.raises(DataError, match=r"only in test: \['fox'\]"):
        load_source(prepare_cfg(source="imagefolder", root=str(root), image_size=None))


def _corrupt(root: Path) -> Path:
    bad = root / "train" / "dog" / "broken.jpg"
    good = (root / "train" / "dog" / "000.jpg").read_bytes()
    bad.write_bytes(good[: len(good) // 3])  # truncated JPEG
    (root / "train" / "cat" / "garbage.png").write_bytes(b"\x89PNG not really")
    return bad


def test_corrupt_images_are_listed(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "ds", per_class=4)
    _corrupt(root)
    with pytest.raises(DataError) as err:
        load_source(prepare_cfg(source="imagefolder", root=str(root), image_size=None))
    msg = str(err.value)
    assert "2 unreadable image(s)" in msg and "broken.jpg" in msg and "garbage.png" in msg
    assert "prepare.skip_corrupt" in msg


def test_corrupt_images_skipped_when_allowed(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "ds", per_class=4)
    _corrupt(root)
    cfg = prepare_cfg(source="imagefolder", root=str(root), image_size=None, skip_corrupt=True,
                      val_fraction=0.25, test_fraction=0.25)
    raw = load_source(cfg)
    assert len(raw.skipped) == 2 and len(raw.train_y) == 12
    _, meta = prepare_splits(raw, cfg)
    assert len(meta["skipped_corrupt"]) == 2


def test_mixed_sizes_need_image_size(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "ds", per_class=4)
    write_image(root / "train" / "cat" / "big.jpg", size=16, fmt="JPEG")
    with pytest.raises(DataError, match="set prepare.image_size"):
        load_source(prepare_cfg(source="imagefolder", root=str(root), image_size=None))


def test_too_few_images_per_class(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "ds", per_class=2)
    with pytest.raises(DataError, match="at least 3"):
        cfg = prepare_cfg(source="imagefolder", root=str(root), image_size=None)
        prepare_splits(load_source(cfg), cfg)


def test_load_prepared_names_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing .*train.npz.*run the prepare stage"):
        load_prepared(tmp_path)


def test_augment_batch_is_a_padded_crop_or_its_mirror() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    out = augment_batch(x, 2, gen)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2,) * 4)
    for b in range(2):
        candidates = [padded[b, :, i : i + 6, j : j + 6] for i in range(5) for j in range(5)]
        assert any(torch.equal(out[b], c) or torch.equal(out[b], c.flip(2)) for c in candidates)
    # Different seeds give different crops somewhere in a larger batch.
    big = torch.rand(64, 1, 8, 8)
    a = augment_batch(big, 4, torch.Generator().manual_seed(1))
    b = augment_batch(big, 4, torch.Generator().manual_seed(2))
    assert not torch.equal(a, b)


def test_normalize() -> None:
    x = torch.full((1, 2, 2, 2), 255, dtype=torch.uint8)
    out = normalize(x, torch.tensor([0.5, 1.0]), torch.tensor([0.25, 1.0]))
    assert torch.allclose(out[0, 0], torch.full((2, 2), 2.0)) and torch.allclose(out[0, 1], torch.zeros(2, 2))


@pytest.mark.parametrize("source", ["cifar10", "cifar100"])
def test_cifar_missing_without_download_is_a_clear_error(tmp_path: Path, source: str) -> None:
    with pytest.raises(DataError, match=f"prepare.root: {source} not found .*prepare.download: true"):
        load_source(prepare_cfg(source=source, root=str(tmp_path), image_size=None))
    assert list(tmp_path.iterdir()) == []  # nothing downloaded or half-written


def test_holdout_is_the_source_images_the_prepare_stage_left_out(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "ds", per_class=10)
    cfg = prepare_cfg(source="imagefolder", root=str(root), image_size=None, max_per_class=6,
                      val_fraction=0.2, test_fraction=0.2)
    raw = load_source(cfg, whole=True)  # every image decoded: the holdout draws from outside the pool
    splits, _ = prepare_splits(raw, cfg)
    used = {x.tobytes() for name in ("train", "val", "test") for x in splits[name][0]}
    assert len(used) == 3 * 6
    x, y = holdout_split(raw, cfg, per_class=3)
    assert np.bincount(y).tolist() == [3, 3, 3] and not used & {i.tobytes() for i in x}
    x, y = holdout_split(raw, cfg, per_class=100)  # only 4 per class are left
    assert np.bincount(y).tolist() == [4, 4, 4] and not used & {i.tobytes() for i in x}
    a, _ = holdout_split(raw, cfg, per_class=2, seed=1)
    b, _ = holdout_split(raw, cfg, per_class=2, seed=1)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(DataError, match="max_per_class is None"):
        holdout_split(raw, prepare_cfg(source="imagefolder", root=str(root), image_size=None), per_class=3)
    with pytest.raises(DataError, match="per_class must be at least 1"):
        holdout_split(raw, cfg, per_class=0)


def test_load_split_checks_the_file_against_the_prepared_data(tmp_path: Path, digits_dir: Path) -> None:
    data = load_prepared(digits_dir)
    good = tmp_path / "good.npz"
    np.savez(good, x=data.test.x.numpy(), y=data.test.y.numpy())
    split = load_split(good, data.meta)
    assert torch.equal(split.x, data.test.x) and torch.equal(split.y, data.test.y)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=data.test.x.numpy()[:, :, :4], y=data.test.y.numpy())
    with pytest.raises(DataError, match=r"bad\.npz: x must be uint8 of shape \(N, 1, 8, 8\)"):
        load_split(bad, data.meta)
    np.savez(bad, x=data.test.x.numpy(), y=data.test.y.numpy() + 10)
    with pytest.raises(DataError, match=r"labels must lie in \[0, 9\]"):
        load_split(bad, data.meta)
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(DataError, match="junk.npz: not a split file"):
        load_split(tmp_path / "junk.npz", data.meta)


# ----------------------------------------------------------------------------------------------
# The dataset's shape, checked before any image is decoded; hidden files; the pixel limit


def _folder_cfg(root: Path, **kw: object):  # noqa: ANN202
    return prepare_cfg(source="imagefolder", root=str(root), image_size=None, **kw)


def test_one_class_is_refused_before_decoding(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "ds", classes=("cat",), per_class=10)
    (root / "train" / "cat" / "bad.jpg").write_bytes(b"not a jpeg")  # decoding would fail first otherwise
    with pytest.raises(DataError, match=r"the dataset has 1 class \('cat'\); a classifier needs at least two"):
        load_source(_folder_cfg(root))


def test_a_class_too_small_for_the_splits_is_named(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "ds", per_class=6)
    for f in sorted((root / "train" / "eel").iterdir())[2:]:
        f.unlink()
    (root / "train" / "dog" / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"class\(es\) 'eel' \(2\) have fewer than 3 images.*train, val, test"):
        load_source(_folder_cfg(root))
    cfg = _folder_cfg(root, max_per_class=2)  # the cap is applied before the count
    with pytest.raises(DataError, match=r"'cat' \(2\), 'dog' \(2\), 'eel' \(2\) have fewer than 3"):
        load_source(cfg)


def test_a_split_without_some_class_is_refused(tmp_path: Path) -> None:
    y = np.repeat([0, 1, 2], [40, 40, 3])
    cfg = prepare_cfg(val_fraction=0.1, test_fraction=0.1)
    parts = split_indices(y, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    left_out = [s for s, idx in parts.items() if 2 not in y[idx]]
    assert left_out, "the example must leave the small class out of a split"
    with pytest.raises(DataError, match=rf"'c' has none in {left_out[0]}.*about 10 images"):
        check_splits(parts, y, ["a", "b", "c"], cfg)


def test_constant_images_are_refused(tmp_path: Path) -> None:
    from PIL import Image

    for c in ("a", "b"):
        for i in range(6):
            (tmp_path / "ds" / "train" / c).mkdir(parents=True, exist_ok=True)
            Image.new("L", (8, 8), 7).save(tmp_path / "ds" / "train" / c / f"{i}.png")
    cfg = _folder_cfg(tmp_path / "ds", val_fraction=0.2, test_fraction=0.2, channels=1)
    with pytest.raises(DataError, match=r"every train image has the same value 7 in channel\(s\) \[0\] \(std 0\)"):
        prepare_splits(load_source(cfg), cfg)


def test_hidden_files_and_folders_are_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_imagefolder(tmp_path / "ds", per_class=10)
    clean = load_source(_folder_cfg(root))
    for c in ("cat", "dog"):
        (root / "train" / c / "._000.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    (root / "train" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    write_image(root / "train" / ".ipynb_checkpoints" / "x.jpg", fmt="JPEG")
    write_image(root / "train" / "eel" / ".cache" / "y.jpg", fmt="JPEG")
    raw = load_source(_folder_cfg(root))
    assert raw.classes == ["cat", "dog", "eel"] and not raw.skipped
    np.testing.assert_array_equal(raw.train_x, clean.train_x)
    assert "3 hidden file(s)" in caplog.text
    archive = tmp_path / "ds.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(root / "train", arcname="train")
    assert load_source(_folder_cfg(archive)).classes == ["cat", "dog", "eel"]


def test_a_class_of_only_apple_double_files_is_empty(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "ds", per_class=10)
    (root / "train" / "fox").mkdir()
    (root / "train" / "fox" / "._000.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    with pytest.raises(DataError, match=r"empty class folder\(s\).*train/fox; skipped there: 1 hidden file"):
        load_source(_folder_cfg(root))


def test_pixel_limit_names_the_param_and_can_be_raised(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "ds", per_class=10, size=12)
    with pytest.raises(DataError) as err:
        load_source(_folder_cfg(root, max_image_pixels=143))
    msg = str(err.value)
    assert "30 unreadable image(s)" in msg and "(too large: 30)" in msg
    assert "12 x 12 = 144 pixels, over the limit of 143; if the image is genuine, raise prepare.max_image_pixels" in msg
    cfg = _folder_cfg(root, max_image_pixels=144)
    _, meta = prepare_splits(load_source(cfg), cfg)
    assert meta["max_image_pixels"] == 144 and meta["decode"].startswith("slimdeploy-decode/1:")


def test_unreadable_images_are_listed_with_their_cause(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "ds", per_class=6)
    _corrupt(root)
    (root / "train" / "eel" / "notes.png").write_text("hello")
    with pytest.raises(DataError) as err:
        load_source(_folder_cfg(root))
    msg = str(err.value)
    assert "3 unreadable image(s)" in msg and "(not an image: 2, truncated: 1)" in msg
    assert "train/dog/broken.jpg: truncated:" in msg and "train/eel/notes.png: not an image:" in msg


@pytest.mark.parametrize("archive", [False, True])
def test_only_the_training_pool_is_decoded_and_the_splits_are_the_same(tmp_path: Path, archive: bool) -> None:
    # prepare.max_per_class: the images outside the pool are hashed but not decoded (memory), and the
    # splits are exactly those of decoding everything and then taking the pool
    root = make_imagefolder(tmp_path / "ds", per_class=12)
    if archive:
        with tarfile.open(tmp_path / "ds.tar.gz", "w:gz") as tar:
            tar.add(root / "train", arcname="train")
        root = tmp_path / "ds.tar.gz"
    cfg = prepare_cfg(source="imagefolder", root=str(root), image_size=None, max_per_class=5)
    pooled, whole = load_source(cfg), load_source(cfg, whole=True)
    assert pooled.pooled and len(pooled.train_y) == 15 and len(whole.train_y) == 36
    assert pooled.source_hash == whole.source_hash
    a, meta_a = prepare_splits(pooled, cfg)
    b, meta_b = prepare_splits(whole, cfg)
    assert meta_a == meta_b
    for split in a:
        assert np.array_equal(a[split][0], b[split][0]) and np.array_equal(a[split][1], b[split][1])
    with pytest.raises(DataError, match="whole=True"):
        holdout_split(pooled, cfg, per_class=1)
