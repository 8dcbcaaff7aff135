"""Exact or refused: which norms fusion absorbs (timm's norm-act layers split, unknown BN-likes
refused), shared and directly-read weights left alone, and fuse_model's self-check naming the layer.

timm networks are built from their configs (pretrained=False, nothing downloaded) at 64x64 with
randomised BN statistics, random codes and random alpha/beta, so every branch is non-zero. The tests
without timm run on the deploy floor too (Python 3.8, torch 2.0).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from irep_deploy import ArchCode, fuse_model, irepify
from irep_deploy.block import IrepConv
from irep_deploy.errors import VerificationError
from irep_deploy.models import apply_arch
from irep_deploy.norms import AfterNorm, NormSplit, split_norm
from irep_deploy.surgery import BiasAsBN

from conftest import rel_err

TOL = 1e-5  # compare.FUSE_FP32: fused vs multi-branch in float32


def _randomize(net: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking statistics and affine parameters in every BN-like module, random alpha/beta:
    a BN or branch folded wrongly (or an activation lost) then moves the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            # BiasAsBN's statistics are constants (its forward adds its bias only): not a BN to randomise
            if isinstance(getattr(m, "running_var", None), torch.Tensor) and not isinstance(m, BiasAsBN):
                n = m.running_var.numel()
                m.running_mean.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                if isinstance(getattr(m, "weight", None), torch.Tensor):
                    m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    m.bias.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
            if isinstance(m, IrepConv):
                m.alpha.copy_(torch.randn(m.alpha.shape, generator=gen))
                m.beta.copy_(torch.randn(m.beta.shape, generator=gen))
    return net


def _out(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net.eval()(x)


def _branches_fuse_exactly(net: nn.Module, x: torch.Tensor, seed: int = 1) -> None:
    """A random code with non-zero branches: fused equals multi-branch within the fuse tolerance."""
    apply_arch(net, ArchCode.random(net.irep_config["backbone"], seed=seed), create=True)
    _randomize(net, seed)
    multi = _out(net, x)
    fused = fuse_model(net)
    assert not any(isinstance(m, IrepConv) for m in fused.modules())
    assert rel_err(multi, _out(fused, x)) <= TOL


# -- timm's norm-act layers ---------------------------------------------------------------------------
def test_conv_then_timm_batchnormact_keeps_its_activation_and_trains_as_a_plain_bn():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False),
                          timm.layers.BatchNormAct2d(8, act_layer=nn.ReLU))
    _randomize(model)
    x = torch.randn(4, 3, 16, 16)
    reference = _out(model, x)
    assert (reference == 0).any()  # the ReLU acts: losing it would show

    plain = fuse_model(model)  # checks itself; and it is exact
    assert rel_err(reference, _out(plain, x)) <= TOL
    assert isinstance(plain[1], AfterNorm) and isinstance(plain[1].act, nn.ReLU)

    net = irepify(model, input_size=16)
    assert net.irep_report.rewritten == ["0"] and isinstance(net[1], AfterNorm)
    assert type(net[0].conv.bn) is nn.BatchNorm2d
    assert torch.equal(_out(net, x), reference)  # the exact start
    # train mode: batch statistics, momentum and running-stat updates as the original's
    twin = irepify(model, input_size=16)
    model.train(), twin.train()
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))
    assert torch.equal(model[1].running_mean, twin[0].conv.bn.running_mean)
    assert torch.equal(model[1].running_var, twin[0].conv.bn.running_var)
    assert int(twin[0].conv.bn.num_batches_tracked) == 1
    _branches_fuse_exactly(net, x)


# the most used timm CNNs: every one of them has BatchNormAct2d after convs
TIMM_NETWORKS = ["regnety_002", "mobilenetv3_large_100", "ghostnet_100", "efficientnet_b0", "resnetv2_18",
                 pytest.param("resnetv2_50", marks=pytest.mark.slow),
                 pytest.param("cspresnet50", marks=pytest.mark.slow),
                 pytest.param("cspdarknet53", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", TIMM_NETWORKS)
def test_timm_network_folds_and_irepifies_exactly(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = _randomize(timm.create_model(name, pretrained=False)).eval()
    x = torch.randn(2, 3, 64, 64)
    reference = _out(model, x)
    plain = fuse_model(model, example_input=x)
    assert rel_err(reference, _out(plain, x)) <= TOL
    # folded where a conv precedes them (a pre-activation network keeps its norms before convs)
    assert _count(plain, "BatchNormAct2d") < _count(model, "BatchNormAct2d")
    assert _count(plain, "AfterNorm") == _count(model, "BatchNormAct2d") - _count(plain, "BatchNormAct2d")
    net = irepify(model, input_size=64)
    assert net.irep_report.rewritten
    assert not any("BatchNormAct2d" in reason for _, reason in net.irep_report.skipped)
    assert torch.equal(_out(net, x), reference)
    _branches_fuse_exactly(net, x)


def _count(net: nn.Module, kind: str) -> int:
    return sum(type(m).__name__ == kind for m in net.modules())


class ScaledBN(nn.BatchNorm2d):
    """A BN subclass with another forward: folding it as a BN would drop the scale."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class RunningCentre(nn.Module):
    """BN fields (running statistics, weight, bias, eps) but a forward that only centres."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.eps = 1e-5
        self.weight, self.bias = nn.Parameter(torch.ones(n)), nn.Parameter(torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.running_mean.reshape(1, -1, 1, 1)


class Pair(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.norm = norm
        self.out = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.norm(self.conv(x))))


def _fake_timm_bn_act() -> type:
    """A class that claims to be timm's BatchNormAct2d but whose forward is not the one checked."""
    cls = type("BatchNormAct2d", (nn.BatchNorm2d,), {"forward": lambda self, x: torch.tanh(super(cls, self).forward(x))})
    cls.__module__, cls.__qualname__ = "timm.layers.norm_act", "BatchNormAct2d"
    return cls


