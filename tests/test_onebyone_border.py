"""OneByOneThen (the conv1x1_3x3 / conv1x1_avg branches) can compute its ``BN1(0)`` padding as a
batch-1 border term added after a zero-padded conv/pool (``through_border``, what the static search
step runs) instead of padding the activation (``forward``); the two must agree in output and in every
gradient. The padded formulation is written out here as well, so that a change of ``forward``
cannot make both sides wrong together."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from irep_deploy.ops import OneByOneThen, bn_zero_output

from conftest import randomize_bn


def padded_reference(branch: OneByOneThen, x: torch.Tensor) -> torch.Tensor:
    """The formulation before the border term: three full passes to pad with BN1(0), then an unpadded
    conv (or a pool that sees the fill as ordinary pixels)."""
    y = branch.bn1(branch.conv1(x))
    fill = bn_zero_output(branch.bn1).to(y.dtype).reshape(1, -1, 1, 1)
    y = F.pad(y - fill, (1, 1, 1, 1)) + fill
    second = branch.second
    if branch.pool:
        z = F.avg_pool2d(y, 3, second.stride, 0)
    else:
        z = F.conv2d(y, second.weight, None, second.stride, 0, 1, branch.groups)
    return branch.bn2(z)


def border_form(branch: OneByOneThen, x: torch.Tensor) -> torch.Tensor:
    """The branch with its pad as the border term (``through_border``)."""
    return branch.bn2(branch.through_border(branch.bn1(branch.conv1(x))))


def make(pool: bool, cin: int, cout: int, stride: int, groups: int, seed: int) -> OneByOneThen:
    torch.manual_seed(seed)
    branch = OneByOneThen(cin, cout, stride, groups, pool=pool).double()
    return randomize_bn(branch, seed)  # a non-zero BN1(0): the ring term matters


def grads(module: nn.Module, x: torch.Tensor, out: torch.Tensor, weight: torch.Tensor):
    names = [n for n, p in module.named_parameters()]
    params = [p for _, p in module.named_parameters()]
    got = torch.autograd.grad((out * weight).sum(), [x] + params)
    return dict(zip(["input"] + names, got))


CASES = [  # pool, cin, cout, stride, groups, height, width
    (False, 4, 6, 1, 1, 7, 7),
    (False, 4, 6, 2, 1, 7, 8),
    (False, 6, 4, 2, 2, 8, 8),
    (False, 6, 9, 1, 3, 5, 6),
    (False, 3, 3, 2, 1, 1, 2),
    (True, 4, 6, 1, 1, 6, 7),
    (True, 4, 6, 2, 2, 7, 7),
    (True, 6, 6, 2, 3, 8, 5),
    (True, 2, 4, 1, 1, 1, 1),
]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("pool,cin,cout,stride,groups,height,width", CASES)
def test_border_term_equals_padding_with_bn_zero(pool, cin, cout, stride, groups, height, width, channels_last,
                                                 train):
    branch = make(pool, cin, cout, stride, groups, seed=height * 10 + width)
    reference, plain = copy.deepcopy(branch), copy.deepcopy(branch)
    branch.train(train), reference.train(train), plain.train(train)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    branch, reference = branch.to(memory_format=layout), reference.to(memory_format=layout)
    plain = plain.to(memory_format=layout)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, cin, height, width, generator=gen, dtype=torch.float64).contiguous(memory_format=layout)
    x.requires_grad_(True)
    out, want = border_form(branch, x), padded_reference(reference, x)
    assert out.shape == want.shape
    assert torch.allclose(plain(x), want, rtol=1e-12, atol=1e-12)  # forward is the padded form
    assert torch.allclose(out, want, rtol=1e-10, atol=1e-10), (out - want).abs().max()
    weight = torch.randn(want.shape, generator=gen, dtype=torch.float64)  # a loss that weighs the border
    got, ref = grads(branch, x, out, weight), grads(reference, x, want, weight)
    assert set(got) == {"input", "conv1.weight", "bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"} | (
        set() if pool else {"second.weight"})
    for name in got:
        assert torch.allclose(got[name], ref[name], rtol=1e-9, atol=1e-10), name
    if train:  # the batch statistics BN2 saw were the same too
        assert torch.allclose(branch.bn2.running_mean, reference.bn2.running_mean, rtol=1e-10, atol=1e-12)
        assert torch.allclose(branch.bn2.running_var, reference.bn2.running_var, rtol=1e-10, atol=1e-12)
    if channels_last and min(out.shape[-2:]) > 1:  # the border add keeps the layout the network runs in
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_float32_matches_to_float_rounding():
    branch = randomize_bn(OneByOneThen(8, 8, 2, 2, pool=False), 3).train()
    reference = copy.deepcopy(branch)
    x = torch.randn(4, 8, 9, 10, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(border_form(branch, x), padded_reference(reference, x), rtol=1e-5, atol=1e-5)


def test_the_border_term_is_what_the_zero_padding_misses():
    """A test that can fail: with BN1(0) != 0 the border term is non-zero on the border pixels of the
    output and zero inside, so dropping it would be caught by the equality above."""
    branch = make(False, 4, 4, 1, 1, seed=5).eval()
    y = torch.zeros(1, 4, 6, 6, dtype=torch.float64)
    border = branch.border(y)
    assert border.shape == (1, 4, 6, 6)
    assert border[..., 1:-1, 1:-1].abs().max() == 0
    assert border[..., [0, 0, -1, -1], [0, -1, 0, -1]].abs().min() > 0  # the corners see five ring pixels
