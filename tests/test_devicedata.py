"""--device-data: the training split decoded once onto the device and augmented there, on real data
(scikit-learn digits; Fashion-MNIST where the Debian package is installed), against torchvision's own
transforms with the same random choices."""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from irep_deploy import ArchCode
from irep_deploy.data import FASHION_MNIST_ROOT, Cutout, TensorImages, Transformed, load_data, set_epoch
from irep_deploy.devicedata import (Augmentation, DeviceTrainData, Draws, augmentation_of, device_data_refusal,
                                    training_batches)
from irep_deploy.errors import UsageError
from irep_deploy.runs import config_from_dict

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn not installed")
needs_fashion = pytest.mark.skipif(not (Path(FASHION_MNIST_ROOT) / "train-labels-idx1-ubyte.gz").is_file(),
                                   reason="Debian package dataset-fashion-mnist not installed")
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def _replayed_draws(seed: int, n: int, aug: Augmentation) -> Draws:
    """The choices torchvision's RandomCrop, RandomHorizontalFlip and data.Cutout make for ``n`` images
    one after another from torch's global generator seeded ``seed``, in their order of draws
    (RandomCrop.get_params: row then column; the flip: rand(1) < p; Cutout: row then column)."""
    g = torch.Generator().manual_seed(seed)
    span, (h, w) = 2 * aug.padding + 1, aug.size
    cols = {k: [] for k in Draws._fields}
    for _ in range(n):
        if aug.crop:
            cols["top"].append(int(torch.randint(0, span, (1,), generator=g)))
            cols["left"].append(int(torch.randint(0, span, (1,), generator=g)))
        if aug.flip_p:
            cols["flip"].append(bool(torch.rand(1, generator=g) < aug.flip_p))
        if aug.cutout:
            cols["cy"].append(int(torch.randint(h, (), generator=g)))
            cols["cx"].append(int(torch.randint(w, (), generator=g)))
    return Draws(*(torch.tensor(cols[k], dtype=torch.bool if k == "flip" else torch.long) for k in Draws._fields))


def _raw_images(dataset, n):
    """The first ``n`` raw images under a training split of load_data (what the device path reads)."""
    from irep_deploy.devicedata import _raw_split
    return _raw_split(dataset).take()[0][:n]


def _check_split_matches_torchvision(data, n, seed=11):
    """The split's own __getitem__ (its torchvision transform, data.Cutout, GreyToChannels) against the
    device augmentation of the same raw images with the same choices."""
    from irep_deploy.devicedata import _raw_split
    raw = _raw_split(data.train)
    aug = augmentation_of(raw.transform, tuple(raw.images.shape[-2:]), raw.images.dtype)
    assert isinstance(aug, Augmentation)
    torch.manual_seed(seed)
    expected = torch.stack([data.train[i][0] for i in range(n)])
    got = aug(_raw_images(data.train, n), _replayed_draws(seed, n, aug), raw.channels)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    return aug, got


def test_digits_augmentation_equals_the_splits_torchvision_transform():
    data = load_data("digits", val_fraction=0.1, cutout=3, limit=300).with_channels(3)
    aug, got = _check_split_matches_torchvision(data, 64)
    assert (aug.padding, aug.crop, aug.flip_p, aug.cutout) == (1, True, 0.0, 3)  # digits: no flip
    assert got.shape == (64, 3, 8, 8) and torch.equal(got[:, 0], got[:, 2])  # grey copied to every channel
    # the zero padding normalises to -mean/std, as RandomCrop pads before Normalize
    assert torch.isclose(got, torch.tensor(-0.30 / 0.38)).any()


@needs_fashion
def test_fashion_mnist_augmentation_equals_the_splits_torchvision_transform():
    data = load_data("fashion-mnist", limit=200, cutout=8)
    aug, got = _check_split_matches_torchvision(data, 128)
    assert (aug.padding, aug.flip_p, aug.cutout) == (2, 0.5, 8) and got.shape == (128, 1, 28, 28)


def _uint8_digits(n):
    images = load_data("digits", parts=("test",)).test.base.images[:n]
    return (images * 255).round().to(torch.uint8)  # digits' 17 grey levels as 8-bit images


def test_uint8_crop_flip_cutout_equal_torchvision_tensor_and_pil_transforms():
    """The uint8 path (Fashion-MNIST's tensors, CIFAR-10's PIL images): scaling by 1/255 and flips."""
    from PIL import Image
    from torchvision import transforms as T

    grey = _uint8_digits(96)
    tensor_tf = T.Compose([T.RandomCrop(8, padding=2), T.RandomHorizontalFlip(), T.ConvertImageDtype(torch.float32),
                           T.Normalize((0.3,), (0.4,)), Cutout(4)])
    rgb = torch.cat([grey[0::3], grey[1::3], grey[2::3]], 1)  # three real digits as the channels of one image
    pil_tf = T.Compose([T.RandomCrop(8, padding=1), T.RandomHorizontalFlip(0.3), T.ToTensor(),
                        T.Normalize((0.3, 0.2, 0.1), (0.4, 0.5, 0.6))])
    pil = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in rgb]
    for tf, images, inputs in ((tensor_tf, grey, list(grey)), (pil_tf, rgb, pil)):
        aug = augmentation_of(tf, (8, 8), torch.uint8)
        assert isinstance(aug, Augmentation)
        torch.manual_seed(5)
        expected = torch.stack([tf(x) for x in inputs])
        draws = _replayed_draws(5, len(inputs), aug)
        assert draws.flip.any() and not draws.flip.all()
        torch.testing.assert_close(aug(images, draws), expected, rtol=0, atol=1e-6)


