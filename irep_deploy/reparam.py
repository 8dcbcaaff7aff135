"""Whole-network fusion: multi-branch model -> plain deploy network; torchvision state dicts (out and in)."""
from __future__ import annotations

import copy
import re
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from .arch import ArchCode
from .block import IrepConv
from .compare import FUSE_LAYER
from .errors import CheckpointError, IrepError, VerificationError
from .fusecheck import changed_kinds, check_inputs, first_difference, record
from .fusion import fold_bn
from .norms import NormSplit, split_norm
from .surgery import foldable_pairs
from .binding import current_arch, model_config, plan_arch, searchable_layers
from .models import MODELS
from .ops import ConvBN
from ._io import PathLike
from .tensorfile import load_tree


def _fusable(module: nn.Module, prefix: str = "") -> Iterator[Tuple[str, nn.Module]]:
    """IrepConv and ConvBN modules, outermost only (a block's inner conv-BN and branches are skipped)."""
    for name, child in module.named_children():
        path = prefix + name
        if isinstance(child, (IrepConv, ConvBN)):
            yield path, child
        else:
            yield from _fusable(child, path + ".")


def fold_conv_bn(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """Transform I on a user's separate modules: ``bn(conv(x))`` as one conv with bias (eval mode)."""
    dtype = torch.promote_types(conv.weight.dtype, torch.float32)
    kernel, bias = fold_bn(conv.weight.to(dtype), bn.running_mean.to(dtype), bn.running_var.to(dtype),
                           bn.weight.to(dtype) if bn.weight is not None else None,
                           bn.bias.to(dtype) if bn.bias is not None else None, bn.eps,
                           conv.bias.to(dtype) if conv.bias is not None else None)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                      device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(kernel)
        fused.bias.copy_(bias)
    return fused


def fuse_model(model: nn.Module, arch: Optional[ArchCode] = None, inplace: bool = False, check: bool = True,
               example_input: Any = None) -> nn.Module:
    """Return a plain network equal to ``model`` in eval mode.

    Every :class:`IrepConv` becomes one 3x3 ``nn.Conv2d`` with bias (its active branches scaled by
    sigmoid(alpha) * sigmoid(beta) and added to the fixed conv, every BN folded), and every other
    conv-BN pair one conv with bias: the ConvBN modules of the built-in backbones, and the separate
    conv -> BN pairs of any network (those :func:`~irep_deploy.irepify` found, or for a model
    not made by irep-deploy, those its torch.fx graph shows, except shared modules and norms that
    :func:`~irep_deploy.norms.split_norm` refuses); a folded BN's place holds ``nn.Identity`` (or,
    for a norm-act layer, its drop and activation). ``arch`` fuses that code instead of the blocks'
    current active sets (the search scores many codes of one SuperNet this way). The input model is
    not touched unless ``inplace``; branches that are not fused are never copied.

    ``check`` (default): the result is compared with ``model`` on a seeded batch of 2 (eval mode,
    float32, TF32 and autocast off; ``example_input``, a tensor or a tuple of arguments, or else
    ``irep_config``'s ``in_channels`` x ``input_size``, or the first conv's channels at 224 px) at
    each replaced layer within ``compare.FUSE_LAYER`` (1e-4: rounding accumulates with depth), then at the output (tensors, or tuples, lists
    and dicts of them) within ``compare.FUSE_OUTPUT``; the first difference is a
    :class:`~irep_deploy.errors.VerificationError` naming the layer. It costs two forwards; the search,
    which fuses many codes, passes ``check=False``. Not checked: a model in half precision, and an
    ``arch`` other than the model's active code (the model does not compute that network).
    """
    config = getattr(model, "irep_config", None)
    if config is None:
        if arch is not None:
            raise IrepError("fuse_model(arch=...) needs a model made by build_model or irepify")
        fused = _fold_pairs(model, foldable_pairs(model), inplace)
        return _checked(model, fused, inplace, check, example_input)
    if config.get("deploy"):
        raise IrepError("this model is already fused")
    actives: Dict[int, Tuple[str, ...]] = {}
    if arch is not None:
        actives = {id(block): ops for block, ops in plan_arch(model, arch)}
    code = arch if arch is not None else current_arch(model)
    fused: Dict[int, nn.Module] = {}
    places: List[Tuple[str, nn.Module]] = list(_fusable(model))
    with torch.no_grad():
        for _, module in places:
            if isinstance(module, IrepConv):
                fused[id(module)] = module.to_conv(actives.get(id(module)))
            else:
                fused[id(module)] = module.to_conv()
    fused.update(_fold_pairs(model, [tuple(p) for p in config.get("bn_pairs", ())], inplace))
    # another code than the model's own active sets is a network the model does not compute: no reference
    own = arch is None or arch == current_arch(model)
    plain = _checked(model, fused, inplace, check and own, example_input)
    plain.irep_config = dict(config, deploy=True, supernet=False, arch=code.dumps())
    return plain


def _checked(model: nn.Module, fused: Dict[int, nn.Module], inplace: bool, check: bool,
             example_input: Any) -> nn.Module:
    """``_replace``, and with ``check`` the fused network compared with ``model`` (recorded first:
    ``inplace`` leaves no original to run afterwards)."""
    inputs = check_inputs(model, example_input) if check else None
    if inputs is None:
        return _replace(model, fused, inplace)
    kinds = changed_kinds((p, m, fused[id(m)]) for p, m in model.named_modules() if id(m) in fused)
    reference = record(model, list(kinds), inputs, "original")
    plain = _replace(model, fused, inplace)
    problem = first_difference(reference, record(plain, list(kinds), inputs, "fused"), kinds, FUSE_LAYER)
    if problem is not None:
        raise VerificationError("fuse_model: the fused network differs from the original on a seeded batch "
                                "(eval mode, float32, {} tolerance {:g}): {}; check=False skips this check".format(
                                    FUSE_LAYER.name, FUSE_LAYER.max_rel_error, problem))
    return plain


def _fold_pairs(model: nn.Module, pairs: List[Tuple[str, str]], inplace: bool) -> Dict[int, nn.Module]:
    """id(module) -> replacement for separate conv -> BN pairs: the folded conv, and for the BN what
    stays in its place (Identity, or a norm-act layer's drop and activation: copies unless ``inplace``,
    so the fused network shares no module with the input)."""
    out: Dict[int, nn.Module] = {}
    with torch.no_grad():
        for conv_path, bn_path in pairs:
            conv, bn = model.get_submodule(conv_path), model.get_submodule(bn_path)
            split = split_norm(bn)
            if not isinstance(split, NormSplit):
                raise IrepError("cannot fold {} into {}: {}".format(bn_path, conv_path, split))
            out[id(conv)] = fold_conv_bn(conv, split.bn)
            out[id(bn)] = split.after if inplace else copy.deepcopy(split.after)
    return out


def _replace(model: nn.Module, fused: Dict[int, nn.Module], inplace: bool) -> nn.Module:
    """``model`` with each module whose id is in ``fused`` replaced (in place, or in a copy that
    never copies the replaced modules)."""
    if not inplace:
        memo = dict(fused)  # deepcopy substitutes the fused modules for the originals
        return copy.deepcopy(model, memo)
    for path, module in list(model.named_modules()):
        if path and id(module) in fused:
            parent_path, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, attr, fused[id(module)])
    return model


