"""IREPS for any PyTorch CNN: turn every eligible 3x3 conv of a user's network into an IrepConv.

:func:`irepify` returns a new model in which each eligible ``nn.Conv2d`` (3x3, padding 1,
dilation 1, zero padding, square stride, any groups) becomes an :class:`IrepConv` whose fixed op
holds the user's own conv and the BatchNorm that follows it; the BN's old place becomes
``nn.Identity``. Branches added later start at zero output, so the network computes what it
computed before, and fine-tuning from pretrained weights starts where the pretrained network is.

conv -> BN pairs are found in the graph (``torch.fx``, as ``torch.ao`` fusion does): a conv whose
only user is a BN with as many channels, each called once; the BN is absorbed only if
:func:`~irep_deploy.norms.split_norm` accepts it. A conv or BN whose tensors another module holds
too, or a forward reads itself, is left alone. Where a module cannot be traced, its
traceable children are traced one by one; the convs that sit directly in an untraceable module are
left out (the BN that follows them is unknown), and :attr:`IrepReport.skipped` says so.
"""
from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx
import torch.nn as nn

from .arch import fingerprint, register_backbone
from .binding import layer_specs
from .block import IrepConv
from .errors import IrepError
from .norms import NormSplit, is_bn_like, split_norm
from .ops import SPACES, ConvBN, check_ops
from .own_reparam import apply_own_reparameterization

#: The default op space for a user's network: every IREPS op (identity only where shapes allow).
DEFAULT_OPS: Tuple[str, ...] = SPACES["any"]

Patterns = Union[str, Sequence[str], None]


class BiasAsBN(nn.Module):
    """The "BN" of a conv that had none: it adds the conv's own bias, nothing else.

    It has the BatchNorm fields that fusion reads (mean 0, var 1, eps 0, gamma 1 as buffers; beta
    the trainable bias), so folding it is exact and training sees the same function as before: no
    normalisation appears where the user's network had none.
    """

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.num_features = bias.numel()
        self.eps = 0.0
        self.bias = nn.Parameter(bias.detach().clone())
        self.register_buffer("weight", torch.ones_like(self.bias.data))
        self.register_buffer("running_mean", torch.zeros_like(self.bias.data))
        self.register_buffer("running_var", torch.ones_like(self.bias.data))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias.reshape(1, -1, 1, 1).to(x.dtype)


def is_batchnorm(module: nn.Module) -> bool:
    """A BN-like module after a conv (running statistics): a fx leaf, folded only if
    :func:`~irep_deploy.norms.split_norm` accepts it (otherwise its conv is left alone, with the reason)."""
    return is_bn_like(module)


def ineligible_reason(conv: nn.Module) -> Optional[str]:
    """Why this module cannot become an IrepConv (None: it can)."""
    if type(conv) is not nn.Conv2d:
        return "a {} (only plain nn.Conv2d is rewritten: a subclass may compute something else)".format(
            type(conv).__name__)
    if tuple(conv.kernel_size) != (3, 3):
        return "kernel {}x{}, not 3x3".format(*conv.kernel_size)
    if tuple(conv.dilation) != (1, 1):
        return "dilation {}, not 1".format(tuple(conv.dilation))
    if conv.padding not in ((1, 1), "same"):
        return "padding {}, not 1".format(conv.padding)
    if conv.padding_mode != "zeros":
        return "padding mode {!r}: the branches pad with zeros".format(conv.padding_mode)
    if conv.stride[0] != conv.stride[1]:
        return "stride {} is not square".format(tuple(conv.stride))
    if conv.transposed:  # pragma: no cover - nn.Conv2d is never transposed
        return "transposed"
    return None


