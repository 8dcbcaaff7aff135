"""What ``train`` and the DES search share about a run: its network settings and network, and its
resumable state file.

``state.pt`` in a run directory holds ``{"format": "irep-deploy-<kind>-state", "format_version": 1,
"config": {...the run's settings...}, ...}`` plus the kind's own parts (model, optimizers, ...),
only tensors and plain data, written atomically as a safetensors file (:mod:`irep_deploy.tensorfile`:
no pickle, a checksum); a state of an earlier version (a ``torch.save`` pickle) is read on torch >=
2.10 or with ``trust_pickle``. One reader
serves both kinds with one set of rules: a newer version, an unknown setting (a newer writer) and,
on resume, a setting that differs from the saved one are refused with one line naming the file.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, TypeVar, Union

import torch
import torch.nn as nn

from ._io import clip, quote, regular_input
from .data import DataSplits
from .errors import CheckpointError, IrepError, UsageError, first_line
from .models import MODELS, build_model, is_spec
from .models.external import check_spec, named_spec
from .tensorfile import load_tree, save_tree

PathLike = Union[str, "os.PathLike[str]"]
Config = TypeVar("Config")

STATE_FILE = "state.pt"
STATE_VERSION = 1
#: The run kinds, as the CLI command names them, and what their state is called in messages.
KINDS = {"train": "training", "search": "search"}


# -- the run's network ------------------------------------------------------------------------------
def check_model_settings(backbone: str, width: float, model_kwargs: Optional[Dict[str, Any]],
                         weights: Optional[str], include: Optional[Sequence[str]],
                         exclude: Optional[Sequence[str]]) -> None:
    """The network settings of a run (train or search), checked before any data is read."""
    if not is_spec(backbone):
        if backbone not in MODELS:
            raise IrepError("unknown backbone {!r} (known: {}; or a model spec such as torchvision:resnet18)".format(
                backbone, ", ".join(MODELS)))
        given = [flag for flag, value in (("--model-kwargs", model_kwargs), ("--weights", weights),
                                          ("--include", include), ("--exclude", exclude)) if value]
        if given:
            raise UsageError("{} applies to model specs (--model torchvision:NAME, timm:NAME or package.module:factory), "
                             "not to the built-in {}".format(given[0], backbone))
        return
    if width != 1.0:
        raise UsageError("--width applies to the built-in backbones; {} keeps its own channels".format(backbone))
    check_spec(backbone, model_kwargs, weights)


def build_run_model(backbone: str, data: DataSplits, width: float, **options: Any) -> nn.Module:
    """The network of a run on ``data``: a built-in backbone takes the data's channels; a model spec
    keeps its own (the caller adapts the data with ``data.with_channels``)."""
    spec = is_spec(backbone)
    return build_model(backbone, num_classes=data.num_classes, width=width,
                       in_channels=None if spec else data.in_channels, input_size=data.input_size, **options)


# -- the run state ----------------------------------------------------------------------------------
def state_path(run_dir: PathLike) -> Path:
    return Path(run_dir) / STATE_FILE


def _format(kind: str) -> str:
    return "irep-deploy-{}-state".format(kind)


def write_run_state(run_dir: PathLike, kind: str, config: Any, **parts: Any) -> None:
    """Write ``state.pt`` atomically: the format header, ``config`` (a dataclass) and ``parts``."""
    payload = {"format": _format(kind), "format_version": STATE_VERSION, "config": dataclasses.asdict(config)}
    payload.update(parts)
    save_tree(state_path(run_dir), payload)


def config_from_dict(cls: Type[Config], data: Any, source: str) -> Config:
    """A settings dataclass from its saved dict; an unknown key (a newer writer) is refused, and so is
    a value of the wrong type or one its flag would refuse (an edited or corrupt file), naming it.
    Tuples come back as lists from some writers and are made tuples again where the default is one."""
    if not isinstance(data, dict):
        raise CheckpointError("{}: the saved settings are not a dict".format(source))
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        raise CheckpointError("{}: unknown setting {} (written by a newer irep-deploy?)".format(source, quote(unknown[0])))
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        problem = _type_problem(value, hints[key]) or _flag_problem(value, fields[key])
        if problem:
            raise CheckpointError("{}: saved setting {} is {}: {}".format(source, key, quote(value), problem))
    values = {k: tuple(v) if isinstance(v, list) and isinstance(fields[k].default, tuple) else v
              for k, v in data.items()}
    # a setting added since the run was saved: what that run did, where the default would do otherwise
    for key, value in getattr(cls, "SETTINGS_BEFORE", {}).items():
        values.setdefault(key, value)
    return cls(**values)  # type: ignore[call-arg]


def _type_problem(value: Any, hint: Any) -> str:
    """Why ``value`` is not of the annotated type ``hint`` ("" when it is): plain data only."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return ""
    if origin is Union:
        problems = [_type_problem(value, h) for h in args]
        return "" if "" in problems else problems[-1] if value is not None else "not set"
    if hint is type(None):
        return "" if value is None else "expected nothing"
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return "expected a list"
        if origin is tuple and args and args[-1] is not Ellipsis and len(value) != len(args):
            return "expected {} values".format(len(args))
        items = args[:1] * len(value) if origin is list or args[-1:] == (Ellipsis,) else args
        return next((p for p in (_type_problem(v, h) for v, h in zip(value, items)) if p), "")
    if origin is dict:
        return "" if isinstance(value, dict) and all(isinstance(k, str) for k in value) else "expected a dict"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return "" if ok and math.isfinite(value) else "expected a finite number"
    if hint is int:
        return "" if isinstance(value, int) and not isinstance(value, bool) else "expected an integer"
    return "" if isinstance(value, hint) else "expected {}".format(getattr(hint, "__name__", hint))


