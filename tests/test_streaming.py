"""Images read from disk as they are used (prepare.storage: files): the split, the views, training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.registry import build_model
from pipeline.config import OptimizerConfig, PrepareConfig, TrainConfig, validate_params
from pipeline.data import (
    Normalized,
    load_prepared,
    load_source,
    normalize,
    prepare_files,
    prepare_splits,
    save_prepared,
)
from pipeline.deploy import Preprocessing, preprocessing_spec
from pipeline.errors import ConfigError, DataError
from pipeline.predict import preprocess
from pipeline.streaming import FileSplit, eval_view
from pipeline.train import predict_logits, train_classifier

COLOURS = ((200, 40, 40), (40, 200, 40), (40, 40, 200))


def colour_folder(root: Path, per_class: int = 20, test: int = 0, seed: int = 0) -> Path:
    """root/train/<c>/*.jpg (and test/): one colour per class plus noise, every image another size
    (20 to 47 px, rarely square): the evaluation view must resize and crop."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("test", test)):
        for ci, colour in enumerate(COLOURS):
            for i in range(n):
                h, w = rng.integers(20, 48, 2)
                px = np.clip(np.array(colour)[None, None] + rng.normal(0, 50, (h, w, 3)), 0, 255).astype(np.uint8)
                path = root / split / f"c{ci}" / f"{i:03d}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(px).save(path)
    return root


def files_cfg(root: Path, **kw: object) -> PrepareConfig:
    return PrepareConfig(source="imagefolder", root=str(root), storage="files", image_size=16, **kw)


def test_files_split_like_memory_and_statistics_of_the_evaluation_view(tmp_path: Path) -> None:
    """Same stratified split (same labels, same order) as the in-memory path; mean and std are the
    training split's evaluation views' (computed here from the images directly)."""
    root = colour_folder(tmp_path / "imgs")
    cfg = files_cfg(root)
    splits, meta = prepare_files(cfg, workers=0)
    mem, _ = prepare_splits(load_source(PrepareConfig(source="imagefolder", root=str(root), image_size=16)), cfg)
    for s in ("train", "val", "test"):
        assert np.array_equal(splits[s][1], mem[s][1])
    assert meta["storage"] == "files" and meta["shorter_side"] == 18 and meta["image_size"] == [16, 16]
    views = torch.stack([eval_view(torch.tensor(np.asarray(Image.open(root / f).convert("RGB"))).permute(2, 0, 1),
                                   18, 16) for f in splits["train"][0]]).double() / 255
    assert meta["mean"] == pytest.approx(views.mean(dim=(0, 2, 3)).tolist(), abs=1e-9)
    assert meta["std"] == pytest.approx(views.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-9)
    # with workers: the same bytes
    again, meta2 = prepare_files(cfg, workers=2)
    assert meta2["split_hashes"] == meta["split_hashes"] and meta2["mean"] == meta["mean"]


def test_load_prepared_gives_file_splits_read_in_workers(tmp_path: Path) -> None:
    root = colour_folder(tmp_path / "imgs", test=4)
    splits, meta = prepare_files(files_cfg(root), workers=0)
    save_prepared(tmp_path / "prep", splits, meta)
    data = load_prepared(tmp_path / "prep")
    assert isinstance(data.train, FileSplit) and len(data.test) == 12  # the folder's own test/
    rows = data.test.take()
    assert rows.dtype == torch.uint8 and rows.shape == (12, 3, 16, 16)
    streamed = torch.cat([x for x, _ in data.test.batches(5)])
    assert torch.equal(streamed, rows)  # DataLoader workers and threads decode alike
    assert torch.equal(data.test.take(torch.tensor([3, 1])), rows[[3, 1]])
    # export and engine read the test split through Normalized: rows as the whole normalised tensor's
    mean, std = data.norm()
    whole, lazy = normalize(rows, mean, std), Normalized(data.test, mean, std)
    assert len(lazy) == 12 and torch.equal(lazy[5:9], whole[5:9]) and torch.equal(lazy[10:99], whole[10:])
    assert torch.equal(lazy[torch.arange(3) % 2], whole[[0, 1, 0]])


def test_predict_preprocesses_exactly_as_the_training_data(tmp_path: Path) -> None:
    """The bundle's preprocessing (shorter side, centre crop, mean, std) applied by pipeline.predict
    gives the very tensors the pipeline evaluated on."""
    root = colour_folder(tmp_path / "imgs", test=3)
    splits, meta = prepare_files(files_cfg(root), workers=0)
    save_prepared(tmp_path / "prep", splits, meta)
    data = load_prepared(tmp_path / "prep")
    pre = Preprocessing.model_validate(preprocessing_spec(meta))
    assert pre.shorter_side == 18
    got = preprocess([root / f for f in splits["test"][0]], pre)
    mean, std = data.norm()
    want = (data.test.take().float() / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-6)


def test_training_streams_with_random_resized_crops_and_learns(tmp_path: Path) -> None:
    """train.augment random_resized_crop on a FileSplit: the network learns the colours, and the
    same seed and worker count draw the same crops (identical weights)."""
    root = colour_folder(tmp_path / "imgs", per_class=24)
    splits, meta = prepare_files(files_cfg(root), workers=0)
    save_prepared(tmp_path / "prep", splits, meta)
    cfg = TrainConfig(augment="random_resized_crop", crop_scale=(0.3, 1.0), batch_size=16, workers=2, progress=False)

    def run() -> tuple[torch.nn.Module, float]:
        torch.manual_seed(0)
        model = build_model("resnet_tiny", num_classes=3, in_channels=3)
        res = train_classifier(model, load_prepared(tmp_path / "prep"), cfg, OptimizerConfig(lr=0.05), epochs=3,
                               seed=0, device=torch.device("cpu"))
        return model, res.best_val_acc

    a, acc = run()
    b, _ = run()
    assert acc > 0.9  # chance is 1/3: colours are easy once the pipeline feeds real images
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    data = load_prepared(tmp_path / "prep")
    assert predict_logits(a, data.val, *data.norm(), torch.device("cpu")).shape == (len(data.val), 3)


def test_unreadable_images_are_named_or_skipped(tmp_path: Path) -> None:
    root = colour_folder(tmp_path / "imgs")
    bad = root / "train" / "c1" / "005.jpg"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    with pytest.raises(DataError, match=r"(?s)1 unreadable image.*005\.jpg.*skip_corrupt"):
        prepare_files(files_cfg(root), workers=0)
    splits, meta = prepare_files(files_cfg(root, skip_corrupt=True), workers=0)
    assert len(meta["skipped_corrupt"]) == 1 and "005.jpg" in meta["skipped_corrupt"][0]
    assert not any("c1/005.jpg" in f for s in splits.values() for f in s[0].tolist())


def test_a_folder_changed_after_prepare_is_named(tmp_path: Path) -> None:
    root = colour_folder(tmp_path / "imgs")
    splits, meta = prepare_files(files_cfg(root), workers=0)
    save_prepared(tmp_path / "prep", splits, meta)
    (root / splits["val"][0][0]).unlink()
    data = load_prepared(tmp_path / "prep")
    with pytest.raises(DataError, match="changed since the prepare stage"):
        data.val.take()


def test_files_storage_refusals(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="storage: files reads an image folder"):
        PrepareConfig(source="digits", storage="files")
    with pytest.raises(ValueError, match="shorter_side 12 is below image_size 16"):
        files_cfg(tmp_path, shorter_side=12)
    archive = tmp_path / "imgs.tar"
    archive.write_bytes(b"")
    with pytest.raises(DataError, match="is an archive"):
        prepare_files(files_cfg(archive), workers=0)
    with pytest.raises(ConfigError, match="train.augment: random_resized_crop .* needs prepare.storage: files"):
        validate_params({"prepare": {"source": "digits"}, "train": {"augment": "random_resized_crop"}})