class _Tracer(torch.fx.Tracer):
    """BN-like modules and existing IrepConvs are leaves, so a conv's user is the BN module itself."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_batchnorm(m) or isinstance(m, IrepConv) or super().is_leaf_module(m, qualname)


@dataclass
class GraphScan:
    """What tracing revealed: the BN after each conv (None: no BN), and convs whose BN is unknown."""

    bn_after: Dict[str, Optional[str]] = field(default_factory=dict)
    unknown: Dict[str, str] = field(default_factory=dict)
    # module path -> why: a forward reads its tensors itself (``F.conv2d(x, self.conv.weight)``)
    read: Dict[str, str] = field(default_factory=dict)


def scan_conv_bn(model: nn.Module) -> GraphScan:
    """Find conv -> BN pairs of ``model`` through its torch.fx graph (module paths from the root)."""
    scan = GraphScan()
    _scan(model, "", scan)
    return scan


def _trace(module: nn.Module) -> torch.fx.Graph:
    """fx-trace ``module`` and leave no trace on it: a forward may cache what it computes on its
    modules (torchvision's MultiScaleRoIAlign caches its scales on first call), and a traced forward
    would leave fx Proxies there, breaking every later forward. Module attributes are restored."""
    saved = [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules))
             for m in module.modules()]
    try:
        return _Tracer().trace(module)
    finally:
        for m, attrs, params, buffers, children in saved:
            m.__dict__.clear()
            m.__dict__.update(attrs)
            for live, old in ((m._parameters, params), (m._buffers, buffers), (m._modules, children)):
                live.clear()
                live.update(old)


def _scan(module: nn.Module, prefix: str, scan: GraphScan) -> None:
    try:
        graph = _trace(module)
    except Exception as exc:  # fx raises many types for untraceable code; every one means "look inside"
        reason = "{} cannot be traced by torch.fx ({}: {})".format(
            prefix.rstrip(".") or "the model", type(exc).__name__, str(exc).strip().splitlines()[0][:100]
            if str(exc).strip() else "")
        for name, child in module.named_children():
            if isinstance(child, nn.Conv2d):
                scan.unknown[prefix + name] = reason + ", so the BN after it is unknown"
            elif not is_batchnorm(child) and not isinstance(child, IrepConv):
                _scan(child, prefix + name + ".", scan)
        return
    _note_direct_reads(graph, prefix, scan)
    calls: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        conv = module.get_submodule(node.target)
        if not isinstance(conv, nn.Conv2d):
            continue
        path = prefix + node.target
        if calls[node.target] > 1:
            scan.unknown[path] = "called {} times in the forward".format(calls[node.target])
            continue
        users = list(node.users)
        bn: Optional[str] = None
        if len(users) == 1 and users[0].op == "call_module" and calls[users[0].target] == 1:
            follower = module.get_submodule(users[0].target)
            # running_mean, not num_features: torchvision's FrozenBatchNorm2d has no num_features
            if is_batchnorm(follower) and follower.running_mean.numel() == conv.out_channels:
                bn = prefix + users[0].target
        scan.bn_after[path] = bn


def _note_direct_reads(graph: torch.fx.Graph, prefix: str, scan: GraphScan) -> None:
    """A tensor a forward reads itself (a fx ``get_attr`` node) would still be read from the old
    module after a rewrite or a fold: its owner is recorded, so it is neither."""
    for node in graph.nodes:
        # a buffer used through a real tensor op becomes a `_tensor_constant` copy: not seen here
        if node.op == "get_attr" and not node.target.startswith("_tensor_constant"):
            owner, _, attr = node.target.rpartition(".")
            scan.read.setdefault(prefix + owner, "its {} is read directly in the forward of {}".format(
                attr, prefix.rstrip(".") or "the model"))


def shared_modules(model: nn.Module) -> Dict[str, str]:
    """Module path -> why it is shared: reachable under two paths, or holding a Parameter or buffer
    that another module (or another name) holds too. Rewriting or folding one place of a shared
    tensor would leave the other computing with the old one."""
    out: Dict[str, str] = {}
    places: Dict[int, List[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        places.setdefault(id(module), []).append(path)
    for paths in places.values():
        for path in paths[1:] if len(paths) > 1 else ():
            out.setdefault(path, "the same module as {}".format(paths[0]))
            out.setdefault(paths[0], "the same module is also reachable as {}".format(path))
    holders: Dict[int, List[str]] = {}
    for path, module in model.named_modules():
        for name, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is not None:
                holders.setdefault(id(tensor), []).append(path + "." + name if path else name)
    for names in holders.values():
        for name in names if len(names) > 1 else ():
            other = next(n for n in names if n != name)
            out.setdefault(name.rpartition(".")[0], "its {} is also {} (a shared tensor)".format(
                name.rpartition(".")[2], other))
    return out


def untouchable(model: nn.Module, scan: GraphScan) -> Dict[str, str]:
    """Module path -> why fusion must leave it as it is (shared, or its tensors read directly)."""
    return dict(scan.read, **shared_modules(model))


def norm_split(model: nn.Module, bn_path: str, blocked: Dict[str, str]) -> Union[NormSplit, str]:
    """The BN at ``bn_path`` split for absorbing, or why its conv must be left alone."""
    if bn_path in blocked:
        return "the BN after it, {}, is shared: {}".format(bn_path, blocked[bn_path])
    split = split_norm(model.get_submodule(bn_path))
    return split if isinstance(split, NormSplit) else "the BN after it, {}, is not folded: {}".format(bn_path, split)


def foldable_pairs(model: nn.Module, scan: Optional[GraphScan] = None) -> List[Tuple[str, str]]:
    """The conv -> BN pairs of ``model`` that fusion folds exactly (neither shared nor refused)."""
    scan = scan_conv_bn(model) if scan is None else scan
    blocked = untouchable(model, scan)
    return [(conv, bn) for conv, bn in scan.bn_after.items() if bn is not None and conv not in blocked
            and isinstance(norm_split(model, bn, blocked), NormSplit)]


def _patterns(value: Patterns) -> Optional[Tuple[str, ...]]:
    if value is None:
        return None
    return (value,) if isinstance(value, str) else tuple(value)


def _matches(path: str, patterns: Tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path, p + ".*") for p in patterns)


@dataclass
class IrepReport:
    """Which convs :func:`irepify` rewrote, and which it left alone and why."""

    rewritten: List[str]
    skipped: List[Tuple[str, str]]
    bn_pairs: List[Tuple[str, str]]  # other conv -> BN pairs the graph showed (fused by fuse_model)
    # (module path, method) of the network's own re-parameterizations, applied before the scan
    reparameterized: List[Tuple[str, str]] = field(default_factory=list)


def _fixed_op(conv: nn.Conv2d, bn: Optional[nn.Module]) -> ConvBN:
    """The user's conv and BN as the block's fixed op; a conv bias moves into the BN exactly."""
    if conv.padding == "same":  # 3x3, dilation 1: "same" is padding 1 on every side
        conv.padding = (1, 1)
    bias = conv.bias
    if bias is not None:
        conv.bias = None
    if bn is None:
        bn = BiasAsBN(bias if bias is not None else torch.zeros(
            conv.out_channels, device=conv.weight.device, dtype=conv.weight.dtype))
    elif bias is not None:
        with torch.no_grad():  # BN(Wx + b) == BN'(Wx) with mean' = mean - b, in eval and in train mode
            bn.running_mean.sub_(bias.detach().to(bn.running_mean.dtype))
    return ConvBN.of(conv, bn)


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def irepify(model: nn.Module, ops: Optional[Sequence[str]] = None, include: Patterns = None,
            exclude: Patterns = None, inplace: bool = False, name: Optional[str] = None,
            input_size: int = 224) -> nn.Module:
    """A copy of ``model`` with every eligible 3x3 conv an :class:`IrepConv` (no branch yet).

    ``ops`` is the op space of every block (default: all IREPS ops). ``include``/``exclude`` are
    module-path patterns (``fnmatch``; a pattern also matches everything below it, so
    ``"backbone.body"`` selects the whole body). The result computes exactly what ``model`` did;
    every other module, name and parameter is left as it was, except that each absorbed BN's place
    holds ``nn.Identity``. The report is on ``result.irep_report`` (:class:`IrepReport`).

    ``name`` labels the network in architecture codes and checkpoints (default: its class and
    structure, ``module:Class@<fingerprint>``); ``input_size`` is the resolution recorded for export and bench. The result
    works with :func:`~irep_deploy.models.apply_arch`, :func:`~irep_deploy.reparam.fuse_model` and
    checkpoints like a built-in backbone.
    """
    space = check_ops(DEFAULT_OPS if ops is None else ops)
    include_p, exclude_p = _patterns(include), _patterns(exclude)
    net = model if inplace else copy.deepcopy(model)
    # a network that re-parameterizes itself (timm's RepVGG, MobileOne) is collapsed by its own code
    # first: rewriting only its 3x3 conv would leave its other branches in the fused network
    reparameterized = apply_own_reparameterization(net)
    scan = scan_conv_bn(net)
    blocked = untouchable(net, scan)
    rewritten: List[str] = []
    skipped: List[Tuple[str, str]] = []
    bn_pairs: List[Tuple[str, str]] = []
    modules = dict(net.named_modules())
    for path, module in list(modules.items()):
        if not isinstance(module, nn.Conv2d) or _inside_irep(path, modules):
            continue
        bn_path = scan.bn_after.get(path)
        reason = ineligible_reason(module)
        if reason is None and include_p is not None and not _matches(path, include_p):
            reason = "not matched by include"
        if reason is None and exclude_p is not None and _matches(path, exclude_p):
            reason = "matched by exclude"
        if reason is None and path not in scan.bn_after:
            reason = scan.unknown.get(path, "not reached by the traced forward")
        split = None if bn_path is None else norm_split(net, bn_path, blocked)
        # a shared conv, or a BN that cannot be absorbed, also rules out folding the pair
        refusal = blocked.get(path) or (split if isinstance(split, str) else None)
        if reason is not None or refusal is not None:
            skipped.append((path, "; ".join(r for r in (reason, refusal) if r)))
            if bn_path is not None and refusal is None:
                bn_pairs.append((path, bn_path))
            continue
        conv = module
        block = IrepConv(conv.in_channels, conv.out_channels, conv.stride[0], conv.groups, space,
                         fixed=_fixed_op(conv, split.bn if split is not None else None), zero_init_branches=True)
        _set(net, path, block)
        if split is not None:
            _set(net, bn_path, split.after)
        rewritten.append(path)
    if not rewritten:
        raise IrepError("no eligible 3x3 conv in {} ({} conv(s) left out{})".format(
            name or type(model).__name__, len(skipped),
            ", first: {} ({})".format(*skipped[0]) if skipped else ""))
    net.irep_report = IrepReport(rewritten, skipped, bn_pairs, reparameterized)
    specs = layer_specs(net)
    # the default label carries the structure, so two networks of one class (resnet18, resnet50) differ
    label = name or "{}:{}@{}".format(type(model).__module__, type(model).__qualname__, fingerprint(specs)[:8])
    register_backbone(label, lambda: specs, "any", builtin=False)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    net.irep_config = {
        "backbone": label, "num_classes": linears[-1].out_features if linears else 0, "width": 1.0,
        "in_channels": convs[0].in_channels, "input_size": int(input_size), "ops": list(space),
        "supernet": False, "bn_pairs": [list(p) for p in bn_pairs],
        "model": {"kwargs": {}, "weights": None, "include": list(include_p or ()),
                  "exclude": list(exclude_p or ()), "fingerprint": fingerprint(specs)},
    }
    return net


def _inside_irep(path: str, modules: Dict[str, nn.Module]) -> bool:
    parts = path.split(".")
    return any(isinstance(modules.get(".".join(parts[:i])), IrepConv) for i in range(1, len(parts)))
