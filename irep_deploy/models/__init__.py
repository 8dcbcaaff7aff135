"""The model zoo: ``build_model(name, arch=...)`` and the link between models and architecture codes."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..arch import ArchCode, LayerSpec, first_layer_difference, register_backbone
from ..block import IrepConv
from ..errors import ArchMismatchError, UsageError
from ..surgery import irepify, layer_specs
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


def searchable_layers(model: nn.Module) -> List[Tuple[str, IrepConv]]:
    """(module path, block) of every searchable 3x3 conv, in forward (registration) order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, IrepConv)]


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


def model_config(model: nn.Module) -> Dict[str, Any]:
    """The construction arguments recorded on a model by :func:`build_model`."""
    config = getattr(model, "irep_config", None)
    if config is None:
        raise UsageError("this model was not made by irep_deploy.build_model (it has no irep_config)")
    return config


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
