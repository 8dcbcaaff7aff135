"""IrepConv: a fixed 3x3 conv-BN with masked re-parameterization branches beside it."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .fusion import KernelBias, add_branches, compute_dtype, scale_branch
from .ops import REGISTRY, ConvBN, check_ops


#: Branches drop-path leaves alone (see IrepConv).
NEVER_DROPPED = frozenset({"identity"})


def keep_mask(y: torch.Tensor, p: float) -> torch.Tensor:
    """Per-example factors for ``y`` (N x ...): 0 with probability ``p``, else 1 / (1 - p), so the
    expected output is unchanged (DARTS's drop_path). Drawn from the global generator of ``y``'s
    device, which the training loop seeds per epoch."""
    keep = 1.0 - p
    shape = (y.shape[0],) + (1,) * (y.dim() - 1)
    return torch.empty(shape, dtype=y.dtype, device=y.device).bernoulli_(keep).div_(keep)


def set_drop_path(model: nn.Module, p: float) -> int:
    """Set the drop-path probability of every :class:`IrepConv` in ``model``; returns how many."""
    if not 0.0 <= p < 1.0:
        raise ValueError("drop-path probability must lie in [0, 1), got {}".format(p))
    blocks = [m for m in model.modules() if isinstance(m, IrepConv)]
    for block in blocks:
        block.drop_path = p
    return len(blocks)


class IrepConv(nn.Module):
    """Block output (paper, Eq. 6-7)::

        B(x) = sigmoid(beta) * sum_{o active} sigmoid(alpha_o) * f_o(x) + F(x)

    ``F`` is the fixed 3x3 conv-BN (``self.conv``). ``ops`` is the layer's search space: ``alpha``
    holds one architecture parameter per op of it, ``beta`` one for the block, both starting at 0 so
    every branch starts with the same weight. Branch modules exist only for the ops in
    ``branches``; ``active`` (a subset of them, changeable between forwards) says which ones run, so
    an inactive branch costs nothing. A block never holds a branch for an op that is unavailable at
    its geometry (``identity`` at stride 2 or with in != out).

    ``drop_path`` (set by :func:`set_drop_path`; 0 by default) is DARTS's drop-path on the branches:
    in training mode each active branch's output is zeroed per example with that probability and the
    kept ones scaled by 1 / (1 - p). The fixed conv is never dropped, nor is ``identity`` (DARTS never
    drops an identity op: it is the skip path, and here the only one a VGG block has). Eval mode, and
    so fusion, never drop. It is an attribute, not a buffer: a setting of the training run, absent
    from state dicts and checkpoints.

    ``fixed`` supplies the fixed op (a :class:`ConvBN` holding a user's pretrained conv and BN, see
    :func:`irep_deploy.irepify`) instead of a fresh one. ``zero_init_branches`` makes every
    new branch start at zero output (the last BN of the branch with gamma = 0, as torchvision's
    ``zero_init_residual``), so adding branches to a pretrained network leaves its function as it was.
    """

    drop_path = 0.0  # class default: also for blocks built before this attribute existed

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1,
                 ops: Sequence[str] = (), branches: Iterable[str] = (), fixed: Optional[ConvBN] = None,
                 zero_init_branches: bool = False) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.groups = groups
        self.ops: Tuple[str, ...] = check_ops(ops)
        self.zero_init_branches = zero_init_branches
        self.conv = fixed if fixed is not None else ConvBN(in_channels, out_channels, 3, stride, 1, 1, groups)
        ref = self.conv.conv.weight
        self.branches = nn.ModuleDict()
        self.alpha = nn.Parameter(torch.zeros(len(self.ops), device=ref.device, dtype=ref.dtype))
        self.beta = nn.Parameter(torch.zeros((), device=ref.device, dtype=ref.dtype))
        self._active: Tuple[Tuple[int, str], ...] = ()
        self.add_branches(branches)
        self.active = tuple(self.branches)

    def available(self, op: str) -> bool:
        return op in self.ops and REGISTRY[op].available(self.in_channels, self.out_channels, self.stride)

    def add_branches(self, names: Iterable[str]) -> None:
        """Create (freshly initialised) branches for ``names`` that the block does not hold yet."""
        ref = self.conv.conv.weight
        for name in names:
            if name in self.branches:
                continue
            if not self.available(name):
                raise ValueError("op {!r} is not available in this block (ops {}, {}->{} stride {})".format(
                    name, self.ops, self.in_channels, self.out_channels, self.stride))
            branch = REGISTRY[name].build(self.in_channels, self.out_channels, self.stride, self.groups)
            if self.zero_init_branches:
                last_bn = [m for m in branch.modules() if isinstance(m, nn.BatchNorm2d)][-1]
                nn.init.zeros_(last_bn.weight)  # branch output = BN bias = 0: the block computes F(x) alone
                nn.init.zeros_(last_bn.bias)
            self.branches[name] = branch.to(device=ref.device, dtype=ref.dtype)

    @property
    def active(self) -> Tuple[str, ...]:
        return tuple(name for _, name in self._active)

    @active.setter
    def active(self, names: Iterable[str]) -> None:
        wanted = set(names)
        missing = wanted.difference(self.branches)
        if missing:
            raise ValueError("no branch for op(s) {} in this block (it holds {})".format(
                sorted(missing), list(self.branches) or "none"))
        # Keep the space's op order so the sum (and its rounding) does not depend on set order.
        self._active = tuple((i, op) for i, op in enumerate(self.ops) if op in wanted)

    def branch_scales(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """sigmoid(alpha_o) * sigmoid(beta) for every op of the space (Eq. 6-7), in ``dtype``
        (default float32 or wider).

        Half parameters are upcast first: torch 2.0 has no float16 sigmoid on the CPU, and a product
        taken in bf16 is off by up to ~5e-3, which would land in a "float32" fused kernel.
        """
        dtype = dtype or compute_dtype(self.alpha.dtype)
        return torch.sigmoid(self.alpha.to(dtype)) * torch.sigmoid(self.beta.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if not self._active:
            return out
        # Per branch the forward is its own ops plus one fused addcmul (one pass over out and y); the
        # scales are two sigmoids of L + 1 numbers per block. Nothing here is cut: folding drop-path's
        # mask into the scale (addcmul(out, scale * mask, y)) would save a pass over y, but it rounds
        # scale * mask * y in another order, so it is not exactly today's result (issue 23).
        scales = self.branch_scales().to(out.dtype)
        drop = self.drop_path if self.training else 0.0
        for i, name in self._active:
            y = self.branches[name](x)
            if drop > 0.0 and name not in NEVER_DROPPED:
                y = y * keep_mask(y, drop)
            out = torch.addcmul(out, scales[i], y)
        return out

    def fused_kernel_bias(self, active: Optional[Iterable[str]] = None,
                          dtype: Optional[torch.dtype] = None) -> KernelBias:
        """The single 3x3 (kernel, bias) equal to this block in eval mode.

        ``active`` overrides the block's own active set (the search fuses many codes from one
        SuperNet without touching it); ``dtype`` defaults to float32 or wider.
        """
        dtype = dtype or compute_dtype(self.conv.conv.weight.dtype)
        names = self.active if active is None else tuple(active)
        missing = [n for n in names if n not in self.branches]
        if missing:
            raise ValueError("no branch for op(s) {} in this block".format(missing))
        pairs = [self.conv.fold(dtype)]
        if names:
            scales = self.branch_scales(dtype).detach()
            index = {op: i for i, op in enumerate(self.ops)}
            for name in sorted(names, key=index.__getitem__):
                pairs.append(scale_branch(self.branches[name].fused_3x3(dtype), scales[index[name]]))
        return add_branches(pairs)

    def to_conv(self, active: Optional[Iterable[str]] = None) -> nn.Conv2d:
        """A plain 3x3 ``nn.Conv2d`` with bias, equal to this block in eval mode."""
        ref = self.conv.conv.weight
        fused = nn.Conv2d(self.in_channels, self.out_channels, 3, self.stride, 1, groups=self.groups,
                          bias=True, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            kernel, bias = self.fused_kernel_bias(active)
            fused.weight.copy_(kernel.detach())
            fused.bias.copy_(bias.detach())
        return fused

    def extra_repr(self) -> str:
        return "{}, {}, stride={}, groups={}, active={}".format(
            self.in_channels, self.out_channels, self.stride, self.groups, list(self.active))
