"""Data sources (CIFAR-10 pickles, image folders, digits, synthetic), augmentation and sharding."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fastblocks.train.data import (
    DataError,
    ShardedBatches,
    load_data,
    random_crop,
    random_hflip,
    random_resized_crop,
    read_cifar_batch,
    sample_uniform,
)
from tests.train.conftest import requires_sklearn


def write_cifar_batch(path: Path, n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """A batch file in the real CIFAR-10 python format: pickled dict with bytes keys, data [N, 3072] uint8."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, n)]
    d = {b"batch_label": b"fake", b"labels": labels, b"data": data, b"filenames": [b"x.png"] * n}
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)
    return data, labels


def test_read_cifar_batches(tmp_path: Path) -> None:
    for i, n in enumerate((3, 5)):
        data, labels = write_cifar_batch(tmp_path / f"data_batch_{i + 1}", n, i)
        x, y = read_cifar_batch(tmp_path / f"data_batch_{i + 1}")
        assert x.shape == (n, 3, 32, 32) and x.dtype == torch.uint8 and y.tolist() == labels
        # Row-major 3072 = 3 planes (R, G, B) of 32x32: the first 1024 values are the red plane.
        assert torch.equal(x[0, 0].flatten(), torch.from_numpy(data[0, :1024]))
        assert torch.equal(x[-1, 2, 31], torch.from_numpy(data[-1, 2048 + 31 * 32 :]))


def test_load_cifar10_and_errors(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for i in range(1, 6):
        write_cifar_batch(root / f"data_batch_{i}", 2, i)
    with pytest.raises(DataError, match=r"missing file .*test_batch"):
        load_data(f"cifar10:{tmp_path}")
    write_cifar_batch(root / "test_batch", 4, 9)
    train, test = load_data(f"cifar10:{tmp_path}")  # the parent of cifar-10-batches-py works too
    assert (len(train), len(test), train.num_classes) == (10, 4, 10)
    x, y = train.batch(torch.arange(10), train=True, seed=0, epoch=0)
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (10,)
    small, _ = load_data(f"cifar10:{root}", image_size=16)
    assert small.batch(torch.arange(2), train=False)[0].shape == (2, 3, 16, 16)
    (root / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DataError, match="data_batch_3 is not a CIFAR python batch"):
        load_data(f"cifar10:{root}")
    with open(root / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DataError, match=r"'data' must be uint8 \[N, 3072\]"):
        load_data(f"cifar10:{root}")


def test_imagefolder(tmp_path: Path) -> None:
    image_mod = pytest.importorskip("PIL.Image", reason="imagefolder needs Pillow")
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 1)):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, (20 + 3 * i, 28, 3), dtype=np.uint8)
                image_mod.fromarray(arr).save(tmp_path / split / c / f"{i}.png")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    train, val = load_data(f"imagefolder:{tmp_path}", image_size=16)
    assert (len(train), len(val), train.num_classes) == (6, 2, 2)
    assert train.labels().tolist() == [0, 0, 0, 1, 1, 1] and val.labels().tolist() == [0, 1]
    x, _ = train.batch(torch.arange(6), train=True, seed=0, epoch=0)
    assert x.shape == (6, 3, 16, 16) and torch.isfinite(x).all()
    x, _ = val.batch(torch.arange(2), train=False)
    assert x.shape == (2, 3, 16, 16)
    # A corrupt image: the error names the file.
    (tmp_path / "val" / "dog" / "0.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=r"cannot read image .*dog.0\.png"):
        val.batch(torch.arange(2), train=False)


def test_imagefolder_errors(tmp_path: Path) -> None:
    pytest.importorskip("PIL", reason="imagefolder needs Pillow")
    with pytest.raises(DataError, match="is not a directory"):
        load_data(f"imagefolder:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match="must hold train/<class>/<image> and val"):
        load_data(f"imagefolder:{tmp_path}")
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match="has no class subfolders"):
        load_data(f"imagefolder:{tmp_path}")
    (tmp_path / "train" / "a").mkdir()
    with pytest.raises(DataError, match=r"class folder .* has no images"):
        load_data(f"imagefolder:{tmp_path}")


@requires_sklearn
def test_digits() -> None:
    train, test = load_data("digits")
    assert (len(train), len(test), train.num_classes, train.image_size) == (1500, 297, 10, 32)
    assert torch.bincount(train.labels(), minlength=10).min() > 100  # every class is there
    again, _ = load_data("digits")
    assert torch.equal(train.images, again.images)  # a fixed split
    x, _ = train.batch(torch.arange(64), train=False)
    assert x.shape == (64, 3, 32, 32)
    assert abs(float(x.mean())) < 0.2 and 0.7 < float(x.std()) < 1.3  # normalized with the train statistics
    small, _ = load_data("digits", image_size=16)
    assert small.images.shape[1:] == (3, 16, 16)


def test_synthetic_is_seeded() -> None:
    a, _ = load_data("synthetic", image_size=8, seed=1)
    b, _ = load_data("synthetic", image_size=8, seed=1)
    c, _ = load_data("synthetic", image_size=8, seed=2)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)


def test_augmentations() -> None:
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    u = torch.tensor([[0.0, 0.99], [0.5, 0.5]], dtype=torch.float64)
    out = random_crop(x, 2, u)
    assert out.shape == x.shape
    # Offsets (0, 4) and (2, 2): image 0 shifted down 2 / left 2 (zeros enter), image 1 unchanged.
    assert torch.equal(out[1], x[1])
    assert torch.equal(out[0, :, 2:, :4], x[0, :, :4, 2:]) and (out[0, :, :2] == 0).all()
    flipped = random_hflip(x, torch.tensor([0.1, 0.9]))
    assert torch.equal(flipped[0], x[0].flip(-1)) and torch.equal(flipped[1], x[1])
    # The full-image box (area fraction 1, ratio 1) reproduces the image.
    full = random_resized_crop(x, 6, torch.tensor([[1.0, 0.5, 0.0, 0.0]] * 2), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.testing.assert_close(full, x)
    crop = random_resized_crop(x, 4, torch.rand(2, 4, dtype=torch.float64))
    assert crop.shape == (2, 3, 4, 4)


def test_augmentation_is_keyed_by_sample() -> None:
    """A sample is augmented the same way in any batch or rank: only (seed, epoch, index) matter."""
    u = sample_uniform(0, 3, torch.tensor([5, 9, 11]), 7)
    assert u.shape == (3, 7) and (u >= 0).all() and (u < 1).all()
    assert torch.equal(sample_uniform(0, 3, torch.tensor([11, 5]), 7), u[[2, 0]])
    assert not torch.equal(sample_uniform(0, 4, torch.tensor([5]), 7), u[:1])
    assert not torch.equal(sample_uniform(1, 3, torch.tensor([5]), 7), u[:1])
    big = sample_uniform(0, 0, torch.arange(20000), 2)
    assert abs(float(big.mean()) - 0.5) < 0.01 and abs(float(torch.corrcoef(big.T)[0, 1])) < 0.03


def test_sharded_batches() -> None:
    b = ShardedBatches(10, 4, seed=0, epoch=0)
    assert len(b) == 2 and torch.equal(torch.cat(list(b)).sort().values.unique(), torch.cat(list(b)).sort().values)
    assert not torch.equal(ShardedBatches(10, 10, epoch=1).indices, ShardedBatches(10, 10, epoch=2).indices)
    ev = [ShardedBatches(11, 4, rank=r, world_size=2, drop_last=False, shuffle=False) for r in range(2)]
    assert sorted(torch.cat([torch.cat(list(e)) for e in ev]).tolist()) == list(range(11))  # each sample once
