"""A network's own re-parameterization, applied before :func:`~irep_deploy.irepify` scans it.

Networks that already re-parameterize (timm's RepVGG and MobileOne blocks, FastViT's conv parts,
the original RepVGG, DBB and RepGhost code) hold training-time branches next to their 3x3 conv: a
1x1 conv-BN, an identity BN. Rewriting only the 3x3 conv would leave those branches in the fused
network, and their own fusion code, which reads the BN we moved, would crash afterwards. So they
are collapsed first, by their own code, into the plain conv they deploy as; that conv then becomes
the block's fixed op. Their fusion folds BN with its running statistics: it is exact in eval mode
(up to float rounding), as the network's own deploy form is.

The conventions honoured are those of ``timm.utils.model.reparameterize_model``, found by method
name (duck typing: the core never imports timm), called with no argument, children before their
own children: ``fuse()`` returning the replacement module (timm's LeViT, RepViT, EfficientViT),
else ``reparameterize()`` in place (timm, Apple's MobileOne/FastViT), else ``switch_to_deploy()``
in place (RepVGG, DBB, RepGhost). A method that needs arguments (a VAE's
``reparameterize(mu, logvar)``) is another convention and left alone. Ultralytics' ``RepConv.fuse_convs``
is not honoured here: it deletes the branches its ``forward`` still uses (Ultralytics swaps in
``forward_fuse`` itself), so calling it alone would break the network.
"""
from __future__ import annotations

import inspect
from typing import Any, List, Optional, Tuple

import torch
import torch.nn as nn

#: method names in the order timm's reparameterize_model tries them; "fuse" returns a replacement
CONVENTIONS: Tuple[str, ...] = ("fuse", "reparameterize", "switch_to_deploy")


def _no_argument_method(module: nn.Module, name: str) -> bool:
    method = getattr(module, name, None)
    if not callable(method):
        return False
    try:
        params = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: not a Python convention
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


def own_method(module: nn.Module) -> Optional[str]:
    """The re-parameterization method ``module`` offers (None: none)."""
    return next((name for name in CONVENTIONS if _no_argument_method(module, name)), None)


def apply_own_reparameterization(model: nn.Module) -> List[Tuple[str, str]]:
    """Collapse, in place, every submodule that re-parameterizes itself (the root is not one: as in
    timm, a network's own ``fuse`` may mean something else). Returns (module path, method) of each
    call, in the order made."""
    done: List[Tuple[str, str]] = []
    with torch.no_grad():
        _walk(model, "", done)
    return done


def _walk(parent: nn.Module, prefix: str, done: List[Tuple[str, str]]) -> None:
    for name, child in list(parent.named_children()):
        method = own_method(child)
        if method is not None:
            result: Any = getattr(child, method)()
            if method == "fuse" and isinstance(result, nn.Module) and result is not child:
                setattr(parent, name, result)
                child = result
            done.append((prefix + name, method))
        _walk(child, prefix + name + ".", done)
