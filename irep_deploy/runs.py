"""What ``train`` and the DES search share about a run: its network settings and network, and its
resumable state file.

``state.pt`` in a run directory holds ``{"format": "irep-deploy-<kind>-state", "format_version": 1,
"config": {...the run's settings...}, ...}`` plus the kind's own parts (model, optimizers, ...),
only tensors and plain data, written atomically and read with ``weights_only=True``. One reader
serves both kinds with one set of rules: a newer version, an unknown setting (a newer writer) and,
on resume, a setting that differs from the saved one are refused with one line naming the file.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, TypeVar, Union

import torch
import torch.nn as nn

from ._io import atomic_write, no_typed_storage_warning, regular_input
from .data import DataSplits
from .errors import CheckpointError, IrepError, UsageError, first_line
from .models import MODELS, build_model, is_spec
from .models.external import check_spec

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
            raise UsageError("{} applies to model specs (--model torchvision:NAME or package.module:factory), "
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
    with atomic_write(state_path(run_dir), "wb") as handle:
        torch.save(payload, handle)


def config_from_dict(cls: Type[Config], data: Any, source: str) -> Config:
    """A settings dataclass from its saved dict; an unknown key (a newer writer) is refused. Tuples
    come back as lists from some writers and are made tuples again where the default is one."""
    if not isinstance(data, dict):
        raise CheckpointError("{}: the saved settings are not a dict".format(source))
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise CheckpointError("{}: unknown setting {!r} (written by a newer irep-deploy?)".format(source, unknown[0]))
    values = {k: tuple(v) if isinstance(v, list) and isinstance(fields[k].default, tuple) else v
              for k, v in data.items()}
    return cls(**values)  # type: ignore[call-arg]


def read_run_state(run_dir: PathLike, kind: str, config_type: Type[Config],
                   given: Optional[Config] = None) -> Tuple[Dict[str, Any], Config]:
    """The state of a ``kind`` run (``train`` or ``search``) to resume, and its saved settings.

    ``given``: settings the caller was asked to resume with; they must equal the saved ones (a
    resume continues the run it finds, it does not change what the run computes).
    """
    noun = KINDS[kind]
    path = state_path(run_dir)
    regular_input(path, "a {} state".format(noun), CheckpointError)
    if not path.is_file():
        raise CheckpointError("{}: no {} state to resume ({} missing); not a run directory of `irep-deploy {}`".format(
            run_dir, noun, STATE_FILE, kind))
    try:
        with no_typed_storage_warning():  # torch 2.0 warns about its own internals here
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refusals, truncation, not a zip: all mean "unusable file"
        raise CheckpointError("{}: unreadable {} state ({})".format(
            path, noun, first_line(exc, 120))) from exc
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
    if given is not None:
        ours, theirs = dataclasses.asdict(saved), dataclasses.asdict(given)  # type: ignore[call-overload]
        diff: List[str] = [k for k in ours if ours[k] != theirs[k]]
        if diff:
            raise IrepError("{}: resume uses the run's own settings; {} differs ({!r} saved, {!r} given)".format(
                run_dir, diff[0], ours[diff[0]], theirs[diff[0]]))
    return state, saved