def test_cutout_is_data_cutout_at_every_centre_including_borders():
    x = load_data("digits", parts=("test",)).test.base.images[:1].expand(40, 1, 8, 8).contiguous()
    aug = Augmentation((8, 8), 0, False, 0.0, (0.0,), (1.0,), 5)  # normalising by 0 and 1 leaves x as it is
    for seed in range(40):
        torch.manual_seed(seed)
        expected = Cutout(5)(x[0])
        got = aug(x[:1], _replayed_draws(seed, 1, aug))[0]
        assert torch.equal(got, expected), seed
    centres = torch.cat([_replayed_draws(s, 1, aug).cy for s in range(40)])
    assert {0, 7} <= set(centres.tolist())  # the border cases were among them


def test_transforms_the_device_path_does_not_do_are_named():
    from torchvision import transforms as T

    norm = T.Normalize((0.5,), (0.5,))
    cases = [(T.Compose([T.RandomRotation(10), T.ConvertImageDtype(torch.float32), norm]), "RandomRotation"),
             (T.Compose([T.RandomCrop(8, padding=1, padding_mode="reflect"), T.ConvertImageDtype(torch.float32), norm]),
              "zero padding"),
             (T.Compose([T.ConvertImageDtype(torch.float32), norm, T.RandomHorizontalFlip()]), "order"),
             (T.Compose([T.RandomHorizontalFlip()]), "normalise")]
    for tf, words in cases:
        reason = augmentation_of(tf, (8, 8), torch.uint8)
        assert isinstance(reason, str) and words in reason


def _loader(data, batch=64, seed=3, **kw):
    return DeviceTrainData("digits", data.train, CPU, batch, seed, **kw)


def test_batches_shapes_and_every_example_once_per_epoch():
    data = load_data("digits", val_fraction=0.1).with_channels(3)
    n = len(data.train)
    loader = _loader(data, 64)
    assert len(loader) == n // 64 and loader.batch_size == 64
    set_epoch(loader, 3, 4)  # data.set_epoch works on it
    order = loader.order()
    assert sorted(order.tolist()) == list(range(n))  # one permutation of the split
    batches = list(loader)
    assert len(batches) == len(loader)
    for x, y in batches:
        assert x.shape == (64, 3, 8, 8) and x.dtype == torch.float32 and x.device == CPU and x.is_contiguous()
        assert y.shape == (64,) and y.dtype == torch.int64
    used = order[:len(loader) * 64]
    assert torch.equal(torch.cat([y for _, y in batches]), loader.labels[used])  # the batches follow the order
    labels = torch.as_tensor([data.train[i][1] for i in range(n)])
    assert torch.equal(loader.labels, labels)  # the labels of the split's own examples, in its order
    # the images are the split's raw images, augmented with the epoch's draws
    draws = loader.draws()
    x0 = loader.augmentation(loader.images[used[:64]], draws.part(0, 64), 3)
    assert torch.equal(batches[0][0], x0)


def test_distributed_shards_are_disjoint_and_cover_one_permutation():
    data = load_data("digits", val_fraction=0.1)
    n, world = len(data.train), 3
    shards = []
    for rank in range(world):
        loader = _loader(data, 32, rank=rank, world_size=world)
        loader.set_epoch(3, 2)
        assert len(loader) == n // world // 32  # DistributedSampler(drop_last=True)'s count, in batches
        shards.append(loader.order())
    perm = torch.cat([s[:, None] for s in shards], 1).flatten()  # interleaved back: rank r holds r, r+3, ...
    assert len(set(perm.tolist())) == n // world * world
    single = _loader(data, 32, world_size=1)
    single.set_epoch(3, 2)
    assert torch.equal(perm, single.order()[:len(perm)])  # every rank shards the same permutation
    # augmentations are drawn per rank
    a = _loader(data, 32, rank=0, world_size=world)
    b = _loader(data, 32, rank=1, world_size=world)
    assert not torch.equal(a.draws().top, b.draws().top)


def test_an_epoch_is_a_function_of_seed_and_epoch_alone():
    data = load_data("digits", val_fraction=0.1, limit=400, cutout=2)

    def epoch(seed, e, loader=None):
        loader = loader or _loader(data, 50, seed)
        loader.set_epoch(seed, e)
        xs, ys = zip(*loader)
        return torch.cat(xs), torch.cat(ys)

    first = epoch(3, 1)
    again = epoch(3, 1)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    reused = _loader(data, 50, 3)
    epoch(3, 0, reused)  # a loader that ran other epochs first (a run before its resume point)
    resumed = epoch(3, 1, reused)
    assert torch.equal(first[0], resumed[0])
    assert not torch.equal(first[1], epoch(3, 2)[1])  # another order
    assert not torch.equal(first[0], epoch(4, 1)[0])


