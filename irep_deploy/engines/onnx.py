"""ONNX export of fused (or multi-branch) networks: legacy exporter, simplification, checks, verification.

``export`` is the library side of ``irep-deploy export``. The model is exported with the TorchScript
(legacy) exporter at an explicit opset, because TensorRT 8.5 on JetPack 5 reads opsets up to 17 and
torch 2.0 has no ``dynamo=`` switch; the file is written only after ``onnx.checker`` and an
onnxruntime-vs-torch comparison have passed, so a failed export leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .._io import atomic_write, check_writable, quote, regular_input
from ..checkpoint import Checkpoint, load_checkpoint, multi_branch_model
from ..compare import FUSE_FP32, ONNX_EXPORT, compare, compare_outputs, output_leaves
from ..errors import CheckpointError, IrepError, NotAvailableError, UsageError, VerificationError, first_line
from ..fusecheck import failure_text
from ..precision import exact_fp32
from ..progress import Stages
from ..reparam import fuse_model
from ..resources import require_input_memory, require_memory, size_flags
from . import ort as ort_helpers

PathLike = Union[str, "os.PathLike[str]"]

DEFAULT_OPSET = 17  # the highest TensorRT 8.5 (JetPack 5, Xavier) parses
MIN_OPSET = 11
SIMPLIFIERS = ("auto", "onnxslim", "onnxsim", "none")
# What a fused ResNet/VGG may contain once exported; BatchNormalization or a second conv per
# position would mean the re-parameterization did not happen.
FUSED_OP_TYPES = frozenset({"Conv", "Relu", "Add", "MaxPool", "GlobalAveragePool", "Flatten", "Gemm"})
_MAX_PROTO_BYTES = 2 ** 31 - 1  # protobuf's limit for a single-file model
# The stages of an export its progress bar names (a checkpoint's export loads it first).
EXPORT_STAGES = ("trace", "simplify", "check", "onnxruntime vs torch", "write")
# torch 2.0 prints this summary to stdout after every export, even when it has nothing to report.
_EMPTY_DIAGNOSTICS = re.compile(r"=+ Diagnostic Run torch\.onnx\.export version [^\n]*\n"
                                r"verbose: [^\n]*\n=+ 0 NONE 0 NOTE 0 WARNING 0 ERROR =+\n\n?")


def require_onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise NotAvailableError("onnx is not installed (pip install 'irep-deploy[onnx]')") from exc
    return onnx


@dataclass
class Check:
    """onnxruntime vs torch at one batch: of a model with several outputs, the output with the largest
    relative error (``worst`` names it)."""

    batch: int
    max_abs_error: float
    rel_error: float
    worst: str = ""


@dataclass(frozen=True)
class Output:
    """One graph output: its name and its shape at the export batch (1 when the batch is dynamic)."""

    name: str
    shape: Tuple[int, ...]


@dataclass
class ExportReport:
    out: str
    opset: int
    simplifier: str
    dynamic_batch: bool
    input_shape: Tuple[int, ...]  # batch dimension is the export batch (1 when dynamic)
    input_name: str
    outputs: List[Output]  # in the graph's order, which is the model's output flattened in order
    tolerance: float
    checks: List[Check] = field(default_factory=list)
    op_types: Dict[str, int] = field(default_factory=dict)
    fused_here: bool = False  # the input was a multi-branch checkpoint fused by this export
    size_bytes: int = 0

    @property
    def output_name(self) -> str:
        """The output's name; the names joined by ", " for a model with several outputs."""
        return ", ".join(o.name for o in self.outputs)


