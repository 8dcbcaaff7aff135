"""Checkpoints: a versioned header plus tensors, written atomically, read without running pickled code.

The file is a safetensors file (:mod:`irep_deploy.tensorfile`): the tensors in its tensor table, the
header as JSON in its metadata, with a sha256 of both that reading verifies. No pickle is involved
in writing or reading it, on any torch. Layout of the tree it holds::

    {"format": "irep-deploy-checkpoint", "format_version": 1,
     "header": {kind, backbone, num_classes, width, in_channels, input_size, ops, arch, supernet,
                package_version, torch_version, extra},
     "state_dict": {name: tensor}}

``kind`` is ``multi-branch`` (training form; ``supernet`` says whether every branch is held) or
``deploy`` (fused); ``arch`` is the architecture code in its text format. Checkpoints of earlier
versions (the same tree in a ``torch.save`` pickle) are read on torch >= 2.10, or with
``trust_pickle`` (``--trust-pickle``); ``irep-deploy convert`` rewrites them.

A network that is not built in (a model spec such as ``torchvision:resnet50``, or a user's module
passed through :func:`~irep_deploy.irepify`) adds ``model``: {kwargs, weights, include,
exclude, fingerprint}, all plain data. Nothing is imported because a checkpoint says so: the user
names the network (``--model`` or ``build(model=...)``) and a mismatch is refused.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from . import __version__
from ._io import quote
from .arch import ArchCode, fingerprint, first_layer_difference
from .errors import ArchFormatError, ArchMismatchError, CheckpointError, IrepError
from .ops import REGISTRY
from .binding import activate, apply_arch, current_arch, is_external, layer_specs, model_config
from .surgery import irepify
from .models import MODELS, build_model
from .reparam import fuse_model
from .tensorfile import load_tree, save_tree

FORMAT = "irep-deploy-checkpoint"
FORMAT_VERSION = 1
KINDS = ("multi-branch", "deploy")
_REQUIRED = ("kind", "backbone", "num_classes", "width", "in_channels", "input_size", "ops", "arch")

PathLike = Union[str, "os.PathLike[str]"]


def checkpoint_header(model: nn.Module, extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The header describing ``model`` (taken from its own build configuration)."""
    config = model_config(model)
    deploy = bool(config.get("deploy"))
    return {
        "kind": "deploy" if deploy else "multi-branch",
        "backbone": config["backbone"],
        "num_classes": int(config["num_classes"]),
        "width": float(config["width"]),
        "in_channels": int(config["in_channels"]),
        "input_size": int(config["input_size"]),
        "ops": list(config["ops"]),
        "arch": config["arch"] if deploy else current_arch(model).dumps(),
        "supernet": bool(config.get("supernet", False)),
        "package_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "extra": dict(extra or {}),
        **({"model": dict(config["model"])} if is_external(model) else {}),
    }


def save_checkpoint(path: PathLike, model: nn.Module, extra: Optional[Mapping[str, Any]] = None) -> None:
    """Write ``model`` (multi-branch or fused) with its header; atomic: all or nothing."""
    save_tree(path, {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "header": checkpoint_header(model, extra),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    })


