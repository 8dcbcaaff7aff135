"""The model zoo: ``build_model(name, arch=...)`` for the built-in backbones and model specs.

The link between models and architecture codes lives in :mod:`irep_deploy.binding`; its functions
are re-exported here for existing imports."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..arch import ArchCode, LayerSpec, register_backbone
from ..block import IrepConv
from ..binding import (activate, apply_arch, current_arch, is_external, model_config, plan_arch,
                       searchable_layers)
from ..errors import ArchMismatchError, UsageError
from ..surgery import irepify
from ..ops import SPACES, check_ops
from .external import build_external, factory_kwargs, is_spec
from .common import ConvFactory
from .resnet import BasicBlock, Bottleneck, ResNet
from .vgg import VGG

__all__ = ["MODELS", "ModelEntry", "build_model", "apply_arch", "current_arch", "searchable_layers",
           "model_config", "plan_arch", "is_external", "is_spec", "activate", "ResNet", "VGG"]

Factory = Callable[..., nn.Module]  # (conv3x3, num_classes, width, in_channels) -> nn.Module


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: Factory
    space: str
    num_classes: int
    input_size: int
    torchvision: Optional[str] = None  # torchvision.models builder with the same fused layout


def _resnet(block, layers: List[int], cifar: bool) -> Factory:
    return functools.partial(ResNet, block, layers, cifar=cifar)


MODELS: Dict[str, ModelEntry] = {e.name: e for e in (
    ModelEntry("resnet18", _resnet(BasicBlock, [2, 2, 2, 2], False), "resnet_imagenet", 1000, 224, "resnet18"),
    ModelEntry("resnet34", _resnet(BasicBlock, [3, 4, 6, 3], False), "resnet_imagenet", 1000, 224, "resnet34"),
    ModelEntry("resnet50", _resnet(Bottleneck, [3, 4, 6, 3], False), "resnet_imagenet", 1000, 224, "resnet50"),
    ModelEntry("vgg16", functools.partial(VGG, cifar=False), "vgg", 1000, 224, "vgg16"),
    ModelEntry("resnet18_cifar", _resnet(BasicBlock, [2, 2, 2, 2], True), "resnet_cifar", 10, 32),
    ModelEntry("vgg16_cifar", functools.partial(VGG, cifar=True), "vgg", 10, 32),
)}


def _irep_factory(ops: Sequence[str]) -> ConvFactory:
    def conv3x3(cin: int, cout: int, stride: int) -> nn.Module:
        return IrepConv(cin, cout, stride, 1, ops)
    return conv3x3


def _layer_table(name: str) -> Callable[[], Tuple[LayerSpec, ...]]:
    @functools.lru_cache(maxsize=None)
    def layers() -> Tuple[LayerSpec, ...]:
        entry = MODELS[name]
        with torch.device("meta"):  # geometry only: no memory, no initialisation cost
            model = entry.factory(_irep_factory(SPACES[entry.space]), num_classes=entry.num_classes)
        return tuple(LayerSpec(n, b.in_channels, b.out_channels, b.stride, b.groups)
                     for n, b in searchable_layers(model))
    return layers


for _entry in MODELS.values():
    register_backbone(_entry.name, _layer_table(_entry.name), _entry.space)


def _as_code(arch: Union[ArchCode, str, "os.PathLike[str]", None]) -> Optional[ArchCode]:
    if arch is None or isinstance(arch, ArchCode):
        return arch
    return ArchCode.load(arch)


def build_model(name: str, arch: Union[ArchCode, str, "os.PathLike[str]", None] = None,
                num_classes: Optional[int] = None, width: float = 1.0, in_channels: Optional[int] = None,
                ops: Optional[Sequence[str]] = None, supernet: bool = False,
                input_size: Optional[int] = None, model_kwargs: Optional[Dict[str, Any]] = None,
                weights: Optional[str] = None, include: Optional[Sequence[str]] = None,
                exclude: Optional[Sequence[str]] = None, trust_pickle: bool = False) -> nn.Module:
    """Build a multi-branch network.

    ``arch`` (an :class:`ArchCode` or a path to one) says which branches each searchable 3x3 conv
    keeps; None means none (the plain backbone, with BN). ``supernet=True`` builds every available
    branch of the op space and makes ``arch`` (default: all) the active set, so that the search can
    switch codes between forwards. ``ops`` overrides the backbone's default space (an ``arch``
    brings its own). ``width`` scales every channel count (CPU-scale runs). ``input_size`` is the
    resolution the model is trained and deployed at (default: the backbone's, e.g. 32 for the CIFAR
    layouts); it changes no layer, it is recorded for the checkpoint header, export and bench.

    ``name`` may also be a model spec, ``torchvision:<name>`` or ``package.module:factory``: the
    network is built by that factory (``model_kwargs``, JSON data; ``weights``, a state-dict file or
    a torchvision weights name) and made searchable by :func:`~irep_deploy.irepify`
    (``include``/``exclude``: module-path patterns). Such networks keep their own width and input
    channels. ``trust_pickle``: a ``weights`` file in the old pickle format is read on torch < 2.10 too
    (:func:`~irep_deploy.models.external.load_weights`).
    """
    code = _as_code(arch)
    if code is not None and ops is not None and tuple(ops) != code.ops:
        raise ArchMismatchError("ops {} differ from the architecture code's ops {}".format(list(ops), list(code.ops)))
    if width <= 0:
        raise UsageError("width must be positive, got {}".format(width))
    if input_size is not None and input_size < 1:
        raise UsageError("input size must be at least 1, got {}".format(input_size))
    if is_spec(name):
        space = code.ops if code is not None else check_ops(ops if ops is not None else SPACES["any"])
        model = _build_spec(name, space, num_classes, width, in_channels, input_size, model_kwargs, weights,
                            include, exclude, trust_pickle)
    else:
        try:
            entry = MODELS[name]
        except KeyError as exc:
            raise ArchMismatchError("unknown model {!r} (known: {}; or a model spec such as "
                                    "torchvision:resnet18)".format(name, ", ".join(MODELS))) from exc
        if model_kwargs or weights or include or exclude:
            raise UsageError("model arguments, weights, include and exclude apply to model specs, not to the "
                             "built-in {}".format(name))
        space = code.ops if code is not None else check_ops(ops if ops is not None else SPACES[entry.space])
        num_classes = entry.num_classes if num_classes is None else num_classes
        in_channels = 3 if in_channels is None else in_channels
        model = entry.factory(_irep_factory(space), num_classes=num_classes, width=width, in_channels=in_channels)
        model.irep_config = {
            "backbone": name, "num_classes": num_classes, "width": width, "in_channels": in_channels,
            "ops": list(space), "input_size": input_size or entry.input_size, "supernet": bool(supernet),
        }
    activate(model, code, supernet)
    return model


def _build_spec(spec: str, space: Sequence[str], num_classes: Optional[int], width: float,
                in_channels: Optional[int], input_size: Optional[int], model_kwargs: Optional[Dict[str, Any]],
                weights: Optional[str], include: Optional[Sequence[str]], exclude: Optional[Sequence[str]],
                trust_pickle: bool = False) -> nn.Module:
    if width != 1.0:
        raise UsageError("--width applies to the built-in backbones; {} keeps its own channels".format(spec))
    kwargs = factory_kwargs(spec, model_kwargs or {}, num_classes)
    net = build_external(spec, kwargs, weights, trust_pickle)
    model = irepify(net, space, include, exclude, inplace=True, name=spec, input_size=input_size or 224)
    config = model.irep_config
    if in_channels is not None and in_channels != config["in_channels"]:
        raise UsageError("{} takes {} input channel(s), the data has {}".format(spec, config["in_channels"], in_channels))
    config["model"].update(kwargs=kwargs, weights=weights)
    return model
