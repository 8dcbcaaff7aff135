"""Ultralytics YOLO (AGPL-3.0, an optional extra): IREPS blocks in a YOLOv8/YOLO11 detector that
Ultralytics itself trains, fuses, predicts with, validates and exports.

How it fits Ultralytics' own convention (``BaseModel.fuse`` in ``ultralytics/nn/tasks.py``, the same
from 8.1 on): an Ultralytics ``Conv`` holds ``conv``, ``bn`` and ``act``; ``fuse()`` folds
``bn`` into ``conv`` for every ``Conv`` that still has a ``bn`` attribute, then deletes it and
switches the module to ``forward_fuse`` (``act(conv(x))``). After :func:`irepify_yolo` a ``Conv``
whose 3x3 conv became an :class:`~irep_deploy.block.IrepConv` holds its BN inside the block, so it is
given the state ``fuse()`` leaves behind: no ``bn`` attribute, ``forward_fuse``. Ultralytics then
never touches it. The model's class becomes :class:`IrepDetectionModel`, a ``DetectionModel`` whose
``fuse()`` first fuses the blocks with :func:`~irep_deploy.fuse_model` and then runs Ultralytics'
own ``fuse()`` for everything else; ``predict``, ``val`` and ``export`` call that method, so they
work on the multi-branch and on the fused model alike. A subclass rather than a patched instance
method: Ultralytics pickles whole models into its checkpoints, and a class pickles by name.

Training: Ultralytics' trainer rebuilds the model from its yaml, which would lose the blocks.
:class:`IrepDetectionTrainer` (``yolo.train(..., trainer=IrepDetectionTrainer)``) trains a copy of
the irepified model instead. Its EMA copy, ``last.pt`` and ``best.pt`` hold the same blocks.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, List, Optional, Sequence, TypeVar, Union

import torch.nn as nn
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.nn.modules import Conv, DWConv
from ultralytics.nn.tasks import DetectionModel

from ..arch import ArchCode
from ..errors import IrepError
from ..models import apply_arch
from ..reparam import fuse_model
from ..surgery import irepify

__all__ = ["IrepDetectionModel", "IrepDetectionTrainer", "irepify_yolo", "fuse_yolo"]

Target = TypeVar("Target")  # a YOLO object or a DetectionModel: the functions return what they got
Patterns = Union[str, Sequence[str], None]


class IrepDetectionModel(DetectionModel):
    """A ``DetectionModel`` with IrepConv blocks; its ``fuse()`` fuses them before Ultralytics' own."""

    def fuse(self, *args: Any, **kwargs: Any) -> "IrepDetectionModel":
        # *args/**kwargs: the signature differs across versions (8.1: verbose; 8.4: verbose, imgsz)
        if not self.irep_config.get("deploy"):
            fuse_model(self, inplace=True)
            _drop_absorbed_bn(self)
        return super().fuse(*args, **kwargs)

    def is_fused(self, *args: Any, **kwargs: Any) -> bool:
        # Ultralytics decides by its own BN (8.4: Conv.bn; 8.1: fewer than 10 norm layers): a model
        # whose blocks still have branches is not fused, whatever the rest looks like
        return bool(self.irep_config.get("deploy")) and super().is_fused(*args, **kwargs)


def _drop_absorbed_bn(model: nn.Module) -> None:
    """Give every Conv whose BN was absorbed (its place holds nn.Identity) the state Ultralytics'
    fuse() leaves behind, so that fuse() never folds an Identity or an IrepConv."""
    for module in model.modules():
        if isinstance(module, Conv) and isinstance(getattr(module, "bn", None), nn.Identity):
            del module.bn
            module.forward = module.forward_fuse


def _detection_model(target: Any) -> DetectionModel:
    # a YOLO object is an nn.Module too (Ultralytics' Model), holding the DetectionModel as .model
    model = target if isinstance(target, DetectionModel) else getattr(target, "model", None)
    if type(model) not in (DetectionModel, IrepDetectionModel):
        raise IrepError("expected an Ultralytics YOLO detection model (DetectionModel), got {}".format(
            type(model).__name__))
    return model


def _class_count(model: DetectionModel) -> int:
    return int(model.model[-1].nc)


def _label(model: DetectionModel) -> str:
    stem = Path(str(model.yaml.get("yaml_file", "yolo"))).stem
    return "ultralytics-{}-nc{}".format(stem, _class_count(model))


def _rebuilt_for(model: DetectionModel, nc: int) -> DetectionModel:
    """``model`` with a head for ``nc`` classes, its other weights carried over by Ultralytics' load."""
    # the input channels come from the yaml copy ("ch" in 8.1, "channels" in 8.4), which wins over the argument
    rebuilt = DetectionModel(copy.deepcopy(model.yaml), nc=nc, verbose=False)
    rebuilt.load(model, verbose=False)
    for attr in ("args", "task"):
        if hasattr(model, attr):
            setattr(rebuilt, attr, getattr(model, attr))
    return rebuilt


