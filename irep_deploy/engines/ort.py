"""onnxruntime sessions: creation with a clear error, provider choice, running on numpy arrays."""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np

from .._io import regular_input
from ..errors import IrepError, NotAvailableError, UsageError, first_line

# Preferred order when "all installed" providers are asked for; unknown ones keep their own order.
_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def require_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise NotAvailableError("onnxruntime is not installed (pip install 'irep-deploy[onnx]')") from exc
    return onnxruntime


def available_providers() -> List[str]:
    """Execution providers of the installed onnxruntime that run models (Azure is a remote one)."""
    ort = require_onnxruntime()
    return [p for p in ort.get_available_providers() if p != "AzureExecutionProvider"]


def resolve_providers(providers: Optional[Sequence[str]] = None) -> List[str]:
    """``None`` or ``["cpu"]``: CPU only; ``["all"]``: every installed one, fastest first;
    short names (cpu, cuda, tensorrt) or full provider names otherwise."""
    installed = available_providers()
    if not providers:
        return ["CPUExecutionProvider"]
    if list(providers) == ["all"]:
        return sorted(installed, key=lambda p: _PREFERENCE.index(p) if p in _PREFERENCE else len(_PREFERENCE))
    out = []
    for name in providers:
        full = name if name.endswith("ExecutionProvider") else {
            "cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
            "tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider"}.get(name.lower(), name)
        if full not in installed:
            # a provider onnxruntime knows but this install lacks (onnxruntime-gpu, TensorRT): the machine's
            # limit (4); a name onnxruntime does not know: a typo (2)
            known = full in require_onnxruntime().get_all_providers()
            raise (NotAvailableError if known else UsageError)("onnxruntime provider {} is {} (installed: {})".format(
                name, "not available here" if known else "unknown", ", ".join(installed)))
        out.append(full)
    return out


def make_session(model: Union[str, bytes], providers: Optional[Sequence[str]] = None,
                 threads: Optional[int] = None, source: Optional[str] = None) -> Any:
    """An InferenceSession on a path or serialized model; a model onnxruntime rejects is an IrepError."""
    if isinstance(model, str):
        regular_input(model, "an ONNX model")
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: warnings about unused initializers are noise here
    if threads:
        options.intra_op_num_threads = int(threads)
    name = source or (model if isinstance(model, str) else "<onnx model>")
    try:
        return ort.InferenceSession(model, sess_options=options, providers=resolve_providers(providers))
    except IrepError:
        raise
    except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        raise IrepError("{}: onnxruntime cannot load it: {}".format(name, first_line(exc))) from exc


def run(session: Any, x: np.ndarray) -> np.ndarray:
    """Run a single-input single-output session."""
    inp = session.get_inputs()[0].name
    return session.run(None, {inp: x})[0]


def providers_in_use(session: Any, requested: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(providers the session really runs, requested ones it does not): onnxruntime drops a provider
    that fails to load (e.g. CUDA without matching cuDNN) with at most a log line, so only
    ``session.get_providers()`` says what runs."""
    running = list(session.get_providers())
    return running, [p for p in requested if p not in running]


def run_errors() -> Tuple[type, ...]:
    """onnxruntime's own exception types (Fail, InvalidArgument, RuntimeException, EPFail, ...): they
    derive from Exception, not RuntimeError, so callers that turn failures into one line name them."""
    require_onnxruntime()
    from onnxruntime.capi import onnxruntime_pybind11_state as state
    return tuple(t for t in vars(state).values() if isinstance(t, type) and issubclass(t, Exception))
