"""The (kernel, bias) algebra against the modules it replaces, and IrepConv fusion as a property."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from irep_deploy.block import IrepConv
from irep_deploy.fusion import (add_branches, avg_pool_kernel, contract_1x1_kxk, embed_in_3x3, fold_bn,
                                identity_kernel, placement)
from irep_deploy.ops import REGISTRY

from conftest import randomize_arch_params, randomize_bn, rel_err

ALL_OPS = tuple(REGISTRY)


def test_fold_bn_equals_conv_then_bn():
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=True)
    bn = randomize_bn(nn.BatchNorm2d(6)).eval()
    k, b = fold_bn(conv.weight, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, conv.bias)
    x = torch.randn(2, 4, 7, 7)
    assert rel_err(bn(conv(x)), F.conv2d(x, k, b, padding=1)) < 1e-6


@pytest.mark.parametrize("name", ["conv1x3", "conv3x1", "conv1x1", "dil2x2", "dil2x1", "dil1x2"])
@pytest.mark.parametrize("stride", [1, 2])
def test_placement_matches_the_branch_conv(name, stride):
    branch = REGISTRY[name].build(3, 5, stride, 1)
    conv = branch.conv
    x = torch.randn(1, 3, 9, 8)
    rows, cols = placement(conv.kernel_size, conv.padding, conv.dilation)
    k3 = embed_in_3x3(conv.weight, rows, cols)
    assert rel_err(conv(x), F.conv2d(x, k3, stride=stride, padding=1)) < 1e-6


def test_placement_rejects_kernels_outside_the_window():
    with pytest.raises(ValueError):
        placement((3, 3), (0, 0), (1, 1))


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_contract_1x1_kxk_with_groups(groups):
    first = nn.Conv2d(8, 8, 1, groups=groups, bias=True)
    second = nn.Conv2d(8, 12, 3, padding=0, groups=groups, bias=True)
    k, b = contract_1x1_kxk((first.weight, first.bias), (second.weight, second.bias), groups)
    x = torch.randn(2, 8, 6, 5)
    assert rel_err(second(first(x)), F.conv2d(x, k, b, groups=groups)) < 1e-5


@pytest.mark.parametrize("groups", [1, 3])
def test_identity_and_avg_kernels(groups):
    x = torch.randn(2, 6, 5, 7)
    assert torch.equal(F.conv2d(x, identity_kernel(x, 6, groups), padding=1, groups=groups), x)
    want = F.avg_pool2d(x, 3, 1, 1, count_include_pad=True)
    assert rel_err(want, F.conv2d(x, avg_pool_kernel(x, 6, groups), padding=1, groups=groups)) < 1e-6


def test_add_branches_sums_kernels_and_biases():
    pairs = [(torch.full((2, 1, 3, 3), float(i)), torch.full((2,), float(i))) for i in range(1, 4)]
    k, b = add_branches(pairs)
    assert torch.equal(k, torch.full((2, 1, 3, 3), 6.0)) and torch.equal(b, torch.full((2,), 6.0))


def make_block(ops, cin, cout, stride, groups, seed):
    torch.manual_seed(seed)
    block = IrepConv(cin, cout, stride, groups, ops=ALL_OPS, branches=ops)
    randomize_arch_params(randomize_bn(block, seed), seed)
    return block.eval()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(st.sampled_from(ALL_OPS), unique=True, max_size=len(ALL_OPS)),
    stride=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 2, 3]),
    cin_per_group=st.integers(1, 3),
    cout_per_group=st.integers(1, 3),
    height=st.integers(1, 9),
    width=st.integers(1, 9),
    seed=st.integers(0, 2 ** 16),
)
def test_block_fuses_exactly(ops, stride, groups, cin_per_group, cout_per_group, height, width, seed):
    cin, cout = groups * cin_per_group, groups * cout_per_group
    ops = [op for op in ops if REGISTRY[op].available(cin, cout, stride)]
    block = make_block(ops, cin, cout, stride, groups, seed)
    x = torch.randn(2, cin, height, width, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert rel_err(block(x), block.to_conv()(x)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_fusion_matches_float32(dtype):
    block = make_block([op for op in ALL_OPS if op != "identity"], 4, 6, 2, 2, 0)
    ref_k, ref_b = block.fused_kernel_bias()
    half = block.to(dtype)
    k, b = half.fused_kernel_bias()
    assert k.dtype == torch.float32  # half models fuse in float32 ...
    conv = half.to_conv()
    assert conv.weight.dtype == dtype  # ... and come back in their own dtype
    assert rel_err(ref_k, k) < 1e-2 and rel_err(ref_b, b) < 1e-2
    assert rel_err(ref_k, conv.weight.float()) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_block_scale_and_float32_kernel_match_a_float64_reference(dtype):
    # The example: one branch, alpha 0.3, beta -0.7. The reference is the same half-valued
    # block in float64, so only the arithmetic of the fusion differs, not the stored weights.
    torch.manual_seed(0)
    block = randomize_bn(IrepConv(4, 4, ops=["conv1x1"], branches=["conv1x1"]))
    with torch.no_grad():
        block.alpha.fill_(0.3)
        block.beta.fill_(-0.7)
    half = block.to(dtype).eval()
    exact = copy.deepcopy(half).double()
    want = torch.sigmoid(exact.alpha) * torch.sigmoid(exact.beta)
    assert rel_err(want, half.branch_scales().double()) < 1e-6
    ref_k, ref_b = exact.fused_kernel_bias()
    k, b = half.fused_kernel_bias()
    assert k.dtype == b.dtype == torch.float32
    assert rel_err(ref_k, k.double()) < 1e-6 and rel_err(ref_b, b.double()) < 1e-6


def test_bfloat16_block_forward_still_runs_and_matches_its_fused_conv():
    block = make_block([op for op in ALL_OPS if op != "identity"], 4, 4, 1, 1, 7).to(torch.bfloat16)
    x = torch.randn(2, 4, 6, 6).to(torch.bfloat16)
    with torch.no_grad():
        out = block(x)
        assert out.dtype == torch.bfloat16
        assert rel_err(out.double(), block.to_conv()(x).double()) < 3e-2  # bf16 has an 8-bit mantissa


def test_float64_fusion_is_exact_to_double_rounding():
    block = make_block(list(ALL_OPS), 6, 6, 1, 3, 1).double()
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        fused = block.to_conv()
        assert fused.weight.dtype == torch.float64
        assert rel_err(block(x), fused(x)) < 1e-12


def test_mask_changes_between_forwards_and_inactive_branches_do_not_run():
    block = make_block(list(ALL_OPS), 4, 4, 1, 1, 3)
    calls = {name: 0 for name in block.branches}
    for name, branch in block.branches.items():
        branch.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls[name] + 1))
    x = torch.randn(1, 4, 5, 5)
    outs = []
    for active in (["conv1x3"], ["dil2x2", "identity"], []):
        block.active = active
        with torch.no_grad():
            outs.append(block(x))
            assert rel_err(outs[-1], block.to_conv()(x)) < 1e-5
    assert calls == {name: int(name == "conv1x3") + int(name in ("dil2x2", "identity")) for name in calls}
    assert not torch.allclose(outs[0], outs[1])
    with torch.no_grad():
        assert torch.equal(outs[2], block.conv(x))


def test_gradients_reach_alpha_beta_of_active_ops_only():
    block = make_block(list(ALL_OPS), 4, 4, 1, 1, 4).train()
    block.active = ["conv1x1", "conv1x1_avg"]
    block(torch.randn(2, 4, 6, 6)).square().mean().backward()
    grad = block.alpha.grad
    active = {block.ops.index("conv1x1"), block.ops.index("conv1x1_avg")}
    assert all((grad[i] != 0) == (i in active) for i in range(len(block.ops)))
    assert block.beta.grad is not None and block.beta.grad != 0
    assert block.branches["conv1x3"].conv.weight.grad is None


def test_fused_kernel_for_another_code_leaves_the_block_alone():
    block = make_block(list(ALL_OPS), 4, 4, 1, 1, 5)
    before = block.active
    k_all, _ = block.fused_kernel_bias()
    k_one, _ = block.fused_kernel_bias(active=["conv1x1"])
    assert block.active == before and not torch.allclose(k_all, k_one)
    with pytest.raises(ValueError):
        IrepConv(4, 8, 2, ops=ALL_OPS, branches=["identity"])
