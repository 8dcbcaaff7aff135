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
    return ((a - b).abs().max() / a.abs().max()).item()


NO_CUDA = "no CUDA GPU on this machine (torch.cuda.is_available() is False)"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Tests under tests/cuda are the CUDA suite: mark them `cuda`; skip every `cuda` test without a GPU."""
    suite = config.rootpath / "tests" / "cuda"
    have_cuda = torch.cuda.is_available()
    for item in items:
        if suite in item.path.parents:
            item.add_marker(pytest.mark.cuda)
        if item.get_closest_marker("cuda") and not have_cuda:
            item.add_marker(pytest.mark.skip(reason=NO_CUDA))