@dataclass
class Checkpoint:
    """A checkpoint read from disk: its header and tensors, and how to rebuild the model."""

    path: str
    header: Dict[str, Any]
    state_dict: Dict[str, torch.Tensor]
    sha256: Optional[str] = None  # the file's checksum (tensorfile); None for an old pickle file

    @property
    def kind(self) -> str:
        return self.header["kind"]

    @property
    def supernet(self) -> bool:
        return bool(self.header.get("supernet", False))

    @property
    def arch(self) -> ArchCode:
        try:
            return ArchCode.loads(self.header["arch"], source=self.path + " (embedded architecture code)")
        except ArchFormatError as exc:
            raise CheckpointError(str(exc)) from exc

    @property
    def external(self) -> bool:
        """The network is not built in: :meth:`build` needs the user to name it."""
        return self.header.get("model") is not None

    def build(self, model: Union[str, nn.Module, None] = None) -> nn.Module:
        """The model this checkpoint was saved from, with its tensors loaded (strictly).

        For a network that is not built in, ``model`` names it: the model spec (``torchvision:resnet18``)
        or the user's own un-irepified module; it must have the checkpoint's structure. For a
        built-in backbone ``model`` may repeat its name.
        """
        net = self._bare_net(model)
        if self.kind == "deploy":
            net = fuse_model(net, inplace=True, check=False)  # a skeleton: its tensors are loaded next
            net.irep_config["arch"] = self.header["arch"]
        else:
            activate(net, self.arch, self.supernet)
        load_state(net, self.state_dict, self.path)
        return net

    def network(self, model: Union[str, nn.Module, None] = None, arch: Optional[ArchCode] = None) -> nn.Module:
        """The checkpoint's network with fresh weights and the branches of ``arch`` (None: none, the
        plain network): the same structure, for comparisons such as ``bench --compare``."""
        net = self._bare_net(model)
        activate(net, arch)
        return net

    def _bare_net(self, model: Union[str, nn.Module, None]) -> nn.Module:
        """The multi-branch network without branches, the named ``model`` checked against the header."""
        h = self.header
        if self.external:
            return self._external_net(model)
        if model is not None and model != h["backbone"]:
            raise CheckpointError("{}: holds a {} network, not {}".format(
                self.path, h["backbone"], model if isinstance(model, str) else type(model).__name__))
        return build_model(h["backbone"], num_classes=h["num_classes"], width=h["width"],
                           in_channels=h["in_channels"], ops=h["ops"], input_size=h["input_size"])

    def _external_net(self, model: Union[str, nn.Module, None]) -> nn.Module:
        h, spec = self.header, self.header["model"]
        name = h["backbone"]
        if model is None:
            raise CheckpointError("{}: holds a {} network; name it (--model {}) to load it: a checkpoint "
                                  "never imports code by itself".format(self.path, name, name))
        options = dict(ops=h["ops"], include=spec["include"] or None, exclude=spec["exclude"] or None)
        if isinstance(model, str):
            if model != name:
                raise CheckpointError("{}: holds a {} network, not {}".format(self.path, name, model))
            net = build_model(name, input_size=h["input_size"],
                              model_kwargs=spec["kwargs"], **options)
        else:
            net = irepify(model, name=name, input_size=h["input_size"], **options)
        specs = layer_specs(net)
        if fingerprint(specs) != spec["fingerprint"]:
            ours = self.arch.geometry or ()
            raise CheckpointError("{}: the named model does not have the checkpoint's structure: {}".format(
                self.path, first_layer_difference(ours, specs, "the checkpoint", "the named model")
                or "fingerprint {} vs {}".format(spec["fingerprint"], fingerprint(specs))))
        return net


def recorded_dataset(checkpoint: Checkpoint) -> Optional[str]:
    """The dataset the checkpoint was trained on, when ``train`` (or ``fuse`` after it) recorded it."""
    extra = checkpoint.header.get("extra") or {}
    config = extra.get("train_config")
    for value in (extra.get("dataset"), config.get("dataset") if isinstance(config, dict) else None):
        if isinstance(value, str) and value:
            return value
    return None


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with the first missing/extra/mis-shaped tensor named."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError("{}: missing tensor {!r}{} (the checkpoint does not fit a {})".format(
            source, missing[0], " and {} more".format(len(missing) - 1) if len(missing) > 1 else "",
            model_config(model)["backbone"]))
    extra = [k for k in state if k not in expected]
    if extra:
        raise CheckpointError("{}: unexpected tensor {!r}{}".format(
            source, extra[0], " and {} more".format(len(extra) - 1) if len(extra) > 1 else ""))
    for key, want in expected.items():
        got = state[key]
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError("{}: tensor {!r} has shape {}, the model expects {}".format(
                source, key, tuple(got.shape), tuple(want.shape)))
    model.load_state_dict(state, strict=True)


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu",
                    trust_pickle: bool = False) -> Checkpoint:
    """Read a checkpoint without running pickled code; every problem is one :class:`CheckpointError`.

    ``trust_pickle``: also read an old pickle-format checkpoint on torch < 2.10, whose unpickler can
    run code even with ``weights_only`` (on torch >= 2.10 such files are read without it)."""
    name = str(path)
    loaded = load_tree(name, "checkpoint", trust_pickle)
    header, state = checkpoint_parts(loaded.tree, name)
    if str(map_location) != "cpu":
        state = {k: v.to(map_location) for k, v in state.items()}
    return Checkpoint(name, header, state, loaded.sha256)


