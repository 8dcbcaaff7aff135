"""Networks named by a model spec: ``torchvision:<name>`` or ``package.module:factory``.

A spec is only ever resolved because the user named it (a flag or a Python call); a checkpoint that
records a spec is refused unless the user names the same one (:mod:`irep_deploy.checkpoint`).
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch
import torch.nn as nn

from .._io import no_typed_storage_warning, quote, regular_input
from ..errors import CheckpointError, UsageError, first_line


def is_spec(name: str) -> bool:
    """Built-in backbones are plain words; a spec has a ``:``."""
    return ":" in name


def resolve_factory(spec: str) -> Callable[..., nn.Module]:
    """The callable a spec names; every failure is one :class:`UsageError` naming the spec."""
    source, _, target = spec.partition(":")
    if not source or not target:
        raise UsageError("model spec {} is not 'torchvision:<name>' or 'package.module:factory'".format(quote(spec)))
    if source == "torchvision":
        import torchvision.models

        if target not in torchvision.models.list_models():
            raise UsageError("model spec {}: torchvision {} has no model {} (see torchvision.models.list_models())".format(
                quote(spec), torchvision.__version__.split("+")[0], quote(target)))
        return lambda **kwargs: torchvision.models.get_model(target, **kwargs)
    try:
        module = importlib.import_module(source)
    except Exception as exc:  # ImportError, or whatever the user's module raises while importing
        raise UsageError("model spec {}: cannot import {} ({}: {})".format(
            quote(spec), source, type(exc).__name__, first_line(exc, 120))) from exc
    factory: Any = module
    for part in target.split("."):
        factory = getattr(factory, part, None)
    if not callable(factory):
        raise UsageError("model spec {}: {} has no callable {}".format(quote(spec), source, quote(target)))
    return factory


def _accepts(factory: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def check_kwargs(spec: str, kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """Factory arguments must be JSON data: they are recorded in checkpoints as data, never as code."""
    try:
        return json.loads(json.dumps(dict(kwargs)))
    except (TypeError, ValueError) as exc:
        raise UsageError("model spec {}: arguments must be JSON data (str, number, bool, list, dict): {}".format(
            quote(spec), exc)) from exc


def factory_kwargs(spec: str, kwargs: Mapping[str, Any], num_classes: Optional[int]) -> Dict[str, Any]:
    """The factory's arguments: ``kwargs`` (JSON data), plus ``num_classes`` where the factory takes
    it and ``kwargs`` does not set it. This is what a checkpoint records."""
    args = check_kwargs(spec, kwargs)
    if num_classes is not None and "num_classes" not in args and _accepts(resolve_factory(spec), "num_classes"):
        args["num_classes"] = num_classes
    return args


_WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".safetensors")


def weights_file(weights: Optional[str], spec: str) -> bool:
    """Whether ``weights`` names a state-dict file (True) or a torchvision weights name (False);
    a missing file, or a name for a network that is not torchvision's, is refused naming --weights."""
    if weights is None:
        return False
    regular_input(weights, "a state dict (--weights)", CheckpointError)
    if Path(weights).is_file():
        return True
    looks_like_path = os.sep in weights or weights.lower().endswith(_WEIGHT_FILE_SUFFIXES)
    if looks_like_path or not spec.startswith("torchvision:"):
        raise UsageError("--weights {}: no such file{}".format(
            weights, "" if looks_like_path else " (weight names apply to torchvision models only)"))
    return False


def check_spec(spec: str, kwargs: Optional[Mapping[str, Any]] = None, weights: Optional[str] = None) -> None:
    """Refuse, before any work, a spec that names nothing callable, arguments that are not JSON data
    and a weights file that does not exist (the network itself is built later)."""
    resolve_factory(spec)
    check_kwargs(spec, kwargs or {})
    weights_file(weights, spec)


def build_external(spec: str, kwargs: Mapping[str, Any], weights: Optional[str] = None) -> nn.Module:
    """Call the spec's factory with ``kwargs``. ``weights``: a state-dict file (read with
    ``weights_only=True``) or, for torchvision, a weights name such as ``IMAGENET1K_V1``
    (torchvision's weights API)."""
    factory = resolve_factory(spec)
    args = check_kwargs(spec, kwargs)
    from_file = weights_file(weights, spec)
    if weights is not None and not from_file:
        args["weights"] = weights
    try:
        model = factory(**args)
    except Exception as exc:  # the user's factory or torchvision refusing its arguments
        raise UsageError("model spec {}: building it failed ({}: {})".format(
            quote(spec), type(exc).__name__, first_line(exc, 160))) from exc
    if not isinstance(model, nn.Module):
        raise UsageError("model spec {}: the factory returned {}, not an nn.Module".format(quote(spec), type(model).__name__))
    if from_file:
        load_weights(model, weights)
    return model


def load_weights(model: nn.Module, path: Union[str, "os.PathLike[str]"]) -> None:
    """Load a plain state dict (the user's pretrained weights) strictly, without running pickled code."""
    name = str(path)
    regular_input(path, "a state dict", CheckpointError)
    try:
        with no_typed_storage_warning():
            state = torch.load(name, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError("{}: not a readable state dict ({})".format(
            name, first_line(exc, 120))) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("{}: not a state dict of tensors".format(name))
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise CheckpointError("{}: does not fit the model ({})".format(
            name, str(exc).strip().splitlines()[-1].strip()[:160])) from exc
    wrong = list(result.missing_keys) + list(result.unexpected_keys)
    if wrong:
        what = "missing" if result.missing_keys else "unexpected"
        raise CheckpointError("{}: does not fit the model: {} tensor {}{}".format(
            name, what, quote(wrong[0]), " and {} more".format(len(wrong) - 1) if len(wrong) > 1 else ""))
