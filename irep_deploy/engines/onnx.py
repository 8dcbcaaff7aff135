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
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .._io import atomic_write, check_writable, quote, regular_input
from ..checkpoint import Checkpoint, load_checkpoint, multi_branch_model
from ..compare import FUSE_FP32, ONNX_EXPORT, compare
from ..errors import CheckpointError, IrepError, UsageError, VerificationError, first_line
from ..fusecheck import failure_text
from ..precision import exact_fp32
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
# torch 2.0 prints this summary to stdout after every export, even when it has nothing to report.
_EMPTY_DIAGNOSTICS = re.compile(r"=+ Diagnostic Run torch\.onnx\.export version [^\n]*\n"
                                r"verbose: [^\n]*\n=+ 0 NONE 0 NOTE 0 WARNING 0 ERROR =+\n\n?")


def require_onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise IrepError("onnx is not installed (pip install 'irep-deploy[onnx]')") from exc
    return onnx


@dataclass
class Check:
    batch: int
    max_abs_error: float
    rel_error: float


@dataclass
class ExportReport:
    out: str
    opset: int
    simplifier: str
    dynamic_batch: bool
    input_shape: Tuple[int, ...]  # batch dimension is the export batch (1 when dynamic)
    input_name: str
    output_name: str
    tolerance: float
    checks: List[Check] = field(default_factory=list)
    op_types: Dict[str, int] = field(default_factory=dict)
    fused_here: bool = False  # the input was a multi-branch checkpoint fused by this export
    size_bytes: int = 0


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
        check = compare(net(x), plain(x), FUSE_FP32.but(max_rel_error=tolerance))
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


