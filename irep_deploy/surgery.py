"""IREPS for any PyTorch CNN: turn every eligible 3x3 conv of a user's network into an IrepConv.

:func:`irepify` returns a new model in which each eligible ``nn.Conv2d`` (3x3, padding 1,
dilation 1, zero padding, square stride, any groups) becomes an :class:`IrepConv` whose fixed op
holds the user's own conv and the BatchNorm that follows it; the BN's old place becomes
``nn.Identity``. Branches added later start at zero output, so the network computes what it
computed before, and fine-tuning from pretrained weights starts where the pretrained network is.

conv -> BN pairs are found in the graph (``torch.fx``, as ``torch.ao`` fusion does): a conv whose
every call has as its only user one BN with as many channels, which takes nothing else; the BN is
absorbed only if :func:`~irep_deploy.norms.split_norm` accepts it. A conv or BN whose tensors another
module holds too, or a forward reads itself, is left alone. A module whose forward cannot be traced
becomes a leaf of its caller's graph (so it blinds no ancestor) and is scanned on its own; the convs
its forward calls directly are settled by one real forward (see :func:`irepify`), and every conv left
out names that module in :attr:`IrepReport.skipped`. The model is traced in eval and in train mode
(fx follows ``self.training``).
"""
from __future__ import annotations

import collections
import contextlib
import copy
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Iterator, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.fx
import torch.nn as nn

from .arch import fingerprint, register_backbone
from .binding import layer_specs
from .block import IrepConv
from .errors import IrepError
from .norms import NormSplit, is_bn_like, split_norm
from .ops import SPACES, ConvBN, check_ops
from .resources import require_check_input
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
    """BN-like modules and existing IrepConvs are leaves, so a conv's user is the BN module itself;
    so are the modules in ``leaves`` (found untraceable), so that they do not blind their callers.

    ``failed`` is the innermost module whose forward raised: the one to make a leaf and retry.
    """

    def __init__(self, leaves: FrozenSet[str] = frozenset()) -> None:
        super().__init__()
        self.leaves = leaves
        self.failed: Optional[str] = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (qualname in self.leaves or is_bn_like(m) or isinstance(m, IrepConv)
                or super().is_leaf_module(m, qualname))

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: Tuple[Any, ...],
                    kwargs: Dict[str, Any]) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # the innermost frame sees the error first; a leaf (or a module outside the traced one)
            # cannot be traced around any further, so its caller takes the blame
            if self.failed is None:
                path = _path_in(self, m)
                if path is not None and not self.is_leaf_module(m, path):
                    self.failed = path
            raise


def _path_in(tracer: torch.fx.Tracer, m: nn.Module) -> Optional[str]:
    try:
        return tracer.path_of_module(m)
    except NameError:  # a module that is not a submodule of the traced one
        return None


@dataclass
class GraphScan:
    """What tracing revealed: the BN after each conv (None: no BN), convs whose BN is unknown, and
    convs called directly by a forward that torch.fx cannot trace (``untraced``: the reason, naming
    that module; :func:`irepify` runs the model once to settle them)."""

    bn_after: Dict[str, Optional[str]] = field(default_factory=dict)
    unknown: Dict[str, str] = field(default_factory=dict)
    untraced: Dict[str, str] = field(default_factory=dict)
    # module path -> why: a forward reads its tensors itself (``F.conv2d(x, self.conv.weight)``)
    read: Dict[str, str] = field(default_factory=dict)


def scan_conv_bn(model: nn.Module) -> GraphScan:
    """Find conv -> BN pairs of ``model`` through its torch.fx graphs (module paths from the root).

    fx follows ``self.training``, so the model is traced in eval and in train mode (train-only
    paths such as auxiliary heads count too) and the modes' findings are merged; every module's
    mode is restored.
    """
    scans: Dict[str, GraphScan] = {}
    with _modes_restored(model):
        for mode in ("eval", "train"):
            model.train(mode == "train")
            scans[mode] = GraphScan()
            _scan(model, "", scans[mode])
    return _merge_modes(scans)


