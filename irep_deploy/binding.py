"""The binding between networks and architecture codes, for every network (built-in or not).

A network's searchable layers are its :class:`~irep_deploy.block.IrepConv` modules in registration
order; an :class:`~irep_deploy.arch.ArchCode` has one row per such layer. This module checks that a
code fits a network (:func:`plan_arch`), makes it the active branch set (:func:`apply_arch`) and
reads the current one back (:func:`current_arch`). The built-in zoo (:mod:`irep_deploy.models`),
:func:`~irep_deploy.irepify` and the integrations (:mod:`irep_deploy.integrations`) all use it; it
depends only on the code and block layers below it.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch.nn as nn

from .arch import ArchCode, LayerSpec, first_layer_difference
from .block import IrepConv
from .errors import ArchMismatchError, UsageError

__all__ = ["searchable_layers", "layer_specs", "model_config", "is_external", "plan_arch", "apply_arch",
           "current_arch", "activate"]


def searchable_layers(model: nn.Module) -> List[Tuple[str, IrepConv]]:
    """(module path, block) of every searchable 3x3 conv, in forward (registration) order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, IrepConv)]


def layer_specs(model: nn.Module) -> Tuple[LayerSpec, ...]:
    """The geometry of every IrepConv of ``model``, in registration order (the rows of its codes)."""
    return tuple(LayerSpec(n, m.in_channels, m.out_channels, m.stride, m.groups) for n, m in searchable_layers(model))


def model_config(model: nn.Module) -> Dict[str, Any]:
    """The construction arguments recorded on a model by ``build_model`` or ``irepify``."""
    config = getattr(model, "irep_config", None)
    if config is None:
        raise UsageError("this model was not made by irep_deploy.build_model (it has no irep_config)")
    return config


def is_external(model: nn.Module) -> bool:
    """A network made searchable by irepify (a model spec or a user's module), not a built-in backbone."""
    return model_config(model).get("model") is not None


def plan_arch(model: nn.Module, code: ArchCode, create: bool = False) -> List[Tuple[IrepConv, Tuple[str, ...]]]:
    """Check that ``code`` fits ``model`` and return (block, active ops) per searchable layer.

    Refuses, naming the first mismatch, a code for another backbone, with other ops or layers, or
    one that needs a branch the model does not hold (unless ``create``). Changes nothing.
    """
    config = model_config(model)
    blocks = searchable_layers(model)
    if is_external(model) or code.geometry is not None:
        # any network: the structure decides, not the label (the same net may be named two ways)
        if code.geometry is None:
            raise ArchMismatchError("architecture code is for {}, the model is {}".format(code.backbone, config["backbone"]))
        diff = first_layer_difference(code.geometry, layer_specs(model), "the code", "the model")
        if diff is not None:
            raise ArchMismatchError("architecture code for {} does not fit this {}: {}".format(
                code.backbone, config["backbone"], diff))
    elif code.backbone != config["backbone"]:
        raise ArchMismatchError("architecture code is for {}, the model is {}".format(code.backbone, config["backbone"]))
    names = tuple(n for n, _ in blocks)
    if names != code.layers:
        for i, (a, b) in enumerate(zip(code.layers, names)):
            if a != b:
                raise ArchMismatchError("row {} of the code is layer {}, the model's is {}".format(i + 1, a, b))
        raise ArchMismatchError("the code has {} layers, the model {}".format(len(code.layers), len(names)))
    plans = []
    for (name, block), row in zip(blocks, code.bits):
        if block.ops != code.ops:
            raise ArchMismatchError("the code's ops ({}) differ from the model's op space at {} ({})".format(
                " ".join(code.ops), name, " ".join(block.ops)))
        wanted = tuple(op for op, bit in zip(code.ops, row) if bit)
        for op in wanted:
            if not block.available(op):
                raise ArchMismatchError("op {} is unavailable at {} (stride {}, {}->{} channels)".format(
                    op, name, block.stride, block.in_channels, block.out_channels))
            if op not in block.branches and not create:
                raise ArchMismatchError("{} has no {} branch (the model holds: {})".format(
                    name, op, " ".join(block.branches) or "none"))
        plans.append((block, wanted))
    return plans


def apply_arch(model: nn.Module, code: ArchCode, create: bool = False) -> None:
    """Make ``code`` the active branch set of every searchable layer (checked first by
    :func:`plan_arch`, so a refused code leaves the model as it was); ``create`` adds missing
    branches freshly initialised."""
    for block, wanted in plan_arch(model, code, create):
        if create:
            block.add_branches(wanted)
        block.active = wanted


def current_arch(model: nn.Module) -> ArchCode:
    """The code of the branches ``model`` currently runs."""
    config = model_config(model)
    blocks = searchable_layers(model)
    ops = tuple(config["ops"])
    return ArchCode(config["backbone"], ops, [n for n, _ in blocks],
                    [[1 if op in block.active else 0 for op in ops] for _, block in blocks],
                    layer_specs(model) if is_external(model) else None)


def activate(model: nn.Module, code: Optional[ArchCode], supernet: bool = False) -> None:
    """Give a freshly built model its branches: ``code``'s (created), or with ``supernet`` every
    available branch, ``code`` (default: all) active."""
    model.irep_config["supernet"] = bool(supernet)
    if supernet:
        for _, block in searchable_layers(model):
            block.add_branches(op for op in block.ops if block.available(op))
        apply_arch(model, code if code is not None else ArchCode.full(
            model.irep_config["backbone"], model.irep_config["ops"]))
    elif code is not None:
        apply_arch(model, code, create=True)
