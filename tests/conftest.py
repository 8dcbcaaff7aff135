from __future__ import annotations

import pytest
import torch
import torch.nn as nn


def randomize_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, as after training."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
    return module


def randomize_arch_params(module: nn.Module, seed: int = 0) -> nn.Module:
    """Spread alpha/beta away from their equal initial values so the scales matter."""
    from irep_deploy.block import IrepConv
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, IrepConv):
            with torch.no_grad():
                m.alpha.copy_(torch.randn(m.alpha.shape, generator=gen))
                m.beta.copy_(torch.randn((), generator=gen))
    return module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    from irep_deploy.compare import compare
    return compare(a, b).rel_error


NO_CUDA = "no CUDA GPU on this machine (torch.cuda.is_available() is False)"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Tests under tests/gpu are the CUDA suite: mark them `cuda`; skip every `cuda` test without a GPU."""
    suite = config.rootpath / "tests" / "gpu"
    have_cuda = torch.cuda.is_available()
    for item in items:
        if suite in item.path.parents:
            item.add_marker(pytest.mark.cuda)
        if item.get_closest_marker("cuda") and not have_cuda:
            item.add_marker(pytest.mark.skip(reason=NO_CUDA))


def fashion_mnist(count: int, start: int = 0, part: str = "test"):
    """``count`` real Fashion-MNIST images (float in [0, 1], 1x28x28) and labels, from ``start``."""
    from irep_deploy.data import raw_dataset
    ds = raw_dataset("fashion-mnist", part)
    return ds.images[start:start + count].float() / 255.0, ds.labels[start:start + count]


def as_rgb(images: torch.Tensor, size: int) -> torch.Tensor:
    """Grey images as the 3-channel, ``size`` x ``size``, normalised input torchvision models take."""
    import torch.nn.functional as F
    x = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return ((x - 0.2860) / 0.3530).repeat(1, 3, 1, 1)