def test_refusals_name_their_reason(tmp_path):
    from PIL import Image

    digits = load_data("digits", val_fraction=0.1)
    assert device_data_refusal("digits", digits.train, CPU, 64) is None
    images = _uint8_digits(6)
    for part in ("train", "val"):
        for i, img in enumerate(images):
            (tmp_path / part / str(i % 2)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[0].numpy()).save(str(tmp_path / part / str(i % 2) / "{}.png".format(i)))
    folder = load_data("imagefolder", root=str(tmp_path))
    assert device_data_refusal("imagefolder", folder.train, CPU, 2) == "imagefolder images are decoded per batch from files"
    too_large = device_data_refusal("digits", digits.train, CPU, 64, memory_limit=100_000)
    need = len(digits.train) * (8 * 8 * 4 + 8)  # float32 8x8 images and their int64 labels
    assert too_large == "the decoded split needs {:.1f} MiB, more than the 0.1 MiB allowed".format(need / 2 ** 20)
    assert "no batch of 2000" in device_data_refusal("digits", digits.train, CPU, 2000)
    plain = Transformed(Subset(TensorImages(images, torch.zeros(6, dtype=torch.long)), [0, 1]), lambda x: x)
    assert "not one the device path does" in device_data_refusal("digits", plain, CPU, 2)
    with pytest.raises(UsageError) as info:
        training_batches("on", "imagefolder", folder.train, 2, 0, CPU)
    assert str(info.value) == "--device-data on: imagefolder images are decoded per batch from files"


def test_modes_choose_the_loader():
    data = load_data("digits", val_fraction=0.1)
    assert isinstance(training_batches("on", "digits", data.train, 64, 0, CPU), DeviceTrainData)
    assert isinstance(training_batches("off", "digits", data.train, 64, 0, CPU), DataLoader)
    # auto: on CUDA only (on the host a DataLoader with workers is the data path already)
    assert isinstance(training_batches("auto", "digits", data.train, 64, 0, CPU), DataLoader)
    with pytest.raises(UsageError, match="choose from auto, on, off"):
        training_batches("yes", "digits", data.train, 64, 0, CPU)


def test_runs_saved_before_the_setting_resume_with_the_dataloader():
    from irep_deploy.search.des import SearchConfig
    from irep_deploy.train import TrainConfig

    for cls, config in ((TrainConfig, TrainConfig(backbone="resnet18_cifar", dataset="digits")),
                        (SearchConfig, SearchConfig(dataset="digits"))):
        assert config.device_data == "auto"
        saved = dataclasses.asdict(config)
        del saved["device_data"]  # what an earlier version wrote
        assert config_from_dict(cls, saved, "state.pt").device_data == "off"
        assert config_from_dict(cls, dataclasses.asdict(config), "state.pt").device_data == "auto"


class Stop(Exception):
    pass


def _stop_after_first(epoch, record):
    if epoch == 1:
        raise Stop()


def test_a_training_run_on_device_data_resumes_exactly(tmp_path):
    from irep_deploy import load_checkpoint
    from irep_deploy.runs import read_run_state
    from irep_deploy.train import TrainConfig, train

    code = ArchCode.random("resnet18_cifar", ratio=0.25, seed=1)
    config = TrainConfig(backbone="resnet18_cifar", arch=code.dumps(), dataset="digits", width=0.125, epochs=2,
                         batch_size=32, limit=96, seed=2, cutout=2, device_data="on")
    report = train(tmp_path / "full", config, progress=False, device="cpu")
    assert [r["examples"] for r in report.history] == [96, 96] and report.fused_rel_error <= 1e-4
    assert read_run_state(tmp_path / "full", "train", TrainConfig)[1].device_data == "on"
    with pytest.raises(Stop):
        train(tmp_path / "cut", config, progress=False, device="cpu", on_epoch_end=_stop_after_first)
    resumed = train(tmp_path / "cut", resume=True, progress=False, device="cpu")
    assert resumed.resumed_from_epoch == 1
    full, cut = load_checkpoint(report.ckpt).state_dict, load_checkpoint(resumed.ckpt).state_dict
    assert all(torch.equal(full[k], cut[k]) for k in full)  # the resumed epoch drew the same batches


def test_the_search_trains_on_device_data(tmp_path):
    from irep_deploy.runtime import Dist
    from irep_deploy.search.des import _Search, make_config

    config = make_config(None, dataset="digits", width=0.125, population=2, subnets=1, warmup_epochs=1, rounds=1,
                         round_epochs=1, batch_size=32, limit=160, device_data="on")
    job = _Search(tmp_path, config, CPU, Dist(), None, False)
    assert isinstance(job.loader, DeviceTrainData) and len(job.loader) == 160 // 32
    try:
        record = job.train_epoch()
    finally:
        if job.writer is not None:
            job.writer.close()
    assert record.epoch == 1 and record.train_loss > 0
