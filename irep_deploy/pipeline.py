"""The ``fuse`` step as a library function: a multi-branch checkpoint and its code in, a checked plain
deploy checkpoint out (the CLI parses arguments, calls :func:`fuse`, prints). The model-level fusion is
``reparam``'s, the kernel algebra ``fusion``'s; docs/architecture.md says which module owns what."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from ._io import check_writable, same_file
from .checkpoint import load_checkpoint, multi_branch_model, recorded_dataset, save_checkpoint
from .compare import FUSE_FP32, compare_outputs
from .errors import IrepError, UsageError, VerificationError
from .binding import current_arch
from .fusecheck import failure_text
from .models import MODELS
from .precision import exact_fp32
from .progress import Stages
from .reparam import fuse_model, to_torchvision
from .resources import require_input_memory, size_flags
from .tensorfile import save_tree

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class FuseReport:
    out: str
    torchvision_out: Optional[str]
    batch_shape: tuple
    max_abs_error: float
    rel_error: float
    params_multi_branch: int
    params_fused: int
    branches: int


def default_deploy_path(ckpt: PathLike) -> Path:
    p = Path(ckpt)
    return p.with_name(p.stem + ".deploy" + (p.suffix or ".pt"))


def fuse(ckpt: PathLike, arch: PathLike, out: Optional[PathLike] = None,
         torchvision_out: Optional[PathLike] = None, batch: int = 2, input_size: Optional[int] = None,
         tolerance: float = FUSE_FP32.max_rel_error, seed: int = 0, model: Union[str, nn.Module, None] = None,
         trust_pickle: bool = False, progress: bool = True) -> FuseReport:
    """Fuse a multi-branch checkpoint under an architecture code into a deploy checkpoint.

    The code must be the one the checkpoint was trained with, or (for a SuperNet checkpoint) any
    code of its space. The fused network is checked against the multi-branch one (eval mode) on a
    seeded random batch, in true float32 (TF32 off: the 1e-5 tolerance assumes float32 rounding);
    beyond ``tolerance`` (relative error) nothing is written. ``model`` names the network of a
    checkpoint that is not built in (a model spec, or the user's module; see
    :meth:`~irep_deploy.checkpoint.Checkpoint.build`). ``trust_pickle``: read an old pickle-format
    checkpoint on torch < 2.10 too. The ``torchvision_out`` state dict is a safetensors file
    (``safetensors.torch.load_file`` reads it for torchvision's ``load_state_dict``). ``progress``: a
    bar on stderr naming the stage that runs (a large network's load and check take seconds).
    """
    out = Path(out) if out is not None else default_deploy_path(ckpt)
    for target in (out, torchvision_out):
        if target is not None:
            check_writable(target, inputs=(ckpt, arch))
    if torchvision_out is not None and same_file(Path(out), Path(torchvision_out)):
        raise UsageError("{}: --torchvision and the deploy checkpoint name the same file; one would overwrite "
                         "the other".format(torchvision_out))
    with Stages("fuse", ("load", "fuse", "check", "write"), progress) as stage:
        stage("load")
        checkpoint = load_checkpoint(ckpt, trust_pickle=trust_pickle)
        if checkpoint.kind == "deploy":
            raise IrepError("{}: already a deploy (fused) checkpoint".format(ckpt))
        entry = MODELS.get(checkpoint.header["backbone"])
        if torchvision_out is not None and (entry is None or entry.torchvision is None):
            raise IrepError("{}: {} has no torchvision layout; drop --torchvision".format(
                ckpt, checkpoint.header["backbone"]))
        net = multi_branch_model(checkpoint, arch, model).eval()
        code = current_arch(net)
        stage("fuse")
        plain = fuse_model(net, check=False)  # checked below, with the user's batch, seed and tolerance
        size = input_size or checkpoint.header["input_size"]
        # both networks run on the check batch; the multi-branch one needs more
        require_input_memory(net, batch, checkpoint.header["in_channels"], size,
                             None if input_size else checkpoint.header["input_size"], str(ckpt),
                             "the check batch", size_flags("--batch", batch, input_size), check=True)
        stage("check")
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, checkpoint.header["in_channels"], size, size, generator=gen)
        with torch.no_grad(), exact_fp32():
            reference, fused_out = net(x), plain(x)
        check = compare_outputs(reference, fused_out, FUSE_FP32.but(max_rel_error=tolerance))
        if not check.passed:
            raise VerificationError("fused output differs from the multi-branch output: {}; nothing written".format(
                failure_text(check.failures, net, plain, (x,), check.tolerance)))
        err = check.rel_error
        stage("write")
        # the dataset travels with the weights, so `eval` of the deploy checkpoint needs no --dataset
        dataset = recorded_dataset(checkpoint)
        save_checkpoint(out, plain, extra=dict({"fused_from": str(ckpt), "fuse_rel_error": err},
                                               **({"dataset": dataset} if dataset else {})))
        if torchvision_out is not None:
            save_tree(torchvision_out, to_torchvision(plain))
    return FuseReport(str(out), str(torchvision_out) if torchvision_out else None, tuple(x.shape),
                      check.max_abs_error, err, _params(net), _params(plain),
                      code.count())


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
