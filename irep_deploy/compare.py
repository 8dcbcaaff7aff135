"""One comparator for every output check: fused vs multi-branch, onnxruntime vs torch, TensorRT vs
onnxruntime, INT8 vs FP32.

``compare(reference, candidate, tolerance)`` measures the two outputs the same way wherever it is
called (in float64, whatever the inputs' dtype or device) and returns a :class:`Comparison`: the
measures, the limits that were not met, ``passed`` and a one-line ``summary``. The callers decide what
a failure means (a :class:`~irep_deploy.errors.VerificationError` naming their file, a number in a
report). Polygraphy's comparator has the same shape: one function, per-check tolerances, a result.

Measures (over all values of the two arrays):

* relative error ``max|a - b| / max|a|`` (``max|a - b|`` when the reference is all zeros);
* cosine similarity of the flattened arrays (1 for two zero arrays, 0 for one);
* top-1 agreement, for outputs with a batch axis (N x ...): the share of rows whose argmax is the same.

NaN or inf on either side fails every check: a verification never passes on outputs it cannot measure.
Imports numpy only, so the CLI's parser and ``engines.quantize`` stay free of torch.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from .errors import VerificationError


@dataclass(frozen=True)
class Tolerance:
    """The limits one kind of check must meet; ``None`` leaves a measure unchecked."""

    name: str
    max_rel_error: Optional[float] = None
    min_cosine: Optional[float] = None
    min_agreement: Optional[float] = None

    def but(self, **limits: Optional[float]) -> "Tolerance":
        """This tolerance with some limits given by the user (``None`` keeps the named value)."""
        return dataclasses.replace(self, **{k: v for k, v in limits.items() if v is not None})


# The named tolerances. Each is far from what a real fault produces (a BN left unfused, a wrong
# branch, a dropped layer move logits by 1e-2 or more, and a broken INT8 scale collapses the cosine)
# and far enough above what correct arithmetic produces that no seed or batch trips it.
#
# fuse: fused vs multi-branch on one seeded random batch in true float32 (TF32 off). The fused conv
#   adds the same products in another order: rounding of float32 (eps 1.2e-7) through a network's
#   depth stays around 1e-7..1e-6 (README: 3.7e-07), so 1e-5 leaves a 10x margin.
FUSE_FP32 = Tolerance("fuse-fp32", max_rel_error=1e-5)
# fuse, evaluated: the same pair over a whole test set of real images (the worst batch), where larger
#   activations and hundreds of batches accumulate more rounding (docs/training.md measures 5e-7).
FUSE_EVAL = Tolerance("fuse-eval", max_rel_error=1e-4)
# fuse, whole output (``fuse_model``'s check, after every fused layer met fuse-fp32): modules the fusion
#   did not touch may amplify the layers' float32 rounding (a detector's softmax scores and box decoding:
#   3.5e-4 measured on tests/test_detection.py's Faster R-CNN); a fault outside the fused layers (a BN
#   folded into a weight another conv shares: 7e-2) is far above 1e-3.
FUSE_OUTPUT = Tolerance("fuse-output", max_rel_error=1e-3)
# fuse, each fused layer (``fuse_model``'s check, which names the first layer that departs): a layer deep
#   in a network carries the rounding of every fused layer before it; with trained-like BN statistics
#   that reaches 1.2e-5 to 1.4e-5 by ResNet-50's last stages (timm resnet50d, retinanet_resnet50_fpn's
#   body: tests/networks.py), while a wrong fusion moves the layer it happens in by 1e-2 or more.
FUSE_LAYER = Tolerance("fuse-layer", max_rel_error=1e-4)
# onnx export: onnxruntime's CPU kernels (MLAS, other conv algorithms, folded constants) vs torch's;
#   both float32, but the summation order differs in every layer: 1e-4.
ONNX_EXPORT = Tolerance("onnx-export", max_rel_error=1e-4)
# TensorRT FP32 vs onnxruntime: TensorRT times and picks its own tactics (Winograd, FFT-like, split-K
#   kernels) and may fuse layers, which rounds differently again: 1e-3.
TRT_FP32 = Tolerance("tensorrt-fp32", max_rel_error=1e-3)
# TensorRT FP16 vs onnxruntime FP32: FP16 keeps 11 significant bits (eps 1e-3 per op), so a relative
#   error says little; the direction of the logit vector is what must survive: cosine 0.999.
TRT_FP16 = Tolerance("tensorrt-fp16", min_cosine=0.999)
# INT8 vs FP32 on one calibration batch (``quantize``): 8-bit scales put noise of about 1/254 of each
#   tensor's range on every layer; cosine 0.99 (looser than FP16's 0.999). Top-1 agreement over one
#   batch of 32 images moves by 3% per image, so it is reported, not checked.
INT8_CALIB = Tolerance("int8-calibration-batch", min_cosine=0.99)
# INT8 engine vs onnxruntime on real test images (``build-trt --int8 --verify``): cosine as above,
#   and at least 95% of the images keep their top-1 class (measured on 256 or more images).
INT8_REAL = Tolerance("int8-real-images", min_cosine=0.99, min_agreement=0.95)

TOLERANCES: Dict[str, Tolerance] = {t.name: t for t in (FUSE_FP32, FUSE_EVAL, FUSE_OUTPUT, ONNX_EXPORT, TRT_FP32,
                                                        TRT_FP16, INT8_CALIB, INT8_REAL)}


@dataclass(frozen=True)
class Comparison:
    """What ``compare`` measured, and which limits of ``tolerance`` were not met."""

    tolerance: Tolerance
    shape: Tuple[int, ...]
    max_abs_error: float
    rel_error: float
    cosine: float
    top1_agreement: Optional[float]  # None when the outputs have no batch axis
    top1_differ: Optional[int]
    finite: bool
    failures: Tuple[str, ...]  # one phrase per limit not met, e.g. "relative error 0.002 > tolerance 1e-05"

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def examples(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def summary(self) -> str:
        """One line: the measures, then PASSED or FAILED with the limits not met."""
        text = "max abs error {:.3g}, relative error {:.3g}, cosine {:.6f}".format(
            self.max_abs_error, self.rel_error, self.cosine)
        if self.top1_agreement is not None:
            text += ", top-1 agreement {:.2%} ({} of {} differ)".format(
                self.top1_agreement, self.top1_differ, self.examples)
        return text + (": passed" if self.passed else ": FAILED ({})".format("; ".join(self.failures)))

    def as_dict(self) -> Dict[str, float]:
        """The measures as plain numbers (report and JSON fields)."""
        out = {"max_abs_error": self.max_abs_error, "rel_error": self.rel_error, "cosine": self.cosine,
               "examples": float(self.examples)}
        if self.top1_agreement is not None:
            out.update(top1_agreement=self.top1_agreement, top1_differ=float(self.top1_differ or 0))
        return out


def compare(reference: Any, candidate: Any, tolerance: Union[Tolerance, float, None] = None) -> Comparison:
    """Measure ``candidate`` against ``reference`` (numpy arrays or torch tensors of the same shape).

    ``tolerance``: a :class:`Tolerance`, a float (a relative-error limit), or None (measure only; only
    NaN/inf fails). Outputs of different shapes cannot be compared: a VerificationError.
    """
    limits = tolerance if isinstance(tolerance, Tolerance) else Tolerance("relative error", max_rel_error=tolerance)
    ref, got = _as_float64(reference), _as_float64(candidate)
    if ref.shape != got.shape:
        raise VerificationError("outputs differ in shape: {} vs {}".format(ref.shape, got.shape))
    finite = bool(np.isfinite(ref).all() and np.isfinite(got).all())
    if ref.size == 0:
        max_abs, rel, cos = 0.0, 0.0, 1.0
    else:
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf give NaN measures, and fail below
            max_abs = float(np.abs(ref - got).max())
            rel = max_abs / (float(np.abs(ref).max()) or 1.0)
            cos = _cosine(ref.ravel(), got.ravel())
    agreement, differ = None, None
    if ref.ndim >= 2 and ref.shape[0] > 0:
        same = ref.reshape(len(ref), -1).argmax(1) == got.reshape(len(got), -1).argmax(1)
        differ = int(len(same) - same.sum())
        agreement = float(same.mean())
    failures = []
    if not finite:
        failures.append("NaN or inf in the {}".format("reference" if not np.isfinite(ref).all() else "output"))
    else:
        if limits.max_rel_error is not None and not rel <= limits.max_rel_error:
            failures.append("relative error {:.3g} > tolerance {:.3g}".format(rel, limits.max_rel_error))
        if limits.min_cosine is not None and not cos >= limits.min_cosine:
            failures.append("cosine {} < {}".format(_digits_below(cos, limits.min_cosine), limits.min_cosine))
        if limits.min_agreement is not None:
            if agreement is None:
                raise ValueError("tolerance {} checks top-1 agreement: the outputs need a batch axis, got shape {}".format(
                    limits.name, ref.shape))
            if not agreement >= limits.min_agreement:
                failures.append("top-1 agreement {:.2%} < {:.2%} ({} of {} differ)".format(
                    agreement, limits.min_agreement, differ, len(ref)))
    return Comparison(limits, tuple(ref.shape), max_abs, rel, cos, agreement, differ, finite, tuple(failures))


def compare_outputs(reference: Any, candidate: Any, tolerance: Union[Tolerance, float, None] = None) -> Comparison:
    """:func:`compare` of two whole model outputs: a tensor each, or tuples/lists/dicts of them (a
    detector body's dict of feature maps, a detection head's tensor and list), nested or not.

    Each tensor is measured against its counterpart on its own, so a small output (class scores) is not
    judged against the range of a large one (boxes in pixels). Returns the comparison of the output
    with the largest relative error, carrying the failures of every output, each named by its path
    (``output 'pool': relative error ...``). Outputs of different structure are a VerificationError."""
    refs, gots = output_leaves(reference), output_leaves(candidate)
    if [p for p, _ in refs] != [p for p, _ in gots]:
        raise VerificationError("outputs differ in structure: {} vs {}".format(
            ", ".join(p or "tensor" for p, _ in refs), ", ".join(p or "tensor" for p, _ in gots)))
    if len(refs) == 1:
        return compare(refs[0][1], gots[0][1], tolerance)
    results = []
    for (path, ref), (_, got) in zip(refs, gots):
        try:
            results.append((path, compare(ref, got, tolerance)))
        except VerificationError as exc:
            raise VerificationError("output {!r}: {}".format(path, exc)) from exc
    # a NaN measure (an output that is not finite) counts as the worst
    worst = max(results, key=lambda r: r[1].rel_error if r[1].rel_error == r[1].rel_error else float("inf"))[1]
    failures = tuple("output {!r}: {}".format(path, f) for path, c in results for f in c.failures)
    return dataclasses.replace(worst, failures=failures)


def output_leaves(x: Any, path: str = "") -> List[Tuple[str, Any]]:
    """The arrays of a (nested) tuple/list/dict output with their paths (``'pool'``, ``'1.0'``), in order."""
    if isinstance(x, Mapping):
        items = [(str(k), v) for k, v in x.items()]
    elif isinstance(x, (tuple, list)):
        items = [(str(i), v) for i, v in enumerate(x)]
    else:
        return [(path, x)]
    return [leaf for key, value in items for leaf in output_leaves(value, path + "." + key if path else key)]


def _as_float64(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor (any dtype, any device); torch itself is not imported here
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    if np.array_equal(a, b):
        return 1.0  # exactly: rounding of the norms would give 0.9999999999999999 for identical outputs
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    if not denom:
        return 0.0  # one zero vector has no direction to share
    return float(np.clip(np.dot(a, b) / denom, -1.0, 1.0))


def _digits_below(value: float, limit: float) -> str:
    """``value`` with 6 decimals, or as many more as it takes not to print as ``limit`` (0.99999996 < 1)."""
    for places in range(6, 18):
        text = "{:.{}f}".format(value, places)
        if float(text) < limit:
            return text
    return repr(value)