# -- torchvision -------------------------------------------------------------------------------------
_RESNET_BN = [
    (re.compile(r"^conv1$"), "conv1", "bn1"),
    (re.compile(r"^(layer\d+\.\d+)\.conv(\d)$"), r"\1.conv\2", r"\1.bn\2"),
    (re.compile(r"^(layer\d+\.\d+)\.downsample$"), r"\1.downsample.0", r"\1.downsample.1"),
]


def _torchvision_names(backbone: str, name: str) -> Tuple[str, Optional[str]]:
    """torchvision's name for a fused conv and for the BN that followed it there (None: conv keeps its bias)."""
    if backbone.startswith("vgg"):
        return name, None
    for pattern, conv, bn in _RESNET_BN:
        if pattern.match(name):
            return pattern.sub(conv, name), pattern.sub(bn, name)
    raise IrepError("no torchvision name for module {} of {}".format(name, backbone))


def to_torchvision(plain: nn.Module) -> Dict[str, torch.Tensor]:
    """A state dict that ``torchvision.models.<backbone>()`` loads with ``strict=True``.

    torchvision's ResNets keep a BN after every conv; each gets identity statistics
    (mean 0, var 1 - eps, weight 1) and the fused bias, so the loaded network computes the fused
    one up to float rounding.
    """
    config = model_config(plain)
    backbone = config["backbone"]
    if MODELS[backbone].torchvision is None:
        raise IrepError("{} has no torchvision counterpart (only {} do)".format(
            backbone, ", ".join(n for n, e in MODELS.items() if e.torchvision)))
    if not config.get("deploy"):
        raise IrepError("to_torchvision needs a fused model: call fuse_model first")
    state: Dict[str, torch.Tensor] = {}
    for name, module in plain.named_modules():
        if isinstance(module, nn.Conv2d):
            conv, bn = _torchvision_names(backbone, name)
            state[conv + ".weight"] = module.weight.detach().clone()
            if bn is None:
                state[conv + ".bias"] = module.bias.detach().clone()
                continue
            bias = module.bias.detach()
            eps = nn.BatchNorm2d(1).eps
            state[bn + ".weight"] = torch.ones_like(bias)
            state[bn + ".bias"] = bias.clone()
            state[bn + ".running_mean"] = torch.zeros_like(bias)
            state[bn + ".running_var"] = torch.full_like(bias, 1.0 - eps)
            state[bn + ".num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
        elif isinstance(module, nn.Linear):
            state[name + ".weight"] = module.weight.detach().clone()
            state[name + ".bias"] = module.bias.detach().clone()
    return state


def init_from_torchvision(model: nn.Module, path: PathLike, trust_pickle: bool = False) -> int:
    """Copy a torchvision-layout state dict into the fixed 3x3 conv-BNs (and the other plain layers
    whose names match); branches, alpha and beta stay freshly initialised. Returns tensors copied.
    The file is a safetensors state dict; a ``torch.save`` pickle (torchvision's own downloads) is
    read only on torch >= 2.10 or with ``trust_pickle``."""
    state = load_tree(path, "state dict", trust_pickle).tree
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("{}: not a state dict of tensors".format(path))
    backbone = model.irep_config["backbone"]
    if MODELS[backbone].torchvision is None:
        raise IrepError("--init-from needs a backbone with a torchvision layout ({}), not {}".format(
            ", ".join(n for n, e in MODELS.items() if e.torchvision), backbone))
    own = model.state_dict()
    blocks = dict(searchable_layers(model))
    mapping: Dict[str, str] = {}  # our tensor name -> torchvision's
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):  # the head: copied only where the class count matches
            for p in ("weight", "bias"):
                if tuple(state.get(name + "." + p, torch.empty(0)).shape) == tuple(m.weight.shape if p == "weight"
                                                                                  else m.bias.shape):
                    mapping[name + "." + p] = name + "." + p
        # ConvBN modules outside the branches: the stem, the 1x1 shortcuts and the fixed 3x3 ops F.
        if not (isinstance(m, nn.Sequential) and isinstance(getattr(m, "conv", None), nn.Conv2d)
                and isinstance(getattr(m, "bn", None), nn.BatchNorm2d)) or ".branches." in name:
            continue
        layer = name[:-len(".conv")] if name.endswith(".conv") and name[:-len(".conv")] in blocks else name
        tv_conv, tv_bn = _torchvision_names(backbone, layer)
        mapping[name + ".conv.weight"] = tv_conv + ".weight"
        # torchvision's VGG-16 has no BN (its conv bias is not carried over); its ResNets have one per conv.
        if tv_bn is not None:
            for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                mapping["{}.bn.{}".format(name, p)] = "{}.{}".format(tv_bn, p)
    copied = 0
    with torch.no_grad():
        for ours, theirs in mapping.items():
            if theirs not in state:
                raise CheckpointError("{}: lacks tensor {!r} (needed for {})".format(path, theirs, ours))
            if tuple(state[theirs].shape) != tuple(own[ours].shape):
                raise CheckpointError("{}: tensor {!r} has shape {}, the model's {} needs {}".format(
                    path, theirs, tuple(state[theirs].shape), ours, tuple(own[ours].shape)))
            own[ours].copy_(state[theirs])
            copied += 1
    if copied == 0:
        raise CheckpointError("{}: no tensor matches {}'s torchvision layout".format(path, backbone))
    return copied