def _yolo_convs(model: DetectionModel) -> List[str]:
    """The 3x3 candidates: the ``conv`` of every plain Ultralytics Conv/DWConv. Other modules (RepConv,
    Conv2) fold their own convs in fuse() and would read weights an IrepConv does not have."""
    return [path + ".conv" for path, m in model.named_modules() if type(m) in (Conv, DWConv)]


def irepify_yolo(target: Target, ops: Optional[Sequence[str]] = None,
                 arch: Union[ArchCode, str, None] = None, seed: int = 0, ratio: float = 2 / 3,
                 nc: Optional[int] = None, exclude: Patterns = None) -> Target:
    """Turn the 3x3 convs of a YOLOv8/YOLO11 detector into IrepConv blocks, with branches.

    ``target`` is an Ultralytics ``YOLO`` object (its model is replaced, in place) or a
    ``DetectionModel`` (a new model is returned). ``nc`` first rebuilds the head for that many
    classes (the width of the class branch, and so the layer table of codes, depends on it; set
    it to your dataset's class count before choosing branches). ``arch`` is an architecture code
    (object or file) of this network; without it, a random code of ``ratio`` of the slots is
    drawn with ``seed``. ``ops`` is the op space (default: all IREPS ops); ``exclude`` module-path
    patterns to leave alone. The result computes exactly what the detector did (new branches
    start at zero output).
    """
    model = _detection_model(target)
    if isinstance(model, IrepDetectionModel):
        raise IrepError("this YOLO is already irepified")
    if nc is not None and nc != _class_count(model):
        model = _rebuilt_for(model, int(nc))
    net = irepify(model, ops=ops, include=_yolo_convs(model), exclude=exclude, name=_label(model))
    net.__class__ = IrepDetectionModel
    _drop_absorbed_bn(net)
    code = ArchCode.load(arch) if isinstance(arch, (str, Path)) else arch
    if code is None:
        code = ArchCode.random(net.irep_config["backbone"], ratio=ratio, seed=seed, ops=net.irep_config["ops"])
    apply_arch(net, code, create=True)
    if isinstance(target, DetectionModel):
        return net
    target.model = net
    # Ultralytics' own marker (Model.load sets it) that train() starts from this module, so it is
    # handed to the trainer's get_model instead of a model rebuilt from the yaml
    target.ckpt = target.ckpt or {"model": net}
    target.predictor = None
    if _require_irep_trainer not in target.callbacks.get("on_pretrain_routine_start", []):
        target.add_callback("on_pretrain_routine_start", _require_irep_trainer)
    return target


def fuse_yolo(target: Target) -> Target:
    """Fuse every block (and every BN) of an irepified YOLO in place: plain convs with bias, the
    network Ultralytics' own fuse() would give for the same weights without branches."""
    model = _detection_model(target)
    if not isinstance(model, IrepDetectionModel):
        raise IrepError("this YOLO has no IrepConv blocks: irepify_yolo(yolo) first")
    if model.irep_config.get("deploy"):
        raise IrepError("this YOLO is already fused")
    model.fuse(verbose=False)
    if not isinstance(target, DetectionModel):
        target.predictor = None
    return target


class IrepDetectionTrainer(DetectionTrainer):
    """Ultralytics' detection trainer for an irepified model: ``get_model`` returns a copy of the
    model it is given (``yolo.model``) instead of rebuilding a plain one from the yaml."""

    def get_model(self, cfg: Any = None, weights: Optional[nn.Module] = None,
                  verbose: bool = True) -> IrepDetectionModel:
        if not isinstance(weights, IrepDetectionModel):
            raise IrepError("IrepDetectionTrainer trains an irepified model: call irepify_yolo(yolo) before "
                            "yolo.train(..., trainer=IrepDetectionTrainer) (and do not pass pretrained=False)")
        if weights.irep_config.get("deploy"):
            raise IrepError("this YOLO is fused (predict, val and export fuse it in place): train the "
                            "multi-branch model, e.g. reload best.pt")
        nc = int(self.data["nc"])
        if _class_count(weights) != nc:
            raise IrepError("the irepified model has {} classes, the data {}: irepify it for them, "
                            "irepify_yolo(yolo, nc={})".format(_class_count(weights), nc, nc))
        return copy.deepcopy(weights)


def _require_irep_trainer(trainer: Any) -> None:
    """Refuse Ultralytics' default trainer on an irepified YOLO: it would silently train a plain model."""
    if not isinstance(trainer, IrepDetectionTrainer):
        raise IrepError("this YOLO has IrepConv blocks: train it with yolo.train(..., trainer=IrepDetectionTrainer); "
                        "{} rebuilds a plain model from the yaml".format(type(trainer).__name__))
