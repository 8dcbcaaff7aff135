"""The check of a fusion: the fused network against the original on one seeded batch, layer by layer.

Each module that fusion replaced by a module of another type (an ``IrepConv`` or ``ConvBN`` that became
a conv, a BN whose place became ``nn.Identity`` or its activation) is compared at its path, in the
order the original forward calls them, and then the whole output (a tensor, or tuples, lists and
dicts of them). The first place beyond tolerance is named: the error points at the layer, not at the
logits it spoiled. Both networks run in eval mode, without autocast, with TF32 off and under a forked
RNG, so the check changes no mode, no running statistic and no random state of the caller.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .compare import FUSE_OUTPUT, Tolerance, compare
from .errors import IrepError
from .precision import exact_fp32
from .resources import require_check_input

Inputs = Tuple[Any, ...]
#: the batch size of the check: two examples are enough to see a wrong kernel or bias
CHECK_BATCH = 2
#: the resolution of a model that records none (neither ``irep_config`` nor ``example_input``)
DEFAULT_SIZE = 224


@dataclass
class Recording:
    """One forward: its output, and the outputs of the watched paths in call order."""

    output: Any
    calls: List[Tuple[str, Any]]


def changed_kinds(places: Iterable[Tuple[str, nn.Module, nn.Module]]) -> Dict[str, str]:
    """Path -> "Before -> After" for each (path, before, after) whose module changed type: the places
    whose outputs must agree (a conv folded with its BN keeps its type but not its output, so its
    BN's place is the one compared)."""
    return {path: "{} -> {}".format(type(old).__name__, type(new).__name__)
            for path, old, new in places if type(old) is not type(new)}


def check_inputs(model: nn.Module, example_input: Any = None) -> Optional[Inputs]:
    """The check's positional arguments: ``example_input`` (a tensor or a tuple of arguments), or a
    seeded batch of the model's recorded ``in_channels`` x ``input_size``. None: the model is not in
    float32/float64, where the FP32 tolerance means nothing."""
    if example_input is not None:
        return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is not None and param.dtype not in (torch.float32, torch.float64):
        return None
    config = getattr(model, "irep_config", None) or {}
    channels = config.get("in_channels") or next(
        (m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), 3)
    size = int(config.get("input_size") or DEFAULT_SIZE)
    # a recorded size is data (a checkpoint header): the batch is refused before it is allocated
    require_check_input((CHECK_BATCH, channels, size, size), "fuse_model's check batch", "{}: input_size {}".format(
        config.get("backbone", type(model).__name__), size))
    x = torch.randn(CHECK_BATCH, channels, size, size, generator=torch.Generator().manual_seed(0))
    return (x.to(param.device, param.dtype) if param is not None else x,)


@contextlib.contextmanager
def _quiet(model: nn.Module, inputs: Inputs) -> Iterator[None]:
    """Eval mode, no grad, no autocast, TF32 off, a forked RNG; every module's mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    device = next((x.device for x in inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
    cuda = [device.index or 0] if device.type == "cuda" else []
    no_autocast = (torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda")
                   else contextlib.nullcontext())
    model.eval()
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad(), exact_fp32(), no_autocast:
            yield
    finally:
        for module, training in modes:
            module.training = training


def _detached(value: Any) -> Any:
    # a clone: an in-place op after the module (ReLU(inplace=True)) would change the recorded output
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        items = [_detached(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def record(model: nn.Module, paths: Sequence[str], inputs: Inputs, what: str) -> Recording:
    """Run ``model`` on ``inputs`` quietly, keeping each path's outputs in call order."""
    calls: List[Tuple[str, Any]] = []
    handles = []
    for path in paths:
        def keep(module: nn.Module, args: Any, output: Any, path: str = path) -> None:
            calls.append((path, _detached(output)))
        handles.append(model.get_submodule(path).register_forward_hook(keep))
    try:
        with _quiet(model, inputs):
            output = model(*inputs)
    except Exception as exc:  # the user's forward: any error means "this input does not fit"
        raise IrepError("cannot run the fusion check: the {} model's forward on {} raised {}: {}; pass "
                        "example_input= (or check=False)".format(what, _shapes(inputs), type(exc).__name__,
                                                                 str(exc).strip().splitlines()[0][:200]
                                                                 if str(exc).strip() else "")) from exc
    finally:
        for handle in handles:
            handle.remove()
    return Recording(_detached(output), calls)


def _shapes(inputs: Inputs) -> str:
    return ", ".join("a {} batch".format(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
                     for x in inputs)


def _leaves(value: Any, name: str = "output") -> Iterator[Tuple[str, Any]]:
    if isinstance(value, dict):
        for key in value:
            yield from _leaves(value[key], "{}[{!r}]".format(name, key))
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from _leaves(item, "{}[{}]".format(name, i))
    else:
        yield name, value


def _differs(reference: Any, got: Any, tolerance: Tolerance) -> Optional[str]:
    if not (isinstance(reference, torch.Tensor) and isinstance(got, torch.Tensor)):
        same = type(reference) is type(got) and not isinstance(reference, torch.Tensor) and reference == got
        return None if same is True else "{} vs {}".format(type(reference).__name__, type(got).__name__)
    if tuple(reference.shape) != tuple(got.shape):
        return "shape {} vs {}".format(tuple(reference.shape), tuple(got.shape))
    if not reference.is_floating_point():  # labels, indices: exact
        return None if torch.equal(reference.cpu(), got.cpu()) else "the values differ"
    result = compare(reference, got, tolerance)
    return None if result.passed else "; ".join(result.failures)


def first_difference(reference: Recording, fused: Recording, kinds: Dict[str, str],
                     tolerance: Tolerance, output_tolerance: Tolerance = FUSE_OUTPUT) -> Optional[str]:
    """Where ``fused`` first departs from ``reference``: a layer beyond ``tolerance`` (in the
    original's call order), then the output beyond ``output_tolerance``; None when nothing does."""
    pending: Dict[str, List[Any]] = {}
    for path, value in fused.calls:
        pending.setdefault(path, []).append(value)
    for path, value in reference.calls:
        outputs = pending.get(path)
        if not outputs:
            return "{} ({}) ran in the original forward but not in the fused one".format(path, kinds[path])
        problem = _differs(value, outputs.pop(0), tolerance)
        if problem is not None:
            return "{} ({}) first differs: {}".format(path, kinds[path], problem)
    ref_leaves, got_leaves = list(_leaves(reference.output)), list(_leaves(fused.output))
    if any(isinstance(v, torch.Tensor) and not v.is_floating_point() for _, v in ref_leaves):
        # integer leaves (labels, indices) mark post-processing that selects (NMS, top-k): a near-tie
        # flips its choices on rounding alone, so such an output is checked through its layers only
        return None
    if [n for n, _ in ref_leaves] != [n for n, _ in got_leaves]:
        return "the output's structure differs: {} vs {}".format(
            [n for n, _ in ref_leaves][:8], [n for n, _ in got_leaves][:8])
    for (name, ref), (_, got) in zip(ref_leaves, got_leaves):
        problem = _differs(ref, got, output_tolerance)
        if problem is not None:
            return "{} differs (every fused layer agrees): {}".format(name, problem)
    return None


def locate(original: nn.Module, fused: nn.Module, inputs: Inputs, tolerance: Union[Tolerance, float]) -> Optional[str]:
    """:func:`first_difference` of two existing networks (the fused one made without inplace)."""
    limits = tolerance if isinstance(tolerance, Tolerance) else Tolerance("relative error", max_rel_error=tolerance)
    plain = dict(fused.named_modules())
    kinds = changed_kinds((p, m, plain[p]) for p, m in original.named_modules() if p in plain)
    return first_difference(record(original, list(kinds), inputs, "original"),
                            record(fused, list(kinds), inputs, "fused"), kinds, limits, limits)


def failure_text(failures: Sequence[str], original: nn.Module, fused: nn.Module, inputs: Inputs,
                 tolerance: Tolerance) -> str:
    """A failed output check's phrases, and the first layer that differs (for the CLI's fuse and export)."""
    where = locate(original, fused, inputs, tolerance)
    return "; ".join(list(failures) + ([where] if where else []))
