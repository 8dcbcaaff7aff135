"""Datasets read from real local files; splits, transforms and loaders."""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import pytest
import torch

from irep_deploy.data import (FASHION_MNIST_ROOT, DataError, load_data, read_idx_gz, set_epoch,
                              train_loader, eval_loader)

FASHION = Path(FASHION_MNIST_ROOT)
needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn not installed")
needs_fashion = pytest.mark.skipif(not (FASHION / "train-labels-idx1-ubyte.gz").is_file(),
                                   reason="Debian package dataset-fashion-mnist not installed")


def _indices(ds):
    return list(ds.base.indices)  # Transformed(Subset(raw, indices))


@needs_sklearn
def test_digits_splits_are_disjoint_seeded_and_cover_the_training_set():
    a = load_data("digits", val_fraction=0.25, split_seed=3)
    b = load_data("digits", val_fraction=0.25, split_seed=3)
    c = load_data("digits", val_fraction=0.25, split_seed=4)
    train, val = set(_indices(a.train)), set(_indices(a.val))
    assert not train & val
    assert len(train | val) == len(a.train.base.dataset)
    assert abs(len(val) - 0.25 * len(train | val)) <= 1
    assert _indices(a.val) == _indices(b.val)
    assert _indices(a.val) != _indices(c.val)
    assert a.num_classes == 10 and a.in_channels == 1
    # The test split is fixed: it does not move with the split seed.
    assert torch.equal(a.test.base.images, c.test.base.images)
    x, y = a.test[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and 0 <= y < 10


@needs_sklearn
def test_no_val_split_without_a_fraction():
    data = load_data("digits")
    assert data.val is None
    with pytest.raises(DataError, match="val"):
        data.split("val")


@needs_sklearn
def test_train_augmentation_is_random_and_eval_is_not():
    data = load_data("digits", val_fraction=0.2)
    torch.manual_seed(0)
    crops = {tuple(data.train[5][0].flatten().tolist()) for _ in range(20)}
    assert len(crops) > 1
    assert torch.equal(data.val[5][0], data.val[5][0])
    assert torch.equal(data.test[5][0], data.test[5][0])


@needs_fashion
def test_fashion_mnist_reads_the_debian_idx_files():
    labels = read_idx_gz(FASHION / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,)
    assert torch.bincount(labels.long()).tolist() == [1000] * 10  # Fashion-MNIST's test set is balanced
    data = load_data("fashion-mnist", val_fraction=0.1, limit=64)
    assert (len(data.train), len(data.val), len(data.test)) == (64, 64, 64)
    assert data.num_classes == 10
    x, y = data.test[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= y < 10
    raw = data.test.base.dataset.images
    assert raw.dtype == torch.uint8 and raw.shape[1:] == (1, 28, 28) and raw.float().std() > 0


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as info:
        load_data("fashion-mnist", root=str(tmp_path))
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DataError, match="no such directory"):
        load_data("fashion-mnist", root=str(tmp_path / "absent"))


def test_truncated_idx_file_is_refused(tmp_path):
    path = tmp_path / "t.gz"
    with gzip.open(str(path), "wb") as handle:
        handle.write(bytes([0, 0, 8, 1]) + (100).to_bytes(4, "big") + bytes(10))
    with pytest.raises(DataError, match="truncated"):
        read_idx_gz(path)
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="unreadable"):
        read_idx_gz(path)


def test_cifar10_needs_a_local_directory(tmp_path):
    with pytest.raises(DataError, match="--data-root"):
        load_data("cifar10")
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_data("cifar10", root=str(tmp_path))


def test_imagefolder_tree(tmp_path):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for part in ("train", "val"):
        for cls in ("cat", "dog", "eel"):
            (tmp_path / part / cls).mkdir(parents=True)
            for i in range(2):
                pixels = torch.randint(0, 256, (40, 50, 3), generator=gen, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(str(tmp_path / part / cls / "{}.png".format(i)))
    data = load_data("imagenet", root=str(tmp_path))  # alias of imagefolder
    assert data.num_classes == 3 and len(data.train) == 6 and len(data.test) == 6
    assert data.train[0][0].shape == (3, 224, 224)
    assert data.test[5][0].shape == (3, 224, 224) and data.test[5][1] == 2
    with pytest.raises(DataError, match="train"):
        load_data("imagefolder", root=str(tmp_path / "train" / "cat"))


@needs_sklearn
def test_loader_order_depends_only_on_seed_and_epoch():
    data = load_data("digits")

    def order(seed, epoch):
        loader = train_loader(data.train, 100, seed)
        set_epoch(loader, seed, epoch)
        return torch.cat([y for _, y in loader]).tolist()

    torch.manual_seed(1)
    first = order(0, 3)
    torch.manual_seed(2)  # the global RNG does not decide the order
    assert order(0, 3) == first
    assert order(0, 4) != first
    assert order(1, 3) != first
    assert len(first) == (len(data.train) // 100) * 100  # drop_last


@needs_sklearn
def test_eval_shards_cover_the_set_once():
    data = load_data("digits")
    full = torch.cat([y for _, y in eval_loader(data.test, 50)])
    shards = [torch.cat([y for _, y in eval_loader(data.test, 50, rank=r, world_size=3)]) for r in range(3)]
    assert sum(len(s) for s in shards) == len(full)
    assert sorted(torch.cat(shards).tolist()) == sorted(full.tolist())
