"""Networks named by a model spec: ``torchvision:<name>``, ``timm:<name>`` or ``package.module:factory``.

A spec is only ever resolved because the user named it (a flag or a Python call); a file that records
a spec (a checkpoint, an architecture code, a run's saved settings) is refused unless the user names
the same one (:func:`named_spec`, :mod:`irep_deploy.checkpoint`). What a spec names is checked before
it is called (:func:`factory_problem`).
"""
from __future__ import annotations

import builtins
import importlib
import inspect
import json
import os
import re
import types
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Type, Union

import torch
import torch.nn as nn

from .._io import quote, regular_input
from ..errors import CheckpointError, IrepError, NotAvailableError, UsageError, first_line
from ..tensorfile import load_tree


def is_spec(name: str) -> bool:
    """Built-in backbones are plain words; a spec has a ``:``."""
    return ":" in name


def _timm(spec: str) -> types.ModuleType:
    """:mod:`irep_deploy.integrations.timm`, imported only because the user named a ``timm:`` spec
    (timm is an optional extra: the core never imports it)."""
    try:
        from ..integrations import timm as integration
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] != "timm":
            raise
        raise NotAvailableError("model spec {} needs the timm extra: pip install irep-deploy[timm]".format(
            quote(spec))) from exc
    except Exception as exc:  # an installed timm that fails to import
        raise UsageError("model spec {}: cannot import timm ({}: {})".format(
            quote(spec), type(exc).__name__, first_line(exc, 120))) from exc
    return integration


def resolve_factory(spec: str) -> Callable[..., nn.Module]:
    """The callable a spec names, checked before anything calls it (:func:`check_factory`); every
    failure is one :class:`UsageError` naming the spec. The module is imported: only ever because
    the user named the spec (a flag or a Python call), never because a file did (:func:`named_spec`)."""
    source, _, target = spec.partition(":")
    if not source or not target:
        raise UsageError("model spec {} is not 'torchvision:<name>', 'timm:<name>' or 'package.module:factory'".format(
            quote(spec)))
    if source == "torchvision":
        import torchvision.models

        if target not in torchvision.models.list_models():
            raise UsageError("model spec {}: torchvision {} has no model {} (see torchvision.models.list_models())".format(
                quote(spec), torchvision.__version__.split("+")[0], quote(target)))
        return lambda **kwargs: torchvision.models.get_model(target, **kwargs)
    if source == "timm":
        return _timm(spec).model_factory(spec, target)
    parts = target.split(".")
    private = [p for p in parts if not p.isidentifier() or p.startswith("_")]
    if private:  # checked before the import: a private or dunder name is no factory of a public API
        raise UsageError("model spec {}: {} is not a public name (a factory's path has no '_' names)".format(
            quote(spec), quote(private[0])))
    try:
        module = importlib.import_module(source)
    except Exception as exc:  # ImportError, or whatever the user's module raises while importing
        raise UsageError("model spec {}: cannot import {} ({}: {})".format(
            quote(spec), quote(source), type(exc).__name__, first_line(exc, 120))) from exc
    factory: Any = module
    for part in parts:
        factory = getattr(factory, part, None)
    if factory is None:
        raise UsageError("model spec {}: {} has no {}".format(quote(spec), quote(source), quote(target)))
    problem = factory_problem(factory)
    if problem:
        raise UsageError("model spec {}: {} {}; a spec names an nn.Module subclass or a function annotated to "
                         "return one".format(quote(spec), quote(target), problem))
    return factory


def factory_problem(obj: Any) -> str:
    """Why ``obj`` is no network factory ("" when it is one), decided without calling it.

    A factory is an ``nn.Module`` subclass with its own ``forward`` (not ``nn.Module`` itself), or a
    Python function whose return annotation names such a class (``def make(...) -> nn.Module``).
    Builtins (``os:system``, ``builtins:eval``), other classes and unannotated functions
    (``os:popen``, ``shutil:rmtree``) are refused: whatever they would do, they would do it before
    their result could be found not to be a network."""
    if isinstance(obj, type):
        if not issubclass(obj, nn.Module):
            return "is a class that is not an nn.Module"
        if getattr(obj, "forward", None) is getattr(nn.Module, "forward", None):
            return "is an nn.Module without a forward"
        return ""
    if not isinstance(obj, types.FunctionType):
        return "is a {}, not a Python function or class".format(type(obj).__name__)
    returns = _annotation(obj)
    if returns is None:
        return "is a function without a return annotation naming an nn.Module"
    if not (isinstance(returns, type) and issubclass(returns, nn.Module)):
        return "is annotated to return {}, not an nn.Module".format(quote(getattr(returns, "__name__", returns)))
    return ""


