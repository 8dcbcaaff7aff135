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


# -- validation at load: every fault of a data file is one line naming it -------------------------
def _idx(path, arr, magic=8):
    header = bytes([0, 0, magic, arr.dim()]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    with gzip.open(str(path), "wb") as handle:
        handle.write(header + arr.numpy().tobytes())


def _fashion_root(root, n=20, labels=None, n_labels=None):
    root.mkdir(exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    for prefix in ("train", "t10k"):
        _idx(root / "{}-images-idx3-ubyte.gz".format(prefix),
             torch.randint(0, 256, (n, 28, 28), generator=gen, dtype=torch.uint8))
        lab = labels if labels is not None else torch.arange(n if n_labels is None else n_labels) % 10
        _idx(root / "{}-labels-idx1-ubyte.gz".format(prefix), lab.to(torch.uint8))
    return root


def _refused(root, *texts, parts=("train", "test")):
    with pytest.raises(DataError) as info:
        load_data("fashion-mnist", root=str(root), parts=parts)
    message = str(info.value)
    assert "\n" not in message
    for text in texts:
        assert str(text) in message, message
    return message


def test_a_valid_tiny_fashion_mnist_root_loads(tmp_path):
    data = load_data("fashion-mnist", root=str(_fashion_root(tmp_path / "fm")))
    assert len(data.train) == 20 and data.num_classes == 10


def test_broken_deflate_stream_names_the_file(tmp_path):
    root = _fashion_root(tmp_path / "fm")
    target = root / "train-images-idx3-ubyte.gz"
    raw = bytearray(target.read_bytes())
    for i in range(20, len(raw) - 8):  # the deflate data, not the gzip header or trailer
        raw[i] ^= 0x5A
    target.write_bytes(bytes(raw))
    _refused(root, target, "corrupt gzip")


def test_truncated_gzip_names_the_file(tmp_path):
    root = _fashion_root(tmp_path / "fm")
    target = root / "train-labels-idx1-ubyte.gz"
    target.write_bytes(target.read_bytes()[:-12])
    _refused(root, target)


def test_labels_out_of_range_are_refused(tmp_path):
    root = _fashion_root(tmp_path / "fm", labels=torch.full((20,), 250))
    _refused(root, root / "train-labels-idx1-ubyte.gz", "label 250 out of range")


def test_zero_images_are_refused(tmp_path):
    root = _fashion_root(tmp_path / "fm", n=0)
    _refused(root, root / "train-images-idx3-ubyte.gz", "no images")


def test_image_and_label_counts_must_match(tmp_path):
    root = _fashion_root(tmp_path / "fm", n_labels=19)
    _refused(root, root / "train-images-idx3-ubyte.gz", "20 images", "19 labels")


def test_wrong_magic_and_wrong_image_size_are_refused(tmp_path):
    root = _fashion_root(tmp_path / "fm")
    _idx(root / "t10k-images-idx3-ubyte.gz", torch.zeros(20, 28, 28, dtype=torch.uint8), magic=0x0D)
    _refused(root, root / "t10k-images-idx3-ubyte.gz", "not an IDX file", parts=("test",))
    _idx(root / "t10k-images-idx3-ubyte.gz", torch.zeros(20, 32, 32, dtype=torch.uint8))
    _refused(root, root / "t10k-images-idx3-ubyte.gz", "32 x 32", parts=("test",))


def test_a_header_larger_than_the_data_is_truncation_not_an_allocation(tmp_path):
    path = tmp_path / "t.gz"
    with gzip.open(str(path), "wb") as handle:  # claims 100 M values, holds 10
        handle.write(bytes([0, 0, 8, 2]) + (10000).to_bytes(4, "big") * 2 + bytes(10))
    with pytest.raises(DataError, match="truncated"):
        read_idx_gz(path)
    with gzip.open(str(path), "wb") as handle:  # claims 4 G values: refused from the header
        handle.write(bytes([0, 0, 8, 2]) + (65536).to_bytes(4, "big") * 2 + bytes(10))
    with pytest.raises(DataError, match="more than the"):
        read_idx_gz(path)
    with gzip.open(str(path), "wb") as handle:  # more data than announced
        handle.write(bytes([0, 0, 8, 1]) + (4).to_bytes(4, "big") + bytes(10))
    with pytest.raises(DataError, match="more data"):
        read_idx_gz(path)


def test_special_files_in_place_of_data_files_are_refused_before_reading(tmp_path):
    import os

    root = _fashion_root(tmp_path / "fm")
    target = root / "train-images-idx3-ubyte.gz"
    target.unlink()
    os.mkfifo(str(target))  # opening a FIFO without a writer would block forever
    _refused(root, target, "FIFO")
    target.unlink()
    target.mkdir()
    _refused(root, target, "directory")
    afile = tmp_path / "a-file"
    afile.write_text("x")
    _refused(afile, afile, "not a directory")


def _image_tree(root, classes=("a", "b"), n=2):
    from PIL import Image

    for part in ("train", "val"):
        for cls in classes:
            (root / part / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (12, 10), (i * 40, 0, 0)).save(str(root / part / cls / "{}.png".format(i)))
    return root


def _first_batch(dataset, workers=0):
    return next(iter(eval_loader(dataset, batch_size=8, workers=workers)))


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_png_names_the_file_also_from_a_loader_worker(tmp_path, workers):
    root = _image_tree(tmp_path / "if")
    bad = root / "val" / "a" / "1.png"
    bad.write_bytes(bad.read_bytes()[:40] + b"\x00" * 30)
    data = load_data("imagefolder", root=str(root), parts=("test",))
    with pytest.raises(DataError) as info:
        _first_batch(data.test, workers)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_a_truncated_jpeg_and_a_non_image_are_named(tmp_path):
    from PIL import Image

    root = _image_tree(tmp_path / "if")
    jpeg = root / "val" / "b" / "1.jpg"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(str(jpeg), quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[:200])
    data = load_data("imagefolder", root=str(root), parts=("test",))
    with pytest.raises(DataError, match="not a readable image") as info:
        _first_batch(data.test)
    assert str(jpeg) in str(info.value)
    jpeg.write_text("this is a text file, named .jpg\n")
    with pytest.raises(DataError, match="not a readable image"):
        _first_batch(load_data("imagefolder", root=str(root), parts=("test",)).test)


def _bomb_png(path, side):
    """A side x side 1-bit PNG written by hand: a few KB of zlib for hundreds of MB of pixels."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [10000, 20000])  # over PIL's warning limit, and over its error limit
def test_a_decompression_bomb_is_refused_from_its_header(tmp_path, side):
    root = _image_tree(tmp_path / "if")
    bomb = root / "val" / "a" / "0.png"
    _bomb_png(bomb, side)
    assert bomb.stat().st_size < 100_000
    with pytest.raises(DataError, match="pixel") as info:
        _first_batch(load_data("imagefolder", root=str(root), parts=("test",)).test)
    assert str(bomb) in str(info.value)


def test_an_image_folder_without_images_or_with_an_empty_class_is_refused(tmp_path):
    root = _image_tree(tmp_path / "if")
    (root / "val" / "empty").mkdir()
    with pytest.raises(DataError, match="empty") as info:
        load_data("imagefolder", root=str(root), parts=("test",))
    assert str(root / "val") in str(info.value)
    bare = tmp_path / "bare"
    (bare / "val").mkdir(parents=True)
    with pytest.raises(DataError, match=str(bare / "val")):
        load_data("imagefolder", root=str(bare), parts=("test",))


def test_a_fifo_named_like_an_image_is_refused_before_opening(tmp_path):
    import os

    root = _image_tree(tmp_path / "if")
    fifo = root / "val" / "a" / "1.png"
    fifo.unlink()
    os.mkfifo(str(fifo))
    with pytest.raises(DataError, match="FIFO") as info:
        _first_batch(load_data("imagefolder", root=str(root), parts=("test",)).test)
    assert str(fifo) in str(info.value)