# -- model loading -----------------------------------------------------------------------------------
def load_deploy_model(ckpt: PathLike, arch: Optional[PathLike] = None, tolerance: Optional[float] = None,
                      model: Union[str, nn.Module, None] = None,
                      trust_pickle: bool = False) -> Tuple[nn.Module, Checkpoint, bool]:
    """The fused network of a checkpoint, in eval mode: a deploy checkpoint as it is, a multi-branch one
    fused under ``arch`` (default: the code it was trained with) and checked against itself. ``model``
    names a network that is not built in (:meth:`~irep_deploy.checkpoint.Checkpoint.build`). The check is
    ``fuse``'s, on the same seeded batch of 2 (``tolerance`` default: ``compare.FUSE_FP32``).

    Returns (model, checkpoint, fused_here)."""
    checkpoint = load_checkpoint(ckpt, trust_pickle=trust_pickle)
    if checkpoint.kind == "deploy":
        if arch is not None:
            raise IrepError("{}: is already fused (a deploy checkpoint); drop the architecture code {}".format(
                ckpt, arch))
        return checkpoint.build(model).eval(), checkpoint, False
    net = multi_branch_model(checkpoint, arch, model).eval()
    size = checkpoint.header["input_size"]
    require_memory((2, checkpoint.header["in_channels"], size, size), net, "the fusion check batch",
                   "{}: header input_size {}".format(ckpt, size), CheckpointError, check=True)
    plain = fuse_model(net, check=False)  # checked below, with the caller's tolerance
    x = torch.randn(2, checkpoint.header["in_channels"], checkpoint.header["input_size"],
                    checkpoint.header["input_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), exact_fp32():  # the tolerance assumes float32 rounding, not TF32
        check = compare_outputs(net(x), plain(x), FUSE_FP32.but(max_rel_error=tolerance))
    if not check.passed:
        raise VerificationError("{}: fused output differs from the multi-branch output: {}".format(
            ckpt, failure_text(check.failures, net, plain, (x,), check.tolerance)))
    return plain, checkpoint, True


# -- export pieces -----------------------------------------------------------------------------------
def _legacy_export_kwargs() -> Dict[str, Any]:
    """torch >= 2.5 grew ``dynamo=`` (default True from 2.9); torch 2.0 has no such parameter."""
    params = inspect.signature(torch.onnx.export).parameters
    return {"dynamo": False} if "dynamo" in params else {}


def max_opset() -> int:
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET
        return int(ONNX_MAX_OPSET)
    except ImportError:  # pragma: no cover - private module moved; stay conservative
        return DEFAULT_OPSET


# -- outputs: a tensor, or a tuple/list/dict of them (a detector body, a raw detection head) ---------
SINGLE_OUTPUT_NAME = "logits"  # one tensor: a classifier's output, as in every release so far
SEQUENCE_OUTPUT_PREFIX = "output"  # a tuple or list: output0, output1, ...
_UNSAFE_NAME_CHARS = re.compile(r"[^0-9A-Za-z_.\-]")


def flatten_outputs(outputs: Any) -> List[Tuple[str, torch.Tensor]]:
    """Every tensor of a model's output with its path (``compare.output_leaves``: dict keys and list
    positions joined by ``.``), in order: a dict in its own order, a tuple or list position by position,
    nested ones depth first. ONNX outputs are a flat list of tensors, so anything else (None, a number,
    a string) cannot be exported."""
    leaves = output_leaves(outputs)
    for path, value in leaves:
        if not isinstance(value, torch.Tensor):
            raise IrepError("the model's output{} is {}, not a tensor (nor a tuple, list or dict of tensors); "
                            "ONNX outputs are tensors".format(" " + quote(path) if path else "", type(value).__name__))
    if not leaves:
        raise IrepError("the model's output holds no tensor; an ONNX model needs at least one output")
    return leaves


def output_names(outputs: Any, output_name: Optional[str] = None) -> List[str]:
    """The graph output names of a model whose output is ``outputs`` (flattened as :func:`flatten_outputs`).

    * one tensor: ``output_name``, default ``logits``;
    * a tuple or list (nested ones flattened in order): ``output0, output1, ...`` (``output_name`` replaces
      the prefix ``output``);
    * a dict: its keys, characters other than letters, digits, ``_ . -`` replaced by ``_``, and the keys
      or positions of nested containers joined with ``.`` (``boxes.0``); a name that starts with a digit
      gets the prefix ``output`` (an FPN's ``0, 1, 2, 3, pool`` are ``output0, ..., output3, pool``).
      ``output_name`` is refused: the keys already name every output.

    Two outputs whose names come out equal are refused in one line naming both."""
    leaves = flatten_outputs(outputs)
    if isinstance(outputs, torch.Tensor):
        return [output_name or SINGLE_OUTPUT_NAME]
    if isinstance(outputs, Mapping):
        if output_name is not None:
            raise UsageError("the model returns a dict, whose keys name its outputs ({}); drop the output "
                             "name {!r}".format(", ".join(quote(k) for k in outputs), output_name))
        names = [_UNSAFE_NAME_CHARS.sub("_", path) or "_" for path, _ in leaves]
        # TorchScript, which the legacy exporter names values in, refuses a name that is a number.
        names = [SEQUENCE_OUTPUT_PREFIX + n if n[0].isdigit() else n for n in names]
    else:
        names = ["{}{}".format(output_name or SEQUENCE_OUTPUT_PREFIX, i) for i in range(len(leaves))]
    seen: Dict[str, str] = {}
    for name, (path, _) in zip(names, leaves):
        if name in seen:
            raise IrepError("the model's outputs {} and {} would both be named {} in ONNX; rename a key".format(
                quote(seen[name]), quote(path), quote(name)))
        seen[name] = path
    return names


class _FlatOutputs(nn.Module):
    """The model with its output flattened to a tuple of tensors (ONNX outputs are positional)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(t for _, t in flatten_outputs(self.model(x)))


def export_module(model: nn.Module, input_shape: Sequence[int], opset: int = DEFAULT_OPSET,
                  dynamic_batch: bool = True, input_name: str = "input", output_name: Optional[str] = None) -> Any:
    """Export ``model`` (eval mode, on CPU) with the legacy exporter; returns the ``onnx.ModelProto``.

    The model may return a tensor or a tuple/list/dict of tensors; every tensor becomes a graph output,
    named by :func:`output_names`, with a dynamic batch axis 0 when ``dynamic_batch``."""
    onnx = require_onnx()
    x = torch.zeros(*input_shape)
    # A silent forward to learn the output's structure: the user's own prints and warnings come once,
    # from the export's trace.
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        sample = model.eval()(x)
    names = output_names(sample, output_name)
    if input_name in names:
        raise UsageError("input and output names must differ (both {!r})".format(input_name))
    # A single tensor is exported as it is, so node names (which quantize --exclude matches) stay those
    # of the model itself; a wrapper would prefix them with /model.
    module = model if isinstance(sample, torch.Tensor) else _FlatOutputs(model)
    buffer = io.BytesIO()
    axes = {name: {0: "batch"} for name in [input_name] + names} if dynamic_batch else None
    with warnings.catch_warnings(), _without_empty_diagnostics():
        # The legacy exporter is chosen on purpose (see the module docstring); new torch says it is
        # deprecated, in its own words and in those of a helper it calls. torch 2.0 notes, for the
        # padding slices of multi-branch graphs, that it skipped an optimisation. None of that is the
        # user's to act on; other warnings still show.
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export",
                                DeprecationWarning)
        warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning, r"torch\.onnx")
        warnings.filterwarnings("ignore", "Constant folding - Only steps=1 can be constant folded", UserWarning)
        with torch.no_grad():
            torch.onnx.export(module.eval(), (x,), buffer, opset_version=opset, input_names=[input_name],
                              output_names=names, dynamic_axes=axes, do_constant_folding=True,
                              **_legacy_export_kwargs())
    return onnx.load_from_string(buffer.getvalue())


@contextlib.contextmanager
def _without_empty_diagnostics() -> Iterator[None]:
    """Capture stdout around a torch 2.0 export and drop its empty diagnostic summary; anything else
    printed (a summary that counts warnings or errors included) is passed on unchanged."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        rest = _EMPTY_DIAGNOSTICS.sub("", captured.getvalue())
        if rest:
            sys.stdout.write(rest)


def simplify_model(model: Any, method: str = "auto") -> Tuple[Any, str]:
    """Simplify with onnxslim or onnxsim; ``auto`` takes the first installed. Returns (model, used)."""
    if method not in SIMPLIFIERS:
        raise IrepError("unknown simplifier {!r} (choose from {})".format(method, ", ".join(SIMPLIFIERS)))
    if method == "none":
        return model, "none"
    for name in (("onnxslim", "onnxsim") if method == "auto" else (method,)):
        try:
            module = __import__(name)
        except ImportError as exc:
            if method != "auto":
                raise NotAvailableError("--simplify {} was asked for but {} is not installed (pip install {})".format(
                    name, name, name)) from exc
            continue
        if name == "onnxslim":
            return module.slim(model), name
        simplified, ok = module.simplify(model)
        if not ok:
            raise VerificationError("onnxsim could not validate its simplified model")
        return simplified, name
    return model, "none"


def check_model(model: Any, source: str) -> None:
    """``onnx.checker`` with full shape inference; a failure means the exported file would be invalid."""
    onnx = require_onnx()
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # ValidationError, InferenceError
        raise VerificationError("{}: onnx.checker rejects the exported model: {}".format(
            source, first_line(exc))) from exc


def op_types(model: Any) -> Dict[str, int]:
    """Node count per op type of a ModelProto or an .onnx path (main graph)."""
    if isinstance(model, (str, os.PathLike)):
        model = load_onnx(model)
    counts: Dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def load_onnx(path: PathLike, one_output: bool = True) -> Any:
    """Read an .onnx file; a missing or unparsable file is an IrepError naming it. ``one_output=False``
    accepts a model with several outputs (bench times them; quantize, eval and build-trt take one)."""
    onnx = require_onnx()
    p = Path(path)
    regular_input(p, "an ONNX model")
    if not p.is_file():
        raise IrepError("{}: no such file".format(path))
    try:
        model = onnx.load(str(p))
    except Exception as exc:  # DecodeError and friends
        raise IrepError("{}: not a readable ONNX model ({})".format(path, type(exc).__name__)) from exc
    check_loaded(model, path, one_output)
    return model


def check_loaded(model: Any, path: PathLike, one_output: bool = True) -> None:
    """What bench and build-trt assume of a model: a graph with one float image input, finite weights,
    and (``one_output``) one output."""
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    if not graph.node or not graph.output:
        raise IrepError("{}: not an ONNX model (empty, or a graph without nodes or outputs)".format(path))
    inputs = _graph_inputs(model)
    if len(inputs) != 1:
        raise IrepError("{}: expected one input, the model has {}".format(path, len(inputs)))
    if one_output and len(graph.output) != 1:
        raise IrepError("{}: expected one output, the model has {} ({}); only export and bench take a model "
                        "with several outputs".format(path, len(graph.output), _names(graph.output)))
    elem = inputs[0].type.tensor_type.elem_type
    if elem not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        raise IrepError("{}: input {} is {}, not a float image tensor".format(
            path, quote(inputs[0].name), TensorProto.DataType.Name(elem)))
    for init in graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise IrepError("{}: weight {} holds NaN or inf values".format(path, quote(init.name)))


def _graph_inputs(model: Any) -> List[Any]:
    """The graph inputs that are fed (old exporters list the weights as inputs too)."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _names(values: Sequence[Any], limit: int = 6) -> str:
    shown = ", ".join(quote(v.name, 40) for v in values[:limit])
    return shown + (", ..." if len(values) > limit else "")


def input_spec(model: Any) -> Tuple[str, List[Union[int, str]]]:
    """(input name, input dims with symbolic names as strings) of a single-input model."""
    inputs = _graph_inputs(model)
    if len(inputs) != 1:
        raise IrepError("expected one input, the model has {}".format(len(inputs)))
    return inputs[0].name, [d.dim_param if d.dim_param else int(d.dim_value)
                            for d in inputs[0].type.tensor_type.shape.dim]


def io_spec(model: Any) -> Tuple[str, str, List[Union[int, str]]]:
    """(input name, output name, input dims with symbolic names as strings) of a single-I/O model."""
    if len(model.graph.output) != 1:
        raise IrepError("expected one output, the model has {} ({})".format(
            len(model.graph.output), _names(model.graph.output)))
    name, dims = input_spec(model)
    return name, model.graph.output[0].name, dims


def verify(model: nn.Module, onnx_bytes: bytes, input_shape: Sequence[int], batches: Sequence[int],
           tolerance: float, seed: int = 0, source: str = "<onnx model>") -> List[Check]:
    """Compare onnxruntime (CPU) with torch on seeded random batches, every output (the model's output
    flattened as :func:`flatten_outputs`, against the graph's outputs in order); beyond ``tolerance``
    is an error.

    torch runs in true float32 (TF32 off, should the model be on a GPU): the tolerance assumes it."""
    session = ort_helpers.make_session(onnx_bytes, source=source)
    names = [o.name for o in session.get_outputs()]
    feed = session.get_inputs()[0].name
    gen = torch.Generator().manual_seed(seed)
    checks = []
    for b in batches:
        x = torch.randn(b, *input_shape[1:], generator=gen)
        with torch.no_grad(), exact_fp32():
            reference = [t for _, t in flatten_outputs(model(x))]
        got = session.run(None, {feed: x.numpy()})
        if len(got) != len(reference):
            raise VerificationError("{}: onnxruntime gives {} outputs, torch {}; nothing written".format(
                source, len(got), len(reference)))
        worst: Optional[Check] = None
        for name, ref, out in zip(names, reference, got):
            try:
                check = compare(ref, np.asarray(out), ONNX_EXPORT.but(max_rel_error=tolerance))
            except VerificationError as exc:  # another shape
                raise VerificationError("{}: output {} at batch {}: {}; nothing written".format(
                    source, quote(name), b, exc)) from exc
            if not check.passed:
                raise VerificationError("{}: onnxruntime output {}differs from torch at batch {}: {}; nothing "
                                        "written".format(source, "" if len(names) == 1 else quote(name) + " ",
                                                         b, "; ".join(check.failures)))
            if worst is None or check.rel_error > worst.rel_error:
                worst = Check(b, check.max_abs_error, check.rel_error, name)
        assert worst is not None  # flatten_outputs refuses an output without tensors
        checks.append(worst)
    return checks


# -- the step ----------------------------------------------------------------------------------------
def default_onnx_path(ckpt: PathLike) -> Path:
    return Path(ckpt).with_suffix(".onnx")


def export(ckpt: PathLike, out: Optional[PathLike] = None, arch: Optional[PathLike] = None,
           opset: int = DEFAULT_OPSET, input_size: Optional[int] = None, batch: Optional[int] = None,
           simplify: str = "auto", verify_batch: int = 4, tolerance: float = ONNX_EXPORT.max_rel_error, seed: int = 0,
           input_name: str = "input", output_name: Optional[str] = None,
           model: Union[str, nn.Module, None] = None, trust_pickle: bool = False,
           progress: bool = True) -> ExportReport:
    """Export a deploy checkpoint (or a multi-branch one, fused first under ``arch``) to ONNX.
    ``model`` names the network of a checkpoint that is not built in (a model spec or the user's module).
    ``trust_pickle``: read an old pickle-format checkpoint on torch < 2.10 too.

    ``batch=None`` makes the batch axis dynamic and checks batch 1 and ``verify_batch``; a fixed
    ``batch`` exports and checks that size only. Every tensor the model returns is an output, named by
    :func:`output_names` (``output_name`` default: ``logits`` for one tensor). Nothing is written unless
    every check passes. ``progress``: a bar on stderr naming the stage that runs.
    """
    out = Path(out) if out is not None else default_onnx_path(ckpt)
    check_writable(out, inputs=(ckpt, arch))
    _check_options(opset, batch, simplify, verify_batch, input_name, output_name)
    if input_size is not None and input_size < 1:
        raise UsageError("input size must be at least 1, got {}".format(input_size))
    with Stages("export", ("load",) + EXPORT_STAGES, progress) as stage:
        stage("load")
        net, checkpoint, fused_here = load_deploy_model(ckpt, arch, model=model, trust_pickle=trust_pickle)
        size = input_size or checkpoint.header["input_size"]
        shape = (batch or 1, checkpoint.header["in_channels"], size, size)
        largest = batch or verify_batch
        require_input_memory(net, largest, shape[1], size, None if input_size else checkpoint.header["input_size"],
                             str(ckpt), "the verification batch",
                             size_flags("--batch" if batch else "--verify-batch", largest, input_size))
        report = _export_checked(net, shape, out, str(ckpt), opset, batch, simplify, verify_batch, tolerance, seed,
                                 input_name, output_name, stage)
    report.fused_here = fused_here
    return report


def export_model(model: nn.Module, out: PathLike, input_shape: Sequence[int], opset: int = DEFAULT_OPSET,
                 batch: Optional[int] = None, simplify: str = "auto", verify_batch: int = 4,
                 tolerance: float = ONNX_EXPORT.max_rel_error, seed: int = 0, input_name: str = "input",
                 output_name: Optional[str] = None, progress: bool = True) -> ExportReport:
    """:func:`export` of a module you hold (e.g. a fused detector body, ``fuse_model(det).backbone``)
    instead of a checkpoint: ``input_shape`` is one example's ``(channels, height, width)``. The same
    steps: legacy exporter, every output named (:func:`output_names`), simplification, ``onnx.checker``,
    onnxruntime against torch at batch 1 and ``verify_batch`` (or the fixed ``batch``), and the file
    written only after all of them passed. The model is exported as it is: fuse it first."""
    out = Path(out)
    check_writable(out)
    _check_options(opset, batch, simplify, verify_batch, input_name, output_name)
    if len(input_shape) != 3 or any(int(d) < 1 for d in input_shape):
        raise UsageError("input_shape is one example's (channels, height, width), got {}".format(tuple(input_shape)))
    shape = (batch or 1,) + tuple(int(d) for d in input_shape)
    require_memory((batch or verify_batch,) + shape[1:], model, "the verification batch",
                   "batch {} at input {}".format(batch or verify_batch, "x".join(map(str, shape[1:]))))
    with Stages("export", EXPORT_STAGES, progress) as stage:
        return _export_checked(model.eval(), shape, out, type(model).__name__, opset, batch, simplify, verify_batch,
                               tolerance, seed, input_name, output_name, stage)


def _check_options(opset: int, batch: Optional[int], simplify: str, verify_batch: int, input_name: str,
                   output_name: Optional[str]) -> None:
    """The settings of an export, refused before any model is loaded; the extras it needs present."""
    if simplify not in SIMPLIFIERS:
        raise UsageError("unknown simplifier {!r} (choose from {})".format(simplify, ", ".join(SIMPLIFIERS)))
    top = max_opset()
    if not MIN_OPSET <= opset <= top:
        raise UsageError("opset {} is outside what this torch exports ({}-{}; TensorRT 8.5 reads up to {})".format(
            opset, MIN_OPSET, top, DEFAULT_OPSET))
    if batch is not None and batch < 1:
        raise UsageError("batch must be at least 1, got {}".format(batch))
    if verify_batch < 2:
        raise UsageError("verify batch must be at least 2 (batch 1 is always checked), got {}".format(verify_batch))
    if input_name == output_name:
        raise UsageError("input and output names must differ (both {!r})".format(input_name))
    require_onnx()
    ort_helpers.require_onnxruntime()


def _export_checked(net: nn.Module, shape: Tuple[int, ...], out: Path, source: str, opset: int,
                    batch: Optional[int], simplify: str, verify_batch: int, tolerance: float, seed: int,
                    input_name: str, output_name: Optional[str], stage: Callable[[str], None]) -> ExportReport:
    """Export, simplify, check and verify ``net`` at ``shape``; write ``out`` only after all passed.
    ``stage(name)`` is called as each of :data:`EXPORT_STAGES` begins."""
    stage("trace")
    sample = flatten_outputs(_check_runs(net, shape, source))
    proto = export_module(net, shape, opset, batch is None, input_name, output_name)
    stage("simplify")
    proto, used = simplify_model(proto, simplify)
    stage("check")
    check_model(proto, str(out))
    if proto.ByteSize() > _MAX_PROTO_BYTES:
        raise IrepError("{}: the model is larger than 2 GiB, which a single ONNX file cannot hold".format(source))
    data = proto.SerializeToString()
    batches = [batch] if batch is not None else [1, verify_batch]
    stage("onnxruntime vs torch")
    checks = verify(net, data, shape, batches, tolerance, seed, source=str(out))
    outputs = [Output(o.name, tuple(t.shape)) for o, (_, t) in zip(proto.graph.output, sample)]
    stage("write")
    with atomic_write(out, "wb") as handle:
        handle.write(data)
    return ExportReport(str(out), opset, used, batch is None, shape, input_name, outputs, tolerance,
                        checks, op_types(proto), False, len(data))


def _check_runs(model: nn.Module, shape: Sequence[int], source: PathLike) -> Any:
    """The model's output on zeros of ``shape``. A too-small input fails deep inside a pool or conv;
    say so in one line instead."""
    try:
        with torch.no_grad():
            return model(torch.zeros(*shape))
    except RuntimeError as exc:
        raise IrepError("{}: the model does not run on input {}: {}".format(
            source, "x".join(map(str, shape)), first_line(exc, 160))) from exc


def convert_fp16(model: Any) -> Any:
    """An FP16 copy of an FP32 ONNX graph with FP32 I/O (casts at the edges), for strongly typed
    TensorRT 11, which runs exactly the types the graph declares (no FP16 builder flag any more)."""
    try:
        from onnxconverter_common import float16
    except ImportError as exc:
        raise NotAvailableError("FP16 on TensorRT 11 needs an FP16 ONNX graph: pip install onnxconverter-common") from exc
    return float16.convert_float_to_float16(model, keep_io_types=True)