@contextlib.contextmanager
def _modes_restored(model: nn.Module) -> Iterator[None]:
    """Each module's own mode back afterwards (``model.train()`` would set one mode for all)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _trace(module: nn.Module, tracer: Optional[torch.fx.Tracer] = None) -> torch.fx.Graph:
    """fx-trace ``module`` and leave no trace on it: a forward may cache what it computes on its
    modules (torchvision's MultiScaleRoIAlign caches its scales on first call), and a traced forward
    would leave fx Proxies there, breaking every later forward. Module attributes are restored."""
    with _attributes_restored(module):
        return (tracer or _Tracer()).trace(module)


@contextlib.contextmanager
def _attributes_restored(module: nn.Module) -> Iterator[None]:
    saved = [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules))
             for m in module.modules()]
    try:
        yield
    finally:
        for m, attrs, params, buffers, children in saved:
            m.__dict__.clear()
            m.__dict__.update(attrs)
            for live, old in ((m._parameters, params), (m._buffers, buffers), (m._modules, children)):
                live.clear()
                live.update(old)


def _error(exc: Exception) -> str:
    text = str(exc).strip()
    return "{}: {}".format(type(exc).__name__, text.splitlines()[0][:100] if text else "")


def _untraceable(module: nn.Module, path: str, error: str) -> str:
    return "{} ({}) cannot be traced by torch.fx: {}".format(path or "the model", type(module).__name__, error)


def _trace_around(module: nn.Module) -> Tuple[Optional[torch.fx.Graph], List[str], str]:
    """Trace ``module``, making each innermost module whose forward fails a leaf and retrying.

    Returns the graph (None: the module's own forward cannot be traced), the leaves made (each
    names its own error when it is scanned on its own) and the module's own error.
    """
    leaves: List[str] = []
    while True:
        tracer = _Tracer(frozenset(leaves))
        try:
            return _trace(module, tracer), leaves, ""
        except Exception as exc:  # fx raises many types for untraceable code; every one means "look inside"
            if tracer.failed is None:
                return None, leaves, _error(exc)
            leaves.append(tracer.failed)


def _scan(module: nn.Module, prefix: str, scan: GraphScan) -> None:
    """One mode's findings for ``module`` and everything below it, into ``scan``."""
    graph, leaves, error = _trace_around(module)
    if graph is None:  # its children are scanned one by one (the leaves found so far among them)
        _scan_children(module, prefix, _untraceable(module, prefix.rstrip("."), error), scan)
        return
    _note_direct_reads(graph, prefix, scan)
    for leaf in leaves:  # each is scanned on its own: only the convs it calls directly stay unknown
        _scan(module.get_submodule(leaf), prefix + leaf + ".", scan)
    calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")
    followers: Dict[str, List[Optional[str]]] = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(module.get_submodule(node.target), nn.Conv2d):
            followers.setdefault(node.target, []).append(_follower(module, node))
    for target, bns in followers.items():
        kinds = sorted(set(bns), key=lambda b: (b is not None, b or ""))
        if len(kinds) > 1:
            scan.unknown[prefix + target] = "called {} times in the forward, followed by {}: no one block " \
                "replaces it".format(len(bns), " or by ".join(_name(b, prefix) for b in kinds))
        else:  # a BN that also takes other inputs than this conv's outputs cannot move into its block
            bn = kinds[0]
            scan.bn_after[prefix + target] = prefix + bn if bn is not None and calls[bn] == len(bns) else None


def _scan_children(module: nn.Module, prefix: str, reason: str, scan: GraphScan) -> None:
    """The children of a module whose forward cannot be traced: each child with a forward is
    traced on its own; a conv it calls directly (also from a ModuleList/ModuleDict, which has no
    forward of its own) is ``untraced`` with ``reason``."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d):
            scan.untraced[prefix + name] = reason
        elif isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            _scan_children(child, prefix + name + ".", reason, scan)
        elif not is_bn_like(child) and not isinstance(child, IrepConv):
            _scan(child, prefix + name + ".", scan)


def _follower(module: nn.Module, node: torch.fx.Node) -> Optional[str]:
    """The BN (its target in the graph) that takes this call of a conv as its only user; None: none."""
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_module":
        return None
    follower = module.get_submodule(users[0].target)
    # running_mean, not num_features: torchvision's FrozenBatchNorm2d has no num_features
    if is_bn_like(follower) and follower.running_mean.numel() == module.get_submodule(node.target).out_channels:
        return users[0].target
    return None


def _name(bn: Optional[str], prefix: str = "") -> str:
    return "no BN" if bn is None else prefix + bn


def _merge_modes(scans: Dict[str, GraphScan]) -> GraphScan:
    """One GraphScan from both modes: a conv seen in one mode only takes that mode's finding; a
    conv whose BN differs between the modes is unknown; an untraced conv is left to the real
    forward unless the other mode's graph shows a BN after it."""
    out = GraphScan()
    for mode, scan in scans.items():
        for path, why in scan.unknown.items():
            same = all(other.unknown.get(path) == why for other in scans.values())
            out.unknown.setdefault(path, why if same else "{} (in {} mode)".format(why, mode))
        for path, reason in scan.untraced.items():
            out.untraced.setdefault(path, reason)
        for path, why in scan.read.items():  # a tensor read directly in either mode is read
            out.read.setdefault(path, why)
    found: Dict[str, Dict[str, Optional[str]]] = collections.defaultdict(dict)
    for mode, scan in scans.items():
        for path, bn in scan.bn_after.items():
            found[path][mode] = bn
    for path, by_mode in found.items():
        bns = set(by_mode.values())
        if path in out.unknown or (path in out.untraced and bns == {None}):
            continue
        if path in out.untraced:
            out.unknown[path] = "followed by {} in {} mode, but in the other mode {}".format(
                " or by ".join(sorted(_name(b) for b in bns)), "/".join(by_mode), out.untraced[path])
        elif len(bns) > 1:
            out.unknown[path] = "followed by {} in eval mode but by {} in train mode".format(
                _name(by_mode["eval"]), _name(by_mode["train"]))
        else:
            out.bn_after[path] = bns.pop()
    for path in out.unknown:
        out.untraced.pop(path, None)
    return out


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
            input_size: int = 224, example_input: Any = None) -> nn.Module:
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

    A conv called directly by a forward that torch.fx cannot trace (a detection head iterating
    over its feature maps) is settled by one real forward in eval mode, without gradients, on
    ``example_input`` (a tensor or a tuple of positional arguments; default: a seeded random
    ``1 x C x input_size x input_size`` tensor, C the first conv's input channels): a conv whose
    outputs no BN-like module takes is rewritten on its own (exact whatever uses its output);
    one whose output a BN takes is skipped, since only a graph can prove the BN its only user.
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
    chosen: Dict[str, Optional[str]] = {
        path: _choice_reason(module, path, include_p, exclude_p) for path, module in modules.items()
        if isinstance(module, nn.Conv2d) and not _inside_irep(path, modules)}
    untraced = [p for p, why in chosen.items() if why is None and p in scan.untraced]
    if untraced:
        _settle_untraced(net, scan, untraced, (lambda: _example(net, input_size)) if example_input is None
                         else (lambda: example_input))
    for path, reason in chosen.items():
        module = modules[path]
        bn_path = scan.bn_after.get(path)
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


def _choice_reason(conv: nn.Module, path: str, include: Optional[Tuple[str, ...]],
                   exclude: Optional[Tuple[str, ...]]) -> Optional[str]:
    """Why this conv is not to be rewritten, before its graph is asked (None: it is)."""
    reason = ineligible_reason(conv)
    if reason is None and include is not None and not _matches(path, include):
        reason = "not matched by include"
    if reason is None and exclude is not None and _matches(path, exclude):
        reason = "matched by exclude"
    return reason


def _example(model: nn.Module, input_size: int) -> Tuple[torch.Tensor, ...]:
    """A seeded random image batch of one for the model's first conv (the global RNG is untouched)."""
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    # input_size may come from a checkpoint header: the batch is refused before it is allocated
    require_check_input((1, first.in_channels, input_size, input_size), "irepify's example input",
                        "input_size {}".format(input_size))
    x = torch.randn(1, first.in_channels, input_size, input_size, generator=torch.Generator().manual_seed(0))
    return (x.to(first.weight.device, first.weight.dtype),)


def _settle_untraced(model: nn.Module, scan: GraphScan, paths: List[str], make_example: Callable[[], Any]) -> None:
    """Move each of ``paths`` from ``scan.untraced`` to ``bn_after`` (None: no BN takes its output)
    or to ``unknown``, by one real forward of ``model`` (on ``make_example()``; an example too large
    for memory is a failed forward like any other)."""
    try:
        example = make_example()
        fed = _bn_takers(model, paths, example if isinstance(example, tuple) else (example,))
    except Exception as exc:  # the user's forward may raise anything on an input it does not expect
        failure: Optional[str] = "a forward on the example input failed ({})".format(_error(exc))
        fed = {}
    else:
        failure = None
    for path in paths:
        because = scan.untraced.pop(path)
        if path in fed and not fed[path]:
            scan.bn_after[path] = None
        elif path in fed:
            scan.unknown[path] = "its output feeds {}, which cannot be proven its only user because {}".format(
                " and ".join(sorted(fed[path])), because)
        else:
            scan.unknown[path] = "the BN after it is unknown because {}, and {}".format(
                because, failure or "a forward on the example input did not call it")


def _bn_takers(model: nn.Module, paths: List[str], args: Tuple[Any, ...]) -> Dict[str, Set[str]]:
    """For each conv of ``paths`` the forward called: the BN-like modules that took one of its outputs
    (the very tensor object: a BN behind a view or any other op is not the conv's follower)."""
    outputs: Dict[int, Tuple[str, torch.Tensor]] = {}  # holding the tensor keeps its id unique for the run
    fed: Dict[str, Set[str]] = {}

    def conv_hook(path: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, out: Any) -> None:
            fed.setdefault(path, set())
            outputs[id(out)] = (path, out)
        return hook

    def bn_hook(path: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Tuple[Any, ...]) -> None:
            for x in inputs:
                if id(x) in outputs:
                    fed[outputs[id(x)][0]].add(path)
        return hook

    handles = [model.get_submodule(p).register_forward_hook(conv_hook(p)) for p in paths]
    handles += [m.register_forward_pre_hook(bn_hook(n)) for n, m in model.named_modules() if is_bn_like(m)]
    try:
        with _modes_restored(model), _attributes_restored(model), torch.no_grad():
            model.eval()
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
    return fed


def _inside_irep(path: str, modules: Dict[str, nn.Module]) -> bool:
    parts = path.split(".")
    return any(isinstance(modules.get(".".join(parts[:i])), IrepConv) for i in range(1, len(parts)))