def _flag_problem(value: Any, field: "dataclasses.Field[Any]") -> str:
    """Why the setting's flag would refuse ``value`` ("" when it takes it): the same ranges and choices."""
    meta = field.metadata
    if value is None or isinstance(value, dict):
        return ""
    for item in value if isinstance(value, list) and meta.get("nargs") else [value]:
        if meta.get("choices") is not None and item not in meta["choices"]:
            return "not one of {}".format(", ".join(meta["choices"]))
        if meta.get("type") is not None:
            try:
                meta["type"](_as_flag(item))
            except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
                return first_line(exc, 120)
    return ""


def _as_flag(value: Any) -> str:
    """A saved value as its flag's text (floats exactly: a range check must see the value itself)."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(_as_flag, value))
    return repr(value) if isinstance(value, float) else str(value)


def read_run_state(run_dir: PathLike, kind: str, config_type: Type[Config], given: Optional[Config] = None,
                   model: Optional[str] = None, trust_pickle: bool = False) -> Tuple[Dict[str, Any], Config]:
    """The state of a ``kind`` run (``train`` or ``search``) to resume, and its saved settings.

    ``given``: settings the caller was asked to resume with; they must equal the saved ones (a
    resume continues the run it finds, it does not change what the run computes). ``model``: the
    network the user names (``--model``); a run whose settings name a model spec resumes only when
    the user names the same one (a file never decides what is imported). ``trust_pickle``: also read a
    state of an earlier version (a pickle) on torch < 2.10.
    """
    noun = KINDS[kind]
    path = state_path(run_dir)
    regular_input(path, "a {} state".format(noun), CheckpointError)
    if not path.is_file():
        raise CheckpointError("{}: no {} state to resume ({} missing); not a run directory of `irep-deploy {}`".format(
            run_dir, noun, STATE_FILE, kind))
    state = load_tree(path, "{} state".format(noun), trust_pickle).tree
    if not isinstance(state, dict) or state.get("format") != _format(kind):
        other = [k for k in KINDS if isinstance(state, dict) and state.get("format") == _format(k)]
        raise CheckpointError("{}: {}, not an irep-deploy {} state".format(
            path, "holds a {} state".format(KINDS[other[0]]) if other else "unknown contents", noun))
    # search states written before the two readers became one name the version "version"
    version = state.get("format_version", state.get("version"))
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError("{}: {} state version {!r} is not a positive integer".format(path, noun, version))
    if version > STATE_VERSION:
        raise CheckpointError("{}: {} state version {} is newer than this irep-deploy reads (up to {})".format(
            path, noun, version, STATE_VERSION))
    saved = config_from_dict(config_type, state.get("config"), str(path))
    backbone = getattr(saved, "backbone")
    if not isinstance(backbone, str):
        raise CheckpointError("{}: the saved settings name no network (backbone {})".format(path, quote(backbone)))
    named_spec(backbone, model if model is not None else getattr(given, "backbone", None), str(path), CheckpointError)
    if given is not None:
        ours, theirs = dataclasses.asdict(saved), dataclasses.asdict(given)  # type: ignore[call-overload]
        diff: List[str] = [k for k in ours if ours[k] != theirs[k]]
        if diff:
            raise IrepError("{}: resume uses the run's own settings; {} differs ({!r} saved, {!r} given)".format(
                run_dir, diff[0], ours[diff[0]], theirs[diff[0]]))
    return state, saved


# -- checks of a state's parts, shared by the train and search validations ------------------------------
def state_part(state: Dict[str, Any], key: str, kind: Union[type, Tuple[type, ...]], path: PathLike) -> Any:
    """``state[key]``, refused (one line naming the file) when missing or not of ``kind``."""
    if key not in state:
        raise CheckpointError("{}: the run state has no {} entry (damaged or edited file)".format(path, quote(key)))
    value = state[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise CheckpointError("{}: the run state's {} entry is {}, not a {}".format(
            path, quote(key), quote(value), names))
    return value


def check_epoch(state: Dict[str, Any], total: int, path: PathLike) -> int:
    """The finished epochs a state records: an integer from 0 to the run's ``total``."""
    epoch = state_part(state, "epoch", int, path)
    if not 0 <= epoch <= total:
        raise CheckpointError("{}: the run state's epoch is {}, outside 0 to {} (the run's epochs)".format(
            path, epoch, total))
    return epoch


def check_tensors(state: Dict[str, Any], key: str, path: PathLike) -> Dict[str, torch.Tensor]:
    """A state dict of tensors (a model's)."""
    tensors = state_part(state, key, dict, path)
    bad = next((k for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError("{}: the run state's {} entry {} is not a tensor".format(path, quote(key), quote(bad)))
    return tensors


def check_settings(config: Any, path: PathLike) -> None:
    """The saved settings' own consistency (``config.check()``), refused naming the file. Weights files
    are left out: they were read once when the run started, and a resume needs them no more."""
    read_once = {name: None for name in ("weights", "init_from") if hasattr(config, name)}
    try:
        dataclasses.replace(config, **read_once).check()
    except IrepError as exc:
        raise CheckpointError("{}: the saved settings are unusable: {}".format(path, first_line(exc, 200))) from exc


def load_part(path: PathLike, what: str, load: Callable[[], Any]) -> Any:
    """Call ``load`` (a ``load_state_dict`` of a saved part); a part that does not fit is one line."""
    try:
        return load()
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        # torch's "Error(s) in loading state_dict for X:" says the detail on the next line
        detail = lines[1] if len(lines) > 1 and lines[0].endswith(":") else first_line(exc)
        raise CheckpointError("{}: the saved {} does not fit the run's network ({})".format(
            path, what, clip(detail, 160))) from exc