@pytest.mark.parametrize("norm, words", [
    (ScaledBN(8), "ScaledBN (only BatchNorm2d"),
    (RunningCentre(8), "RunningCentre (only BatchNorm2d"),
    (nn.BatchNorm3d(8), "BatchNorm3d"),
    (_fake_timm_bn_act()(8), "whose forward differs from the one checked"),
])
def test_unknown_bn_like_is_refused_with_its_reason_and_nothing_changes(norm, words):
    torch.manual_seed(0)
    model = _randomize(Pair(norm)).eval()
    if isinstance(norm, nn.BatchNorm3d):  # a BN of the wrong rank: its forward refuses 4-d input
        model.norm = _Unsqueezed(norm)
    x = torch.randn(2, 3, 16, 16)
    reference = _out(model, x)
    assert isinstance(split_norm(norm), str)
    net = irepify(model, input_size=16)
    reasons = dict(net.irep_report.skipped)
    if not isinstance(norm, nn.BatchNorm3d):
        assert words in reasons["conv"] and "norm" in reasons["conv"]
        assert net.irep_report.rewritten == ["out"] and type(net.norm) is type(norm)
    assert ("conv", "norm") not in net.irep_report.bn_pairs
    assert torch.equal(_out(net, x), reference)
    plain = fuse_model(model, example_input=x)  # not folded: the fused network is still exact
    assert type(plain.norm) is type(model.norm)
    assert rel_err(reference, _out(plain, x)) <= TOL


class _Unsqueezed(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.unsqueeze(2)).squeeze(2)


def test_split_norm_keeps_plain_bns_and_refuses_hooks_and_instance_forwards():
    bn = nn.BatchNorm2d(4)
    split = split_norm(bn)
    assert isinstance(split, NormSplit) and split.bn is bn and isinstance(split.after, nn.Identity)
    hooked = nn.BatchNorm2d(4)
    hooked.register_forward_hook(lambda m, i, o: o * 2)
    assert "forward hooks" in split_norm(hooked)
    patched = nn.BatchNorm2d(4)
    patched.forward = lambda x: x
    assert "own forward" in split_norm(patched)


# -- shared weights ----------------------------------------------------------------------------------
class Tied(nn.Module):
    """Two convs holding one Parameter, each followed by its own BN."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b.weight = self.a.weight
        self.bn_a, self.bn_b = nn.BatchNorm2d(8), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        return self.bn_b(self.b(F.relu(self.bn_a(self.a(x)))))


class TwoPaths(nn.Module):
    """One conv module reachable as ``conv`` and ``again``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.again = self.conv
        self.head = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.head_bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_bn(self.head(self.bn(self.conv(x))))


