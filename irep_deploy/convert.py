"""``irep-deploy convert``: an old ``torch.save`` (pickle) file rewritten in the safetensors format.

Earlier versions wrote checkpoints and run states with ``torch.save``; torchvision and most training
code publish state dicts that way. Reading one runs torch's unpickler, which on torch < 2.10 can run
code even with ``weights_only=True``, so the old file is read only on torch >= 2.10 or with
``trust_pickle`` (``--trust-pickle``: for a file you trust). The new file holds the same tree
(:mod:`irep_deploy.tensorfile`) and is read on any torch without pickle.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Tuple, Union

import torch

from ._io import check_not_input, check_writable
from .checkpoint import FORMAT, checkpoint_parts
from .errors import CheckpointError, IrepError
from .runs import KINDS, STATE_VERSION
from .tensorfile import load_tree, save_tree, tensors_of

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class ConvertReport:
    src: str
    out: str
    kind: str  # "checkpoint", "training state", "search state" or "state dict"
    tensors: int
    sha256: str


def convert(src: PathLike, out: PathLike, trust_pickle: bool = False) -> ConvertReport:
    """Rewrite the old pickle file ``src`` (a checkpoint, a run's ``state.pt`` or a plain state dict)
    as the safetensors file ``out``, atomically. The content is validated as its reader would."""
    check_not_input(out, [src])
    check_writable(out, inputs=(src,))
    name = str(src)
    loaded = load_tree(name, "checkpoint, run state or state dict", trust_pickle)
    if not loaded.pickled:
        raise IrepError("{}: already in the safetensors format; nothing to convert".format(name))
    kind, tree = _kind(loaded.tree, name)
    try:
        digest = save_tree(out, tree)
    except CheckpointError as exc:  # a value the format cannot store (only tensors and plain data)
        raise CheckpointError("{}: {}".format(name, exc)) from exc
    tensors = sum(1 for _ in tensors_of(tree))
    return ConvertReport(name, str(out), kind, tensors, digest)


def _kind(tree: Any, name: str) -> Tuple[str, Any]:
    if isinstance(tree, dict) and tree.get("format") == FORMAT:
        checkpoint_parts(tree, name)
        return "checkpoint", tree
    states = {"irep-deploy-{}-state".format(k): noun for k, noun in KINDS.items()}
    if isinstance(tree, dict) and tree.get("format") in states:
        noun = states[tree["format"]]
        version = tree.get("format_version", tree.get("version"))
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= STATE_VERSION:
            raise CheckpointError("{}: {} state version {!r} is not one this irep-deploy reads (1 to {})".format(
                name, noun, version, STATE_VERSION))
        return "{} state".format(noun), tree
    if isinstance(tree, dict) and isinstance(tree.get("state_dict"), dict) and "format" not in tree:
        tree = tree["state_dict"]  # a training script's {"state_dict": ..., "epoch": ...}: the weights
    if isinstance(tree, dict) and tree and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in tree.items()):
        return "state dict", dict(tree)
    raise CheckpointError("{}: not an irep-deploy checkpoint, run state or state dict of tensors".format(name))

