"""Settings that describe their own command-line flag, and the value types of the flags.

A settings dataclass (``TrainConfig``, ``SearchConfig``) declares each field with :func:`setting`:
its default, a help line, and how the flag reads a value (a type that checks ranges, choices taken
from the library's constants). The CLI derives one flag per field from this metadata, so a
setting's name, default and choices are written once. The value types raise
``argparse.ArgumentTypeError``: a bad value is a usage error (exit 2) before any work starts.
No torch here: the CLI builds its parser from this module's types.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ._io import quote


def setting(default: Any, help: str, *, type: Optional[Callable[[str], Any]] = None,
            choices: Optional[Sequence[str]] = None, flags: Sequence[str] = (), metavar: Optional[str] = None,
            repeat: bool = False, nargs: Optional[str] = None) -> Any:
    """A dataclass field whose flag the CLI derives: ``--field-name`` (or ``flags``), ``help``
    followed by the default, ``type``/``choices`` to read the value; ``repeat``: the flag may be given
    several times and collects a list; a bool field is an on-switch."""
    meta = {"help": help, "type": type, "choices": None if choices is None else tuple(choices),
            "flags": tuple(flags), "metavar": metavar, "repeat": repeat, "nargs": nargs}
    return dataclasses.field(default=default, metadata=meta)


def flag_names(field: "dataclasses.Field[Any]") -> Tuple[str, ...]:
    """The option strings of a setting: its ``flags``, else ``--`` and the field name with dashes."""
    return field.metadata.get("flags") or ("--" + field.name.replace("_", "-"),)


def format_default(value: Any) -> str:
    """A default as help text shows it: ``2/3`` as 0.6667, a tuple as ``0.5,0.999``."""
    if isinstance(value, float):
        return "{:.4g}".format(value)
    if isinstance(value, (tuple, list)):
        return ",".join(map(format_default, value))
    return str(value)


# -- value types: every value is checked here, before any work, as a usage error (exit 2) -------------
def int_in(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError("expected an integer, got {}".format(quote(text))) from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError("must be between {} and {}, got {}".format(lo, hi, value))
        return value
    return parse


def float_in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError("expected a number, got {}".format(quote(text))) from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError("must be a finite number, got {}".format(text))
        if value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
            if hi == sys.float_info.max:
                raise argparse.ArgumentTypeError("must be a finite number {} {:g}, got {:g}".format(
                    ">" if lo_open else ">=", lo, value))
            raise argparse.ArgumentTypeError("must be in {}{:g}, {:g}{}, got {:g}".format(
                "(" if lo_open else "[", lo, hi, ")" if hi_open else "]", value))
        return value
    return parse


def float_pair(lo: float, hi: float, hi_open: bool = False) -> Callable[[str], Tuple[float, float]]:
    """Two comma-separated numbers in a range, such as Adam's betas ``0.5,0.999``."""
    one = float_in(lo, hi, hi_open=hi_open)

    def parse(text: str) -> Tuple[float, float]:
        parts = text.split(",")
        if len(parts) != 2:
            raise argparse.ArgumentTypeError("expected two numbers such as 0.5,0.999, got {}".format(quote(text)))
        return one(parts[0]), one(parts[1])
    return parse


def device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d{1,3})?", text):
        raise argparse.ArgumentTypeError("expected auto, cpu, cuda or cuda:N, got {}".format(quote(text)))
    return text


def directory(text: str) -> str:
    """A directory argument: an empty one would silently mean the default (or the current directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a directory, got an empty path")
    return text


def name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.:/-]{0,127}", text):
        raise argparse.ArgumentTypeError("expected a name of letters, digits and _.:/- (not starting with a digit), "
                                         "got {}".format(quote(text)))
    return text


def json_object(text: str) -> Dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError("not valid JSON ({}): {}".format(str(exc).split(":")[0], quote(text))) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object such as '{{\"num_classes\": 10}}', got {}".format(
            quote(text)))
    return value


def csv(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


#: ``train --cuda-graph``: capture the training step where it applies (auto), always (on), never (off).
CUDA_GRAPH_MODES = ("auto", "on", "off")
#: ``search --search-step``: eager (SuperNet.forward, the active branches only), sequential or
#: batched (search/static_step.py: every branch gated on the device, capturable), auto (batched
#: where the step is captured, else eager).
SEARCH_STEPS = ("auto", "eager", "sequential", "batched")

MAX_BATCH = 4096
MAX_SIZE = 4096
SEED = int_in(0, 2 ** 63 - 1)
BATCH = int_in(1, MAX_BATCH)
SIZE = int_in(1, MAX_SIZE)
COUNT = int_in(1, 10 ** 9)
EPOCHS = int_in(1, 100000)
GLOBAL_BATCH = int_in(1, 1 << 20)
WIDTH = float_in(0.0, 16.0, lo_open=True)
FRACTION = float_in(0.0, 1.0, hi_open=True)  # [0, 1)
TOLERANCE = float_in(0.0, 1e6)
POSITIVE = float_in(0.0, sys.float_info.max, lo_open=True)  # any finite value > 0 (a huge lr diverges, by design)
NON_NEGATIVE = float_in(0.0, sys.float_info.max)

SPEC_HELP = ("torchvision:NAME (any torchvision.models.get_model name), timm:NAME (timm.create_model, "
             "pretrained=False; the timm extra) or package.module:factory (the factory returns an nn.Module)")
BACKBONE_HELP = ("the network: a built-in backbone (resnet18_cifar, vgg16_cifar, resnet18, ...) or " + SPEC_HELP
                 + "; its 3x3 convs become searchable blocks (irepify); a 3-channel network is fed 1-channel data "
                   "by copying the grey channel")


_MODEL_SETTINGS: Dict[str, Dict[str, Any]] = {
    "model_kwargs": dict(help="a JSON object of the --model factory's keyword arguments (num_classes is added from "
                              "the data where the factory takes it)", type=json_object, metavar="JSON"),
    "weights": dict(help="initial weights of a --model network: a state-dict file (loaded with weights_only=True) "
                         "or a torchvision weights name such as IMAGENET1K_V1 (downloaded by torchvision; timm: "
                         "specs take files only)",
                    metavar="NAME_OR_FILE"),
    "include": dict(help="rewrite only the 3x3 convs whose module path matches (fnmatch; repeatable)",
                    metavar="PATTERN", repeat=True),
    "exclude": dict(help="leave out the 3x3 convs whose module path matches (fnmatch; repeatable)",
                    metavar="PATTERN", repeat=True),
}


DEVICE_DATA_HELP = ("decode the training split once onto the training device and augment it there, no DataLoader "
                    "(fashion-mnist, digits, cifar10): auto turns it on on CUDA where the split takes at most 1/4 of "
                    "the GPU's free memory; its random augmentations differ from the DataLoader's for the same seed")


def model_setting(field_name: str) -> Any:
    """One of the fields a model spec adds to a run's settings (TrainConfig and SearchConfig share them)."""
    return setting(None, **_MODEL_SETTINGS[field_name])
