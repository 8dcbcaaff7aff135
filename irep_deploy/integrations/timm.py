"""timm's networks as model specs: ``timm:NAME`` is ``timm.create_model(NAME, pretrained=False, **kwargs)``.

Imported by :mod:`irep_deploy.models.external` only when the user names a ``timm:`` spec (a flag or a
Python call), never because a file records one. Nothing is downloaded: ``pretrained`` is always
False, and the ``create_model`` arguments that fetch or read weights are refused; pretrained weights
come as a state-dict file (``--weights``), as for any spec. A pretrained tag in the name
(``resnet18.a1_in1k``) only selects timm's configuration of that name.

timm's re-parameterizable blocks (RepVGG, MobileOne, FastViT) are collapsed by their own
``reparameterize()`` before irepify rewrites their convs (:mod:`irep_deploy.own_reparam`, in the
core: it goes by method name and needs no timm).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import timm
import torch.nn as nn

from .._io import quote
from ..errors import UsageError

#: create_model arguments that would download weights or load a file (torch.load: pickle)
WEIGHT_ARGUMENTS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")


def timm_version() -> str:
    return timm.__version__.split("+")[0]


def model_factory(spec: str, name: str) -> Callable[..., nn.Module]:
    """The builder of timm model ``name``, refused in one line when timm has no such model.
    ``is_model`` knows only registered architectures (a pretrained tag is allowed), so hub and
    local-directory names (``hf-hub:...``, ``local-dir:...``), which fetch a configuration, are refused."""
    if not timm.is_model(name):
        raise UsageError("model spec {}: timm {} has no model {} (see timm.list_models())".format(
            quote(spec), timm_version(), quote(name)))

    def build(**kwargs: Any) -> nn.Module:
        return timm.create_model(name, pretrained=False, **kwargs)
    return build


def check_kwargs(spec: str, kwargs: Mapping[str, Any]) -> None:
    """Refuse the factory arguments that would fetch or read weights: a spec never downloads."""
    refused = [k for k in WEIGHT_ARGUMENTS if k in kwargs]
    if refused:
        raise UsageError("model spec {}: argument {} is refused: timm models are built with pretrained=False "
                         "and never download; give a state-dict file with --weights".format(
                             quote(spec), quote(refused[0])))
