"""--device-data on a GPU: batches made on the device, the same arithmetic as on the host, no host
synchronisation per batch, and `auto` choosing it (real data: scikit-learn digits)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from irep_deploy.data import load_data
from irep_deploy.devicedata import DeviceTrainData, Draws, training_batches

pytest.importorskip("sklearn")


def test_batches_are_made_on_the_gpu_as_on_the_host(cuda):
    data = load_data("digits", val_fraction=0.1, cutout=3).with_channels(3)
    loader = DeviceTrainData("digits", data.train, cuda, 64, seed=3)
    loader.set_epoch(3, 1)
    assert loader.images.device == cuda and loader.labels.device == cuda
    batches = iter(loader)
    x, y = next(batches)  # the epoch's permutation and draws are made before the first batch
    assert x.device == cuda and y.device == cuda and x.shape == (64, 3, 8, 8) and y.dtype == torch.int64
    used = loader.order()[:64]
    draws = loader.draws().part(0, 64)
    host = loader.augmentation(loader.images[used].cpu(), Draws(*(t.cpu() for t in draws)), 3)
    torch.testing.assert_close(x.cpu(), host, rtol=0, atol=1e-6)
    assert torch.equal(y.cpu(), loader.labels[used].cpu())
    # no batch after the first waits for the host: a synchronising call would raise here
    torch.cuda.set_sync_debug_mode("error")
    try:
        rest = [b for b in batches]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(rest) == len(loader) - 1


def test_auto_turns_it_on_on_cuda(cuda):
    data = load_data("digits", val_fraction=0.1)
    assert isinstance(training_batches("auto", "digits", data.train, 64, 0, cuda), DeviceTrainData)
    assert isinstance(training_batches("off", "digits", data.train, 64, 0, cuda), DataLoader)
