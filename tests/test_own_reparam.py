"""A network's own re-parameterization (irep_deploy.own_reparam), without timm: the conventions of
``timm.utils.model.reparameterize_model``, found by method name, applied by irepify before its scan.

The blocks below are small real re-parameterizable blocks (a RepVGG-style 3x3 + 1x1 pair), one per
convention; a VAE's ``reparameterize(mu, logvar)`` is another convention and must be left alone.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from irep_deploy import fuse_model, irepify
from irep_deploy.block import IrepConv

from conftest import randomize_bn, rel_err


def _merged(k3: nn.Conv2d, k1: nn.Conv2d) -> nn.Conv2d:
    """One 3x3 conv computing ``k3(x) + k1(x)`` (the 1x1 kernel at the centre)."""
    conv = nn.Conv2d(k3.in_channels, k3.out_channels, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(k3.weight)
        conv.weight[:, :, 1:2, 1:2] += k1.weight
        conv.bias.copy_(k3.bias + k1.bias)
    return conv


class RepPair(nn.Module):
    """3x3 + 1x1 branches at training time, one conv after ``reparameterize()`` (timm's in-place way)."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.k3, self.k1 = nn.Conv2d(channels, channels, 3, padding=1), nn.Conv2d(channels, channels, 1)
        self.deployed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.deployed(x) if self.deployed is not None else self.k3(x) + self.k1(x)

    def reparameterize(self) -> None:
        self.deployed = _merged(self.k3, self.k1)
        del self.k3, self.k1


class DeployPair(RepPair):
    """The original RepVGG's name for it."""

    def switch_to_deploy(self) -> None:
        RepPair.reparameterize(self)

    reparameterize = None  # type: ignore[assignment]


class FusePair(nn.Module):
    """``fuse()`` returns the replacement (timm's LeViT/RepViT way)."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.k3, self.k1 = nn.Conv2d(channels, channels, 3, padding=1), nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.k3(x) + self.k1(x)

    def fuse(self) -> nn.Module:
        return _merged(self.k3, self.k1)


class Sampler(nn.Module):
    """A VAE's reparameterize(mu, logvar): not a deploy conversion, never called by irepify."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        raise AssertionError("called")


@pytest.mark.parametrize("block, method", [(RepPair, "reparameterize"), (DeployPair, "switch_to_deploy"),
                                           (FusePair, "fuse")])
def test_their_blocks_are_collapsed_first_and_the_fused_network_is_plain(block, method):
    torch.manual_seed(0)
    net = nn.Sequential(block(), nn.ReLU(), nn.Sequential(block()), Sampler()).eval()
    randomize_bn(net)
    multi = irepify(net)
    assert multi.irep_report.reparameterized == [("0", method), ("2.0", method)]
    assert len(multi.irep_report.rewritten) == 3 and not multi.irep_report.skipped  # no 1x1 branch left
    assert isinstance(net[0].k3, nn.Conv2d)  # the user's network is untouched
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert rel_err(multi.eval()(x), net(x)) <= 1e-6
        for block_ in multi.modules():
            if isinstance(block_, IrepConv):
                block_.add_branches(["conv1x1", "identity"])
                block_.active = ("conv1x1", "identity")
        randomize_bn(multi, seed=1)
        fused = fuse_model(multi.eval())
        assert rel_err(fused(x), multi(x)) <= 1e-5
    assert sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == 3
    assert not any(isinstance(m, (nn.BatchNorm2d, IrepConv)) for m in fused.modules())
