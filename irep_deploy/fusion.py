"""The re-parameterization algebra: pure functions on (kernel, bias) pairs.

Nothing here knows about ``nn.Module``. Every function keeps the dtype and device of its inputs
(new tensors are built with ``new_zeros``/``zeros_like``), so fusion runs unchanged on CUDA and in
float16/bfloat16/float64. Callers that want extra precision for half types upcast first
(:func:`compute_dtype`).

The transforms follow the numbering of Diverse Branch Block (Ding et al., 2021), which the paper's
IREPS search space builds on; Eq. 6-7 of the paper (block output
``sigmoid(beta) * sum_o sigmoid(alpha_o) * f_o(x) + F(x)``) is what :func:`scale_branch` applies.
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch

KernelBias = Tuple[torch.Tensor, torch.Tensor]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to fuse in: half types are upcast to float32, float32/float64 stay as they are."""
    return torch.promote_types(dtype, torch.float32)


def fold_bn(
    kernel: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    gamma: Optional[torch.Tensor],
    beta: Optional[torch.Tensor],
    eps: float,
    bias: Optional[torch.Tensor] = None,
) -> KernelBias:
    """Transform I: fold an eval-mode BatchNorm into the conv before it.

    ``BN(conv(x) + bias) = conv'(x) + b'`` with ``K' = K * gamma / std`` per output channel and
    ``b' = beta + (bias - mean) * gamma / std``, ``std = sqrt(var + eps)``. ``gamma``/``beta`` may be
    None for a BN without affine parameters.
    """
    std = (running_var + eps).sqrt()
    t = (gamma / std) if gamma is not None else std.reciprocal()
    shift = -running_mean if bias is None else bias - running_mean
    b = shift * t
    if beta is not None:
        b = b + beta
    return kernel * t.reshape(-1, *([1] * (kernel.dim() - 1))), b


def embed_in_3x3(kernel: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
    """Place a smaller (possibly dilated) kernel into the taps of a 3x3 kernel it touches.

    ``rows``/``cols`` say which taps of the 3x3 window the branch reads: ``slice(1, 2)`` for the
    middle row of a 1x3 conv, ``slice(0, 3, 2)`` for the two outer taps of a dilation-2 kernel, and
    so on (see :func:`placement`).
    """
    out = kernel.new_zeros(kernel.shape[0], kernel.shape[1], 3, 3)
    out[:, :, rows, cols] = kernel
    return out


def placement(kernel_size: Tuple[int, int], padding: Tuple[int, int],
              dilation: Tuple[int, int]) -> Tuple[slice, slice]:
    """Where a kernel with this geometry lands in the 3x3 window of a pad-1 conv.

    A branch aligned with the fixed 3x3 conv (same stride, same output size) starts ``1 - padding``
    taps into the window and steps by its dilation.
    """
    slices = []
    for k, p, d in zip(kernel_size, padding, dilation):
        start = 1 - p
        stop = start + d * (k - 1) + 1
        if start < 0 or stop > 3:
            raise ValueError("kernel {} with padding {} and dilation {} does not fit in 3x3".format(
                kernel_size, padding, dilation))
        slices.append(slice(start, stop, d))
    return slices[0], slices[1]


def identity_kernel(like: torch.Tensor, channels: int, groups: int = 1) -> torch.Tensor:
    """Transform for the identity branch: a 3x3 kernel whose centre tap passes each channel through.

    Built from ``like`` (dtype and device) as timm does with ``zeros_like``; shape
    ``(channels, channels // groups, 3, 3)``.
    """
    per_group = channels // groups
    kernel = like.new_zeros(channels, per_group, 3, 3)
    idx = torch.arange(channels, device=like.device)
    kernel[idx, idx % per_group, 1, 1] = 1
    return kernel


def avg_pool_kernel(like: torch.Tensor, channels: int, groups: int = 1, size: int = 3) -> torch.Tensor:
    """Transform V: a ``size`` x ``size`` average pool as a grouped conv kernel (1/size^2 per tap).

    Exact for an average pool that counts padding, which is how the IREPS branch pads (with its
    BN's zero-input value, see :mod:`irep_deploy.ops`).
    """
    per_group = channels // groups
    kernel = like.new_zeros(channels, per_group, size, size)
    idx = torch.arange(channels, device=like.device)
    kernel[idx, idx % per_group] = 1.0 / (size * size)
    return kernel


def contract_1x1_kxk(first: KernelBias, second: KernelBias, groups: int = 1) -> KernelBias:
    """Transform III: a 1x1 conv followed by a kxk conv is one kxk conv.

    ``first`` is the 1x1 pair ``(K1: (M, C/g, 1, 1), b1: (M,))``, ``second`` the kxk pair
    ``(K2: (N, M/g, k, k), b2: (N,))``. Per group, ``K = K2 (x) K1`` contracts the M middle channels
    and ``b = b2 + sum_{m,h,w} K2[n, m, h, w] * b1[m]``. The bias term is exact only if the kxk conv
    sees ``b1`` (not 0) in its padding, which the training-form branch guarantees.
    """
    k1, b1 = first
    k2, b2 = second
    mid, in_per_group = k1.shape[0], k1.shape[1]
    out = k2.shape[0]
    g1 = k1.reshape(groups, mid // groups, in_per_group)
    g2 = k2.reshape(groups, out // groups, mid // groups, k2.shape[2], k2.shape[3])
    kernel = torch.einsum("gomhw,gmc->gochw", g2, g1).reshape(out, in_per_group, k2.shape[2], k2.shape[3])
    bias = torch.einsum("gomhw,gm->go", g2, b1.reshape(groups, mid // groups)).reshape(out) + b2
    return kernel, bias


def scale_branch(pair: KernelBias, scale: torch.Tensor) -> KernelBias:
    """Eq. 6-7: a branch enters the block output multiplied by sigmoid(alpha_o) * sigmoid(beta)."""
    kernel, bias = pair
    return kernel * scale, bias * scale


def add_branches(pairs: Iterable[KernelBias]) -> KernelBias:
    """Transform II: parallel branches with the same geometry sum into one kernel and one bias."""
    it = iter(pairs)
    kernel, bias = next(it)
    for k, b in it:
        kernel = kernel + k
        bias = bias + b
    return kernel, bias