class DirectRead(nn.Module):
    """A forward that reads a conv's weight itself, and one that reads a BN's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head, self.head_bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.last, self.last_bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x)) + F.conv2d(x, self.conv.weight, padding=1)
        y = self.head_bn(self.head(y)) * self.head_bn.weight.reshape(1, -1, 1, 1)
        return self.last_bn(self.last(y))


@pytest.mark.parametrize("factory, left, words, rewritten", [
    (Tied, {"a", "b"}, "shared tensor", ["stem"]),
    (TwoPaths, {"conv"}, "also reachable as again", ["head"]),
    (DirectRead, {"conv", "head"}, "read directly in the forward", ["last"]),
])
def test_shared_or_directly_read_weights_are_neither_rewritten_nor_folded(factory, left, words, rewritten):
    torch.manual_seed(0)
    model = _randomize(factory()).eval()
    x = torch.randn(2, 3, 16, 16)
    reference = _out(model, x)
    net = irepify(model, input_size=16)
    reasons = dict(net.irep_report.skipped)
    assert left <= set(reasons) and all(words in reasons[p] or "is shared" in reasons[p] for p in left)
    assert net.irep_report.rewritten == rewritten
    assert not {c for c, _ in net.irep_report.bn_pairs} & left
    assert torch.equal(_out(net, x), reference)  # the forward works, and is the original's
    _branches_fuse_exactly(net, x)
    plain = fuse_model(model, example_input=x)
    assert rel_err(reference, _out(plain, x)) <= TOL
    for path in left:  # nothing folded into a shared weight
        assert torch.equal(plain.get_submodule(path).weight, model.get_submodule(path).weight)


# -- fuse_model checks itself ------------------------------------------------------------------------
class SkewedIrepConv(IrepConv):
    """A block whose fusion is wrong: its fused bias is off by 0.1."""

    def to_conv(self, ops=None) -> nn.Conv2d:
        conv = super().to_conv(ops)
        with torch.no_grad():
            conv.bias.add_(0.1)
        return conv


class Three(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(*[nn.Sequential(nn.Conv2d(c, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                                  nn.ReLU()) for c in (3, 8, 8)])
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.body(x)).flatten(1))


def _irepified_three() -> nn.Module:
    torch.manual_seed(0)
    net = irepify(_randomize(Three()), input_size=16)
    apply_arch(net, ArchCode.random(net.irep_config["backbone"], seed=2), create=True)
    return _randomize(net, 3)


def test_fuse_model_check_names_the_first_layer_that_fuses_wrongly():
    net = _irepified_three()
    net.body[1][0].__class__ = SkewedIrepConv  # the second block fuses wrongly, the first right
    with pytest.raises(VerificationError) as info:
        fuse_model(net)
    message = str(info.value)
    assert "body.1.0 (SkewedIrepConv -> Conv2d) first differs: relative error" in message
    assert "check=False" in message
    with pytest.raises(VerificationError, match="body.1.0"):
        fuse_model(net, inplace=True)  # recorded before the original is rewritten
    net = _irepified_three()
    net.body[1][0].__class__ = SkewedIrepConv
    x = torch.randn(2, 3, 16, 16)
    unchecked = fuse_model(net, check=False)  # skipped: the wrong fusion comes back
    assert rel_err(_out(net, x), _out(unchecked, x)) > 1e-3


def test_fuse_model_check_restores_modes_rng_and_statistics():
    net = _irepified_three().train()
    net.body[0][1].eval()  # a mixed mode must come back as it was
    modes = [m.training for m in net.modules()]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    fuse_model(net, check=False)  # building fused convs draws their (overwritten) initial weights
    unchecked = torch.get_rng_state()
    torch.set_rng_state(rng)
    fused = fuse_model(net)
    assert [m.training for m in net.modules()] == modes
    assert torch.equal(torch.get_rng_state(), unchecked)  # the check itself draws nothing
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    x = torch.randn(2, 3, 16, 16)
    assert rel_err(_out(net, x), _out(fused, x)) <= TOL


def test_fuse_model_check_runs_on_dict_list_and_integer_outputs():
    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

        def forward(self, x: torch.Tensor):
            y = self.bn(self.conv(x))
            return {"features": [y], "count": torch.tensor(y.shape[0])}

    model = _randomize(Heads()).eval()
    assert set(fuse_model(model, example_input=torch.randn(2, 3, 8, 8))(torch.randn(1, 3, 8, 8))) == {"features", "count"}


def test_the_check_refuses_a_recorded_size_too_large_for_memory_before_allocating():
    """A header's input_size is data: 4096 px would need gigabytes per recorded layer, so the check
    batch is refused in one line (naming the size) before anything is allocated; check=False fuses."""
    from irep_deploy import build_model
    from irep_deploy.errors import IrepError
    net = build_model("resnet18_cifar", arch=ArchCode.random("resnet18_cifar", seed=0), width=0.125,
                      num_classes=10, in_channels=1, input_size=4096).eval()
    with pytest.raises(IrepError, match=r"resnet18_cifar: input_size 4096: fuse_model's check batch of shape "
                                        r"2x1x4096x4096 would need about .* GiB, more than the limit"):
        fuse_model(net)
    assert not any(isinstance(m, IrepConv) for m in fuse_model(net, check=False).modules())
