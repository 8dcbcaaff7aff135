"""The IREPS candidate operations: one registry entry per op.

Each entry says how to build the branch (training form) for a block of given geometry, when the op is
available, and (through the branch module's ``fused_3x3``) how it lands in the 3x3 kernel. Adding an
op means adding one :class:`OpSpec` to :data:`REGISTRY`; the block, the architecture codes, fusion and
the search pick it up by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UsageError
from .fusion import (KernelBias, avg_pool_kernel, contract_1x1_kxk, embed_in_3x3, fold_bn,
                     identity_kernel, placement)

Pair = Tuple[int, int]


def _pair(v) -> Pair:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def fold_module_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d, dtype: torch.dtype) -> KernelBias:
    """Transform I on live modules: ``kernel`` followed by ``bn`` (eval statistics), in ``dtype``."""
    return fold_bn(
        kernel.to(dtype),
        bn.running_mean.to(dtype),
        bn.running_var.to(dtype),
        bn.weight.to(dtype) if bn.weight is not None else None,
        bn.bias.to(dtype) if bn.bias is not None else None,
        bn.eps,
    )


class ConvBN(nn.Sequential):
    """conv (no bias) -> BatchNorm: the fixed 3x3 op, the simple branches, stems and 1x1 shortcuts."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride: int = 1,
                 padding=1, dilation=1, groups: int = 1) -> None:
        super().__init__()
        self.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                                          dilation, groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(out_channels))

    @classmethod
    def of(cls, conv: nn.Conv2d, bn: nn.Module) -> "ConvBN":
        """Wrap existing modules (a user's pretrained conv and BN) without building fresh ones."""
        pair = cls.__new__(cls)
        nn.Sequential.__init__(pair)
        pair.add_module("conv", conv)
        pair.add_module("bn", bn)
        return pair

    def fold(self, dtype: Optional[torch.dtype] = None) -> KernelBias:
        """The conv with its BN folded in, at its own kernel size."""
        dtype = dtype or self.conv.weight.dtype
        return fold_module_bn(self.conv.weight, self.bn, dtype)

    def fused_3x3(self, dtype: torch.dtype) -> KernelBias:
        conv = self.conv
        rows, cols = placement(_pair(conv.kernel_size), _pair(conv.padding), _pair(conv.dilation))
        kernel, bias = self.fold(dtype)
        return embed_in_3x3(kernel, rows, cols), bias

    def to_conv(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with bias equal to this conv-BN in eval mode."""
        conv = self.conv
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                          conv.padding, conv.dilation, conv.groups, bias=True,
                          device=conv.weight.device, dtype=conv.weight.dtype)
        kernel, bias = self.fold(torch.promote_types(conv.weight.dtype, torch.float32))
        with torch.no_grad():
            fused.weight.copy_(kernel)
            fused.bias.copy_(bias)
        return fused


class IdentityBN(nn.BatchNorm2d):
    """The identity branch: BN of the input itself (stride 1, in == out only)."""

    def __init__(self, channels: int, groups: int = 1) -> None:
        super().__init__(channels)
        self.groups = groups

    def fused_3x3(self, dtype: torch.dtype) -> KernelBias:
        like = self.running_mean.to(dtype)
        return fold_module_bn(identity_kernel(like, self.num_features, self.groups), self, dtype)


def bn_zero_output(bn: nn.BatchNorm2d) -> torch.Tensor:
    """What ``bn`` (eval statistics) outputs for a zero input: the value its padding must hold."""
    std = (bn.running_var + bn.eps).sqrt()
    value = -bn.running_mean / std
    if bn.weight is not None:
        value = value * bn.weight + bn.bias
    return value.detach()


class OneByOneThen(nn.Module):
    """1x1 conv -> BN -> pad with that BN's zero-input value -> (3x3 conv | 3x3 avg pool) -> BN.

    Padding with ``BN(0)`` instead of 0 is what makes the branch exactly one 3x3 conv after fusion
    (Diverse Branch Block's BNAndPad); the pad value uses running statistics, as there.

    :meth:`through_border` computes the same without materialising the pad: the conv (pool) is
    linear, so on the image padded with ``fill`` it equals the conv with zero padding plus the conv
    of a ``fill``-on-the-ring, zero-inside image (:meth:`border`), computed at batch size 1 and
    broadcast-added: one pass over the output instead of three over the activation (subtract, pad,
    add). The static search step uses it; ``forward`` keeps the padded form, because the two round
    differently and a network trained either way is another network (it moved the INT8 tests'
    one-epoch model across their thresholds), and no GPU measurement says the border form wins.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1,
                 pool: bool = False) -> None:
        super().__init__()
        self.groups = groups
        self.pool = pool
        mid = out_channels if pool else in_channels
        self.conv1 = nn.Conv2d(in_channels, mid, 1, 1, 0, groups=groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        if pool:
            self.second = nn.AvgPool2d(3, stride, 0)
        else:
            self.second = nn.Conv2d(mid, out_channels, 3, stride, 0, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn1(self.conv1(x))
        fill = bn_zero_output(self.bn1).to(y.dtype).reshape(1, -1, 1, 1)
        y = F.pad(y - fill, (1, 1, 1, 1)) + fill
        return self.bn2(self.second(y))

    def border(self, y: torch.Tensor, fill: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``second`` (unpadded) of a 1 x C x (H+2) x (W+2) image holding ``BN1(0)`` on its 1-pixel
        ring and 0 inside: what padding ``y`` with ``BN1(0)`` adds to ``second`` with zero padding.
        ``fill`` (G x C) gives G pad values instead (the static search step's subnets), G images."""
        height, width = y.shape[-2], y.shape[-1]
        fill = bn_zero_output(self.bn1) if fill is None else fill
        fill = fill.to(y.dtype).reshape(-1, y.shape[1], 1, 1)
        ring = F.pad(y.new_zeros(1, 1, height, width), (1, 1, 1, 1), value=1.0) * fill
        if self.pool:
            return F.avg_pool2d(ring, 3, self.second.stride, 0)
        return F.conv2d(ring, self.second.weight, None, self.second.stride, 0, 1, self.groups)

    def zero_padded(self, y: torch.Tensor) -> torch.Tensor:
        """``second`` with its own zero padding of 1 (counted by the pool): the part :meth:`border` completes."""
        if self.pool:
            return F.avg_pool2d(y, 3, self.second.stride, 1, count_include_pad=True)
        return F.conv2d(y, self.second.weight, None, self.second.stride, 1, 1, self.groups)

    def through_border(self, y: torch.Tensor) -> torch.Tensor:
        """What ``forward`` computes between ``bn1`` and ``bn2``, the pad as a border term."""
        return self.zero_padded(y) + self.border(y)

    def fused_3x3(self, dtype: torch.dtype) -> KernelBias:
        first = fold_module_bn(self.conv1.weight, self.bn1, dtype)
        if self.pool:
            kernel = avg_pool_kernel(first[0], self.bn2.num_features, self.groups)
        else:
            kernel = self.second.weight.to(dtype)
        second = fold_module_bn(kernel, self.bn2, dtype)
        return contract_1x1_kxk(first, second, self.groups)


BranchFactory = Callable[[int, int, int, int], nn.Module]


@dataclass(frozen=True)
class OpSpec:
    """One candidate op of the search space.

    ``build(in_channels, out_channels, stride, groups)`` returns the training-form branch, a module
    with ``fused_3x3(dtype) -> (kernel, bias)``. ``identity_shaped`` ops exist only where the block
    maps its input to an output of the same shape (stride 1, in == out).
    """

    name: str
    build: BranchFactory
    identity_shaped: bool = False

    def available(self, in_channels: int, out_channels: int, stride: int) -> bool:
        return not self.identity_shaped or (stride == 1 and in_channels == out_channels)


def _conv_op(name: str, kernel_size: Pair, padding: Pair, dilation: int) -> OpSpec:
    def build(cin: int, cout: int, stride: int, groups: int) -> nn.Module:
        return ConvBN(cin, cout, kernel_size, stride, padding, dilation, groups)
    return OpSpec(name, build)


REGISTRY: Dict[str, OpSpec] = {}


def register_op(spec: OpSpec) -> OpSpec:
    if spec.name in REGISTRY:
        raise ValueError("op {!r} is registered twice".format(spec.name))
    REGISTRY[spec.name] = spec
    return spec


for _spec in (  # where each branch lands in the fused 3x3 kernel:
    _conv_op("conv3x3", (3, 3), (1, 1), 1),  # itself
    _conv_op("conv1x3", (1, 3), (0, 1), 1),  # the middle row
    _conv_op("conv3x1", (3, 1), (1, 0), 1),  # the middle column
    _conv_op("conv1x1", (1, 1), (0, 0), 1),  # the centre tap
    OpSpec("conv1x1_3x3", lambda i, o, s, g: OneByOneThen(i, o, s, g, pool=False)),  # K3 (x) K1, bias through K3
    OpSpec("conv1x1_avg", lambda i, o, s, g: OneByOneThen(i, o, s, g, pool=True)),  # K1 spread as 1/9 over the window
    _conv_op("dil2x2", (2, 2), (1, 1), 2),  # the four corners
    _conv_op("dil2x1", (2, 1), (1, 0), 2),  # top and bottom of the middle column
    _conv_op("dil1x2", (1, 2), (0, 1), 2),  # left and right of the middle row
    OpSpec("identity", lambda i, o, s, g: IdentityBN(o, g), identity_shaped=True),  # the centre tap
):
    register_op(_spec)

_EIGHT = ("conv1x3", "conv3x1", "conv1x1", "conv1x1_3x3", "conv1x1_avg", "dil2x2", "dil2x1", "dil1x2")

#: The paper's default search spaces (section 4).
SPACES: Dict[str, Tuple[str, ...]] = {
    "resnet_cifar": _EIGHT,
    "resnet_imagenet": tuple(op for op in _EIGHT if op != "dil2x2"),
    "vgg": _EIGHT + ("identity",),
    "any": _EIGHT + ("identity",),  # a user's network (irepify): every IREPS op, identity where shapes allow
}


def check_ops(ops: Sequence[str]) -> Tuple[str, ...]:
    """Validate a list of op names (known, no repeats) and return it as a tuple."""
    seen = set()
    for op in ops:
        if op not in REGISTRY:
            raise UsageError("unknown op {!r} (known: {})".format(op, " ".join(REGISTRY)))
        if op in seen:
            raise UsageError("op {!r} is listed twice".format(op))
        seen.add(op)
    return tuple(ops)
