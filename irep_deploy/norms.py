"""Which norm layers fusion may absorb, and what stays in their place: the one rule for irepify's
blocks and for ``fuse_model``'s conv-BN folding.

A norm is absorbed only when its forward is known to be the affine BatchNorm map (in eval mode; and,
as a block's fixed BN, the plain BatchNorm in train mode): the exact types ``nn.BatchNorm2d``,
``nn.SyncBatchNorm`` and torchvision's ``FrozenBatchNorm2d``, or a known norm-act layer whose forward
was read and is recognised (timm's ``BatchNormAct2d``, ``SyncBatchNormAct``, ``FrozenBatchNormAct2d``:
BN, then drop, then activation). A norm-act layer is split: a plain BN holding the layer's own
Parameter and buffer objects is absorbed, and its drop and activation stay in its place. Anything
else that looks like a BN (a subclass, a module with BN statistics and another forward) is refused
with a reason: folding it as an affine map could silently change what the network computes.

timm is never imported: its classes are recognised by module, name and a digest of their forward's
source, so a timm version whose forward changed is refused until it is read and its digest added.
"""
from __future__ import annotations

import hashlib
import inspect
import io
import textwrap
import tokenize
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn


class AfterNorm(nn.Module):
    """What a norm-act layer applies after its BN: its own ``drop``, then its own ``act``.

    The children keep their names, so their state-dict keys (a PReLU's weight) stay where they were.
    """

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


@dataclass(frozen=True)
class NormSplit:
    """An absorbable norm: ``bn`` (a plain BN) goes into the conv; ``after`` takes the norm's place."""

    bn: nn.Module
    after: nn.Module


def _frozen_bn_type() -> Optional[type]:
    try:  # torchvision's detection backbones use it; torchvision itself is optional here
        from torchvision.ops import FrozenBatchNorm2d
    except ImportError:  # pragma: no cover - torchvision is a dependency of the project
        return None
    return FrozenBatchNorm2d


def is_bn_like(module: nn.Module) -> bool:
    """Looks like a BN after a conv (running statistics of its channels): a candidate for folding,
    absorbed only if :func:`split_norm` accepts it. Instance norms with running statistics are not."""
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return False
    return all(isinstance(getattr(module, name, None), torch.Tensor) for name in ("running_mean", "running_var"))


def forward_digest(function: Callable) -> Optional[str]:
    """A digest of a function's source tokens (comments and blank lines ignored); None: no source."""
    try:
        source = textwrap.dedent(inspect.getsource(function))
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (OSError, TypeError, tokenize.TokenError, IndentationError):
        return None
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.ENDMARKER)
    # NEWLINE/INDENT/DEDENT are kept by name: a statement moved in or out of a block changes the digest
    text = " ".join(tokenize.tok_name[t.type] if t.type in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
                    else t.string for t in tokens if t.type not in skip)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _shared_bn(module: nn.Module, bn: nn.Module) -> nn.Module:
    """``bn`` holding ``module``'s own Parameter and buffer objects: train-mode batch statistics and
    running-stat updates land on the same tensors as before."""
    for name in list(bn._parameters):
        bn._parameters[name] = module._parameters.get(name)
    for name in list(bn._buffers):
        bn._buffers[name] = module._buffers.get(name)
    bn.train(module.training)
    return bn


def _bn_of_bn_act(module: nn.Module) -> nn.Module:
    bn = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                        module.track_running_stats)
    return _shared_bn(module, bn)


def _bn_of_sync_bn_act(module: nn.Module) -> nn.Module:
    bn = nn.SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                          module.track_running_stats, process_group=module.process_group)
    return _shared_bn(module, bn)


def _bn_of_frozen_bn_act(module: nn.Module) -> nn.Module:
    frozen = _frozen_bn_type()
    if frozen is None:  # pragma: no cover - torchvision is a dependency of the project
        raise ImportError("torchvision is needed to absorb timm's FrozenBatchNormAct2d")
    return _shared_bn(module, frozen(module.running_mean.numel(), module.eps))


# timm's norm-act layers whose forward was read (timm/layers/norm_act.py; the digests are the same in
# timm 0.9.2, 0.9.16, 1.0.3, 1.0.9, 1.0.15, 1.0.20, 1.0.25, 1.0.30 and 1.0.31): BN (the same
# F.batch_norm call as torch's BatchNorm2d, or SyncBatchNorm.forward, or the frozen affine map), then
# ``drop``, then ``act``. Key: (module, qualname); value: the plain-BN builder and the forward digests.
_TIMM_NORM_ACT: Dict[Tuple[str, str], Tuple[Callable[[nn.Module], nn.Module], Tuple[str, ...]]] = {
    ("timm.layers.norm_act", "BatchNormAct2d"): (_bn_of_bn_act, ("4f710d809db7ee4c",)),
    ("timm.layers.norm_act", "SyncBatchNormAct"): (_bn_of_sync_bn_act, ("a8c876e96a0ca2ae",)),
    ("timm.layers.norm_act", "FrozenBatchNormAct2d"): (_bn_of_frozen_bn_act, ("33192c8b67a8b910",)),
}
# the torch base each timm class must have directly: the BN part relies on that base's state
_TIMM_BASES = {"BatchNormAct2d": nn.BatchNorm2d, "SyncBatchNormAct": nn.SyncBatchNorm,
               "FrozenBatchNormAct2d": nn.Module}


def _plain_types() -> Tuple[type, ...]:
    frozen = _frozen_bn_type()
    return (nn.BatchNorm2d, nn.SyncBatchNorm) + ((frozen,) if frozen is not None else ())


def split_norm(module: nn.Module) -> Union[NormSplit, str]:
    """The rule: ``module`` as a BN to absorb and what stays in its place, or why it cannot be absorbed."""
    kind = type(module)
    name = "a {}.{}".format(kind.__module__, kind.__qualname__)
    if not is_bn_like(module):
        return "{} has no running statistics to fold".format(name)
    if "forward" in module.__dict__:
        return "{} with its own forward set on the instance".format(name)
    if module._forward_hooks or module._forward_pre_hooks:
        return "{} with forward hooks (they would no longer run)".format(name)
    if kind in _plain_types():
        return NormSplit(module, nn.Identity())
    known = _TIMM_NORM_ACT.get((kind.__module__, kind.__qualname__))
    if known is None:
        return ("{} (only BatchNorm2d, SyncBatchNorm, FrozenBatchNorm2d and timm's norm-act layers are "
                "folded: its forward may compute something else)".format(name))
    build, digests = known
    if kind.__bases__ != (_TIMM_BASES[kind.__qualname__],):
        return "{} with other base classes than the one checked".format(name)
    digest = forward_digest(kind.forward)
    if digest not in digests:
        return "{} whose forward differs from the one checked (digest {})".format(name, digest)
    # SyncBatchNormAct has drop and act only when timm's convert_sync_batchnorm set them
    drop, act = (getattr(module, part, None) for part in ("drop", "act"))
    after = AfterNorm(nn.Identity() if drop is None else drop, nn.Identity() if act is None else act)
    return NormSplit(build(module), after)