def checkpoint_parts(obj: Any, name: str) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """The header and tensors of a checkpoint's tree, every field validated (one line naming ``name``)."""
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError("{}: not an irep-deploy checkpoint{}".format(name, _what_it_is(obj)))
    version = obj.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError("{}: checkpoint format version {} is not a positive integer".format(name, quote(version)))
    if version > FORMAT_VERSION:
        raise CheckpointError("{}: checkpoint format version {} is newer than this irep-deploy reads ({})".format(
            name, version, FORMAT_VERSION))
    header, state = obj.get("header"), obj.get("state_dict")
    if not isinstance(header, dict) or not isinstance(state, dict):
        raise CheckpointError("{}: checkpoint has no header or no state_dict".format(name))
    for key in _REQUIRED:
        if key not in header:
            raise CheckpointError("{}: checkpoint header lacks {!r}".format(name, key))
    if header["kind"] not in KINDS:
        raise CheckpointError("{}: unknown checkpoint kind {}".format(name, quote(header["kind"])))
    check_header(header, name)
    if header.get("model") is None:
        _check_code_backbone(header, name)
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError("{}: state_dict entry {} is not a named tensor".format(name, quote(bad[0])))
    check_finite(state, name)
    return header, state


def _check_code_backbone(header: Mapping[str, Any], name: str) -> None:
    """A built-in backbone's header and its architecture code name the same network (a header edited to
    name another one would otherwise fail later, on the first layer that differs)."""
    try:
        code = ArchCode.loads(header["arch"], source=name + " (embedded architecture code)")
    except IrepError as exc:
        raise CheckpointError("{}: {}".format(name, exc) if name not in str(exc) else str(exc)) from exc
    if code.backbone != header["backbone"]:
        raise CheckpointError("{}: the header names the network {} but its architecture code and tensors are of {} "
                              "(an edited or mixed-up header)".format(name, quote(header["backbone"]),
                                                                     quote(code.backbone)))


def _what_it_is(obj: Any) -> str:
    """A hint for a file that is not a checkpoint: a bare state dict, or a run's state."""
    if isinstance(obj, dict) and isinstance(obj.get("format"), str) and obj["format"].endswith("-state"):
        return " (it is a run's resume state, {})".format(quote(obj["format"]))
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return " (it looks like a bare state dict)"
    return ""


# (type, low, high) of the numeric header fields; bool is refused although it is an int in Python
_RANGES = {"num_classes": (int, 1, 1_000_000), "in_channels": (int, 1, 1024), "input_size": (int, 1, 4096),
           "width": (float, 1e-3, 16.0)}