def _annotation(func: types.FunctionType) -> Any:
    """The return annotation of ``func`` as an object: a string annotation (``from __future__ import
    annotations``) is looked up name by name in the function's module, never evaluated."""
    returns = func.__annotations__.get("return")
    if not isinstance(returns, str):
        return returns
    value: Any = None
    for i, name in enumerate(returns.strip("'\"").split(".")):
        if not name.isidentifier():
            return None
        scope = func.__globals__ if i == 0 else vars(value) if hasattr(value, "__dict__") else {}
        value = scope.get(name) if i else scope.get(name, getattr(builtins, name, None))
        if value is None:
            return None
    return value


def named_spec(recorded: str, named: Optional[str], source: str, error: Type[IrepError] = IrepError) -> str:
    """The network of a file that records ``recorded`` (an architecture code, a run's saved settings),
    given what the user named (``--model`` or a Python argument; None: nothing).

    A file never decides what is imported: a model spec it records is used only when the user names
    the same one, and a name differing from the file's is refused. Built-in backbones need no name."""
    if named is not None and named != recorded:
        raise error("{}: names the network {}, not {} (--model)".format(source, quote(recorded), quote(named)))
    if named is None and is_spec(recorded):
        shown = recorded if re.fullmatch(r"[\w.:-]{1,120}", recorded) else quote(recorded)
        raise error("{}: names the network {}; name it with --model {} to use it: a file never imports "
                    "code".format(source, quote(recorded), shown))
    return recorded


def _accepts(factory: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def check_kwargs(spec: str, kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """Factory arguments must be JSON data: they are recorded in checkpoints as data, never as code.
    A ``timm:`` spec refuses the arguments that would download or read weights."""
    try:
        args = json.loads(json.dumps(dict(kwargs)))
    except (TypeError, ValueError) as exc:
        raise UsageError("model spec {}: arguments must be JSON data (str, number, bool, list, dict): {}".format(
            quote(spec), exc)) from exc
    if spec.startswith("timm:"):
        _timm(spec).check_kwargs(spec, args)
    return args


def factory_kwargs(spec: str, kwargs: Mapping[str, Any], num_classes: Optional[int]) -> Dict[str, Any]:
    """The factory's arguments: ``kwargs`` (JSON data), plus ``num_classes`` where the factory takes
    it and ``kwargs`` does not set it. This is what a checkpoint records."""
    args = check_kwargs(spec, kwargs)
    if num_classes is not None and "num_classes" not in args and _accepts(resolve_factory(spec), "num_classes"):
        args["num_classes"] = num_classes
    return args


_WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".safetensors")
# why a weights name is refused, by spec source (torchvision's are taken)
_NO_NAMES = {"timm": " (timm models are built with pretrained=False: a weights name would download; give a "
                     "state-dict file)"}


def weights_file(weights: Optional[str], spec: str) -> bool:
    """Whether ``weights`` names a state-dict file (True) or a torchvision weights name (False);
    a missing file, or a name for a network that is not torchvision's, is refused naming --weights
    (for timm, whose weights names would download: its specs are built with pretrained=False)."""
    if weights is None:
        return False
    regular_input(weights, "a state dict (--weights)", CheckpointError)
    if Path(weights).is_file():
        return True
    looks_like_path = os.sep in weights or weights.lower().endswith(_WEIGHT_FILE_SUFFIXES)
    if looks_like_path or not spec.startswith("torchvision:"):
        raise UsageError("--weights {}: no such file{}".format(weights, "" if looks_like_path else _NO_NAMES.get(
            spec.partition(":")[0], " (weight names apply to torchvision models only)")))
    return False


def check_spec(spec: str, kwargs: Optional[Mapping[str, Any]] = None, weights: Optional[str] = None) -> None:
    """Refuse, before any work, a spec that names nothing callable, arguments that are not JSON data
    and a weights file that does not exist (the network itself is built later)."""
    resolve_factory(spec)
    check_kwargs(spec, kwargs or {})
    weights_file(weights, spec)


def build_external(spec: str, kwargs: Mapping[str, Any], weights: Optional[str] = None,
                   trust_pickle: bool = False) -> nn.Module:
    """Call the spec's factory with ``kwargs``. ``weights``: a state-dict file (safetensors; a
    ``torch.save`` pickle only where :func:`load_weights` allows it) or, for torchvision, a weights
    name such as ``IMAGENET1K_V1`` (torchvision's weights API; a ``timm:`` spec takes files only)."""
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
        load_weights(model, weights, trust_pickle)
    return model


def load_weights(model: nn.Module, path: Union[str, "os.PathLike[str]"], trust_pickle: bool = False) -> None:
    """Load a plain state dict (the user's pretrained weights) strictly, without running pickled code:
    a safetensors file; a ``torch.save`` pickle only on torch >= 2.10 or with ``trust_pickle``."""
    name = str(path)
    state = load_tree(name, "state dict", trust_pickle).tree
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
