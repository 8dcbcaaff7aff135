"""The SuperNet: every branch of the space built, codes switched per forward (Algorithm 1, Eq. 3-5)."""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..arch import ArchCode
from ..block import IrepConv
from ..binding import plan_arch, searchable_layers
from ..reparam import fuse_model


class SuperNet(nn.Module):
    """``forward(x, codes)`` runs the batch through the subnet of each code and returns their logits.

    Doing the B subnets inside one ``forward`` lets one backward of the averaged loss (Eq. 3-5) make
    one step, and lets DistributedDataParallel see one forward/backward per step. Codes are checked
    against the model once and cached, so switching costs a few attribute writes.
    """

    def __init__(self, model: nn.Module, cache_size: int = 4096) -> None:
        super().__init__()
        self.model = model
        self._blocks: List[IrepConv] = [b for _, b in searchable_layers(model)]
        self._plans: "OrderedDict[ArchCode, Tuple[Tuple[str, ...], ...]]" = OrderedDict()
        self._cache_size = cache_size

    @property
    def blocks(self) -> List[IrepConv]:
        return self._blocks

    def activate(self, code: ArchCode) -> None:
        plan = self._plans.get(code)
        if plan is None:
            plan = tuple(ops for _, ops in plan_arch(self.model, code))
            self._plans[code] = plan
            if len(self._plans) > self._cache_size:
                self._plans.popitem(last=False)
        for block, ops in zip(self._blocks, plan):
            block.active = ops

    def forward(self, x: torch.Tensor, codes: Sequence[ArchCode]) -> List[torch.Tensor]:
        outs = []
        for code in codes:
            self.activate(code)
            outs.append(self.model(x))
        return outs

    def alpha(self) -> torch.Tensor:
        """Architecture parameters alpha as an L x O matrix (a copy, detached)."""
        return torch.stack([b.alpha.detach() for b in self._blocks]).cpu()

    def beta(self) -> torch.Tensor:
        return torch.stack([b.beta.detach() for b in self._blocks]).cpu()

    def arch_parameters(self) -> Iterator[nn.Parameter]:
        for b in self._blocks:
            yield b.alpha
            yield b.beta

    def weight_parameters(self) -> Iterator[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return (p for p in self.model.parameters() if id(p) not in arch)


def averaged_loss(outputs: Sequence[torch.Tensor], target: torch.Tensor, criterion: nn.Module) -> torch.Tensor:
    """Eq. 3-5: the loss of one step is the mean of the B subnets' losses on the same batch."""
    return torch.stack([criterion(out, target) for out in outputs]).mean()


@contextlib.contextmanager
def recalibrated(model: nn.Module, batches: Sequence[torch.Tensor]) -> Iterator[None]:
    """Inside the block, ``model``'s BatchNorm statistics are re-estimated for the code now active:
    the cumulative average over train-mode forwards of ``batches`` (no gradients). On exit the
    model's own statistics, momenta and mode come back.

    A SuperNet's running statistics average over every code it trained, weighted by how often it
    sampled them; a code it rarely or never sampled normalises with statistics that are not its own
    and scores far below what it can do (the remedy of SPOS, Guo et al. 2020: recalibrate before
    scoring). Fuse inside the block: the fused copy keeps the recalibrated statistics.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum)
             for m in bns]
    was_training = model.training
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # None: a cumulative average over the batches, not an exponential one
        model.train()
        with torch.no_grad():
            for x in batches:
                model(x)
        model.train(was_training)
        yield
    finally:
        for m, (mean, var, count, momentum) in zip(bns, saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
            m.momentum = momentum
        model.train(was_training)


def fuse_code(supernet: SuperNet, code: ArchCode, batches: Optional[Sequence[torch.Tensor]] = None) -> nn.Module:
    """``code`` fused from ``supernet`` into a new plain network in eval mode: with the SuperNet's own
    BatchNorm statistics, or, given ``batches``, with the code's own recalibrated on them (float32
    forwards: the statistics fusion folds)."""
    # unchecked: the search fuses many codes and scores each one right after
    if not batches:
        return fuse_model(supernet.model, arch=code, check=False).eval()
    supernet.activate(code)
    with recalibrated(supernet.model, batches):
        return fuse_model(supernet.model, arch=code, check=False).eval()