def check_header(header: Mapping[str, Any], name: str) -> None:
    """Every header field has the type and range the model builders accept (edited or foreign headers)."""
    backbone = header["backbone"]
    spec = header.get("model")
    if spec is not None:
        _check_model_field(spec, name)
        if not isinstance(backbone, str) or not backbone or len(backbone.split()) != 1:
            raise CheckpointError("{}: header field 'backbone' is {}, not a model name".format(name, quote(backbone)))
    elif not isinstance(backbone, str) or backbone not in MODELS:
        raise CheckpointError("{}: header field 'backbone' is {}, not a known backbone".format(name, quote(backbone)))
    for key, (kind, low, high) in _RANGES.items():
        value = header[key]
        if key == "num_classes" and spec is not None and value == 0:
            continue  # a network without a classifier (e.g. a detector backbone)
        ok_type = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
        if not ok_type or not math.isfinite(value) or not low <= value <= high:
            raise CheckpointError("{}: header field {!r} is {}; expected {} from {} to {}".format(
                name, key, quote(value), "a number" if kind is float else "an integer", low, high))
    ops = header["ops"]
    if not isinstance(ops, list) or not ops or not all(isinstance(op, str) for op in ops):
        raise CheckpointError("{}: header field 'ops' is {}, not a list of op names".format(name, quote(ops)))
    unknown = [op for op in ops if op not in REGISTRY]
    if unknown:
        raise CheckpointError("{}: header field 'ops' names unknown op {} (known: {})".format(
            name, quote(unknown[0]), " ".join(REGISTRY)))
    if len(set(ops)) != len(ops):
        raise CheckpointError("{}: header field 'ops' lists an op twice".format(name))
    if not isinstance(header["arch"], str):
        raise CheckpointError("{}: header field 'arch' is {}, not architecture-code text".format(
            name, quote(header["arch"])))
    for key, kind in (("supernet", bool), ("extra", dict)):
        if key in header and not isinstance(header[key], kind):
            raise CheckpointError("{}: header field {!r} is {}, not a {}".format(
                name, key, quote(header[key]), kind.__name__))


def _check_model_field(spec: Any, name: str) -> None:
    if not isinstance(spec, dict):
        raise CheckpointError("{}: header field 'model' is {}, not a dict".format(name, quote(spec)))
    for key, kind in (("kwargs", dict), ("include", list), ("exclude", list), ("fingerprint", str)):
        if not isinstance(spec.get(key), kind):
            raise CheckpointError("{}: header field 'model.{}' is {}, not a {}".format(
                name, key, quote(spec.get(key)), kind.__name__))
    for key in ("include", "exclude"):
        if not all(isinstance(p, str) for p in spec[key]):
            raise CheckpointError("{}: header field 'model.{}' holds a non-string pattern".format(name, key))


def check_finite(state: Mapping[str, torch.Tensor], name: str) -> None:
    """Refuse NaN/inf weights (a diverged run): they would give NaN outputs, not a result; and a
    negative BatchNorm variance, which no training produces (its square root would be NaN)."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError("{}: tensor {} holds NaN or inf values (a diverged run?)".format(name, quote(key)))
        if key.endswith("running_var") and tensor.is_floating_point() and bool((tensor < 0).any()):
            raise CheckpointError("{}: tensor {} (a BatchNorm running variance) holds negative values".format(
                name, quote(key)))


def load_model(path: PathLike, model: Union[str, nn.Module, None] = None, trust_pickle: bool = False) -> nn.Module:
    """Shorthand: read a checkpoint and rebuild its model (multi-branch or fused); ``model`` names a
    network that is not built in (see :meth:`Checkpoint.build`)."""
    return load_checkpoint(path, trust_pickle=trust_pickle).build(model)


def multi_branch_model(checkpoint: Checkpoint, arch: Optional[PathLike] = None,
                       model: Union[str, nn.Module, None] = None) -> nn.Module:
    """A multi-branch checkpoint's model with the code at ``arch`` active (default: its own code).

    The code must be the one the checkpoint was trained with; a SuperNet checkpoint takes any code
    of its space (and needs one). Mismatches name the first difference. ``model`` names a network
    that is not built in (:meth:`Checkpoint.build`).
    """
    if arch is None:
        if checkpoint.supernet:
            raise IrepError("{}: is a SuperNet checkpoint; give the architecture code to use".format(checkpoint.path))
        return checkpoint.build(model)
    code = ArchCode.load(arch)
    if not checkpoint.supernet:
        diff = checkpoint.arch.first_difference(code)
        if diff is not None:
            raise ArchMismatchError("{}: does not match the code {} was trained with: {}".format(
                arch, checkpoint.path, diff))
    net = checkpoint.build(model)
    try:
        apply_arch(net, code)
    except ArchMismatchError as exc:
        raise ArchMismatchError("{}: does not fit {}: {}".format(arch, checkpoint.path, exc)) from exc
    return net