def export_module(model: nn.Module, input_shape: Sequence[int], opset: int = DEFAULT_OPSET,
                  dynamic_batch: bool = True, input_name: str = "input", output_name: str = "logits") -> Any:
    """Export ``model`` (eval mode, on CPU) with the legacy exporter; returns the ``onnx.ModelProto``."""
    onnx = require_onnx()
    x = torch.zeros(*input_shape)
    buffer = io.BytesIO()
    axes = {input_name: {0: "batch"}, output_name: {0: "batch"}} if dynamic_batch else None
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
            torch.onnx.export(model.eval(), (x,), buffer, opset_version=opset, input_names=[input_name],
                              output_names=[output_name], dynamic_axes=axes, do_constant_folding=True,
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
                raise IrepError("--simplify {} was asked for but {} is not installed (pip install {})".format(
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


def load_onnx(path: PathLike) -> Any:
    """Read an .onnx file; a missing or unparsable file is an IrepError naming it."""
    onnx = require_onnx()
    p = Path(path)
    regular_input(p, "an ONNX model")
    if not p.is_file():
        raise IrepError("{}: no such file".format(path))
    try:
        model = onnx.load(str(p))
    except Exception as exc:  # DecodeError and friends
        raise IrepError("{}: not a readable ONNX model ({})".format(path, type(exc).__name__)) from exc
    check_loaded(model, path)
    return model


def check_loaded(model: Any, path: PathLike) -> None:
    """What bench and build-trt assume of a model: a graph with one float image input and finite weights."""
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    if not graph.node or not graph.output:
        raise IrepError("{}: not an ONNX model (empty, or a graph without nodes or outputs)".format(path))
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise IrepError("{}: expected one input and one output, the model has {} and {}".format(
            path, len(inputs), len(graph.output)))
    elem = inputs[0].type.tensor_type.elem_type
    if elem not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        raise IrepError("{}: input {} is {}, not a float image tensor".format(
            path, quote(inputs[0].name), TensorProto.DataType.Name(elem)))
    for init in graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise IrepError("{}: weight {} holds NaN or inf values".format(path, quote(init.name)))


def io_spec(model: Any) -> Tuple[str, str, List[Union[int, str]]]:
    """(input name, output name, input dims with symbolic names as strings) of a single-I/O model."""
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise IrepError("expected one input and one output, the model has {} and {}".format(
            len(inputs), len(graph.output)))
    dims = [d.dim_param if d.dim_param else int(d.dim_value)
            for d in inputs[0].type.tensor_type.shape.dim]
    return inputs[0].name, graph.output[0].name, dims


def verify(model: nn.Module, onnx_bytes: bytes, input_shape: Sequence[int], batches: Sequence[int],
           tolerance: float, seed: int = 0, source: str = "<onnx model>") -> List[Check]:
    """Compare onnxruntime (CPU) with torch on seeded random batches; beyond ``tolerance`` is an error.

    torch runs in true float32 (TF32 off, should the model be on a GPU): the tolerance assumes it."""
    session = ort_helpers.make_session(onnx_bytes, source=source)
    gen = torch.Generator().manual_seed(seed)
    checks = []
    for b in batches:
        x = torch.randn(b, *input_shape[1:], generator=gen)
        with torch.no_grad(), exact_fp32():
            reference = model(x)
        got = torch.from_numpy(np.asarray(ort_helpers.run(session, x.numpy())))
        check = compare(reference, got, ONNX_EXPORT.but(max_rel_error=tolerance))
        checks.append(Check(b, check.max_abs_error, check.rel_error))
        if not check.passed:
            raise VerificationError("{}: onnxruntime output differs from torch at batch {}: {}; nothing written".format(
                source, b, "; ".join(check.failures)))
    return checks


# -- the step ----------------------------------------------------------------------------------------
def default_onnx_path(ckpt: PathLike) -> Path:
    return Path(ckpt).with_suffix(".onnx")


def export(ckpt: PathLike, out: Optional[PathLike] = None, arch: Optional[PathLike] = None,
           opset: int = DEFAULT_OPSET, input_size: Optional[int] = None, batch: Optional[int] = None,
           simplify: str = "auto", verify_batch: int = 4, tolerance: float = ONNX_EXPORT.max_rel_error, seed: int = 0,
           input_name: str = "input", output_name: str = "logits",
           model: Union[str, nn.Module, None] = None, trust_pickle: bool = False) -> ExportReport:
    """Export a deploy checkpoint (or a multi-branch one, fused first under ``arch``) to ONNX.
    ``model`` names the network of a checkpoint that is not built in (a model spec or the user's module).
    ``trust_pickle``: read an old pickle-format checkpoint on torch < 2.10 too.

    ``batch=None`` makes the batch axis dynamic and checks batch 1 and ``verify_batch``; a fixed
    ``batch`` exports and checks that size only. Nothing is written unless every check passes.
    """
    out = Path(out) if out is not None else default_onnx_path(ckpt)
    check_writable(out, inputs=(ckpt, arch))
    if simplify not in SIMPLIFIERS:
        raise UsageError("unknown simplifier {!r} (choose from {})".format(simplify, ", ".join(SIMPLIFIERS)))
    top = max_opset()
    if not MIN_OPSET <= opset <= top:
        raise UsageError("opset {} is outside what this torch exports ({}-{}; TensorRT 8.5 reads up to {})".format(
            opset, MIN_OPSET, top, DEFAULT_OPSET))
    if batch is not None and batch < 1:
        raise UsageError("batch must be at least 1, got {}".format(batch))
    if input_size is not None and input_size < 1:
        raise UsageError("input size must be at least 1, got {}".format(input_size))
    if verify_batch < 2:
        raise UsageError("verify batch must be at least 2 (batch 1 is always checked), got {}".format(verify_batch))
    if input_name == output_name:
        raise UsageError("input and output names must differ (both {!r})".format(input_name))
    require_onnx()
    ort_helpers.require_onnxruntime()
    net, checkpoint, fused_here = load_deploy_model(ckpt, arch, model=model, trust_pickle=trust_pickle)
    size = input_size or checkpoint.header["input_size"]
    shape = (batch or 1, checkpoint.header["in_channels"], size, size)
    largest = batch or verify_batch
    require_input_memory(net, largest, shape[1], size, None if input_size else checkpoint.header["input_size"],
                         str(ckpt), "the verification batch",
                         size_flags("--batch" if batch else "--verify-batch", largest, input_size))
    _check_runs(net, shape, ckpt)
    proto = export_module(net, shape, opset, batch is None, input_name, output_name)
    proto, used = simplify_model(proto, simplify)
    check_model(proto, str(out))
    if proto.ByteSize() > _MAX_PROTO_BYTES:
        raise IrepError("{}: the model is larger than 2 GiB, which a single ONNX file cannot hold".format(ckpt))
    data = proto.SerializeToString()
    batches = [batch] if batch is not None else [1, verify_batch]
    checks = verify(net, data, shape, batches, tolerance, seed, source=str(out))
    with atomic_write(out, "wb") as handle:
        handle.write(data)
    return ExportReport(str(out), opset, used, batch is None, shape, input_name, output_name, tolerance,
                        checks, op_types(proto), fused_here, len(data))


def _check_runs(model: nn.Module, shape: Sequence[int], source: PathLike) -> None:
    """A too-small input fails deep inside a pool or conv; say so in one line instead."""
    try:
        with torch.no_grad():
            model(torch.zeros(*shape))
    except RuntimeError as exc:
        raise IrepError("{}: the model does not run on input {}: {}".format(
            source, "x".join(map(str, shape)), first_line(exc, 160))) from exc


def convert_fp16(model: Any) -> Any:
    """An FP16 copy of an FP32 ONNX graph with FP32 I/O (casts at the edges), for strongly typed
    TensorRT 11, which runs exactly the types the graph declares (no FP16 builder flag any more)."""
    try:
        from onnxconverter_common import float16
    except ImportError as exc:
        raise IrepError("FP16 on TensorRT 11 needs an FP16 ONNX graph: pip install onnxconverter-common") from exc
    return float16.convert_float_to_float16(model, keep_io_types=True)
