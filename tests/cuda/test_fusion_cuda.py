"""Fusion on the GPU in float32, float16 and bfloat16 (CUDA suite).

float32 runs under exact_fp32 (TF32 off) and keeps the CPU tolerance class (1e-5). The half types get
a tolerance derived from their arithmetic: each of the ``steps`` roundings on the longer path (every
branch output, the per-branch scale, the sum, BN, the rounded fused kernel) contributes at most one
unit roundoff (``torch.finfo(dtype).eps / 2``) of the magnitude it rounds, and that magnitude is at most
``kappa`` times the output's (kappa: the float64 ratio max(|K| * |x| + |b|) / max|y|, which measures the
cancellation in the sum), so both half results must lie within ``steps * eps * kappa`` of float64.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from irep_deploy.block import IrepConv
from irep_deploy.ops import REGISTRY
from irep_deploy.precision import exact_fp32

from conftest import randomize_arch_params, randomize_bn, rel_err

ALL_OPS = tuple(REGISTRY)


def _block(cin: int = 8, cout: int = 8, stride: int = 1, groups: int = 2, seed: int = 2) -> IrepConv:
    torch.manual_seed(seed)
    block = IrepConv(cin, cout, stride, groups, ops=ALL_OPS, branches=list(ALL_OPS))
    return randomize_arch_params(randomize_bn(block, seed), seed).eval()


def half_tolerance(block: IrepConv, x: torch.Tensor, dtype: torch.dtype) -> float:
    """steps * eps * kappa, from the float64 block on ``x`` (see the module docstring)."""
    ref = block.double()
    with torch.no_grad():
        y = ref(x.double())
        conv = ref.to_conv()
        magnitude = F.conv2d(x.double().abs(), conv.weight.abs(), None, conv.stride, conv.padding, conv.dilation,
                             conv.groups) + conv.bias.abs().view(1, -1, 1, 1)
    kappa = float(magnitude.max() / y.abs().max())
    steps = len(block.active) + 4
    return steps * torch.finfo(dtype).eps * kappa


def test_fp32_fusion_on_cuda_in_true_fp32(cuda):
    block = _block().to(cuda)
    x = torch.randn(2, 8, 9, 9, device=cuda)
    with torch.no_grad(), exact_fp32():
        fused = block.to_conv()
        assert fused.weight.is_cuda and fused.weight.dtype == torch.float32
        assert rel_err(block(x).double(), fused(x).double()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_fusion_on_cuda_within_derived_tolerance(cuda, dtype):
    block = _block()
    x = torch.randn(2, 8, 9, 9, generator=torch.Generator().manual_seed(0))
    tol = half_tolerance(_block(), x, dtype)
    with torch.no_grad():
        reference = block.double()(x.double())
        half = _block().to(cuda, dtype)
        fused = half.to_conv()
        assert fused.weight.dtype == dtype and fused.weight.is_cuda
        xh = x.to(cuda, dtype)
        got_multi, got_fused = half(xh).double().cpu(), fused(xh).double().cpu()
    assert rel_err(reference, got_multi) <= tol, (rel_err(reference, got_multi), tol)
    assert rel_err(reference, got_fused) <= tol, (rel_err(reference, got_fused), tol)
