"""INT8 post-training quantization of an FP32 ONNX model into the QDQ form TensorRT builds from.

``quantize`` is the library side of ``irep-deploy quantize``: onnxruntime's ``quantize_static`` with
QuantizeLinear/DequantizeLinear pairs (explicit quantization), symmetric INT8 activations and weights
(zero point 0: TensorRT's INT8 is symmetric), per-channel weight scales on the output axis (per-tensor on request),
calibrated on real images of a dataset's training split through the evaluation transforms (what
``eval`` feeds). The result is checked with onnxruntime against the FP32 model on a calibration batch
and written atomically with its settings in the file's ``metadata_props``.

Importing this module loads no torch (the CLI's parser reads its constants); the work imports it.
"""
from __future__ import annotations

import contextlib
import fnmatch
import importlib.util
import inspect
import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import __version__
from .._io import atomic_write, check_writable, quote
from ..compare import INT8_CALIB, compare
from ..errors import IrepError, NotAvailableError, VerificationError, first_line
from ..progress import bar
from . import ort as ort_helpers

PathLike = Union[str, "os.PathLike[str]"]

METHODS = ("minmax", "entropy", "percentile")
# Fewer images than this give activation ranges from a handful of samples (and one batch at most);
# the CLI refuses them as a usage error, the library as an IrepError.
MIN_CALIB_IMAGES = 32
CALIB_BATCH = 32  # images per calibration batch of a dynamic-batch model
# Entropy calibration's histogram: onnxruntime's quantize_static keeps 128 bins and 128 quantized bins,
# which leaves one candidate threshold (the full range: minmax under another name). These give the
# KL search TensorRT's resolution: 1024 bins a side and the 255 levels of symmetric INT8.
ENTROPY_BINS = 2048
ENTROPY_QUANTIZED_BINS = 255
DEFAULT_MIN_COSINE = INT8_CALIB.min_cosine
META_PREFIX = "irep_deploy.quantize."


@dataclass
class QuantizeReport:
    out: str
    method: str
    per_channel: bool
    calib_dataset: str
    calib_size: int
    excluded: List[str]
    cosine: float  # INT8 vs FP32 logits on the first calibration batch
    agreement: float  # fraction of that batch whose top-1 class is the same
    check_batch: int
    op_types: Dict[str, int] = field(default_factory=dict)
    metadata: Dict[str, str] = field(default_factory=dict)
    size_bytes: int = 0


def weight_scales(per_channel: bool) -> str:
    """How the weights are scaled, as reports and metadata readers name it."""
    return "per-channel" if per_channel else "per-tensor"


def default_int8_path(model: PathLike) -> Path:
    p = Path(model)
    return p.with_name(p.stem + ".int8.onnx")


def quantized_ops(model: Any) -> Dict[str, int]:
    from .onnx import op_types
    from .onnx_eval import QUANT_OPS
    return {op: n for op, n in op_types(model).items() if op in QUANT_OPS}


def match_nodes(model: Any, patterns: Sequence[str], path: PathLike) -> List[str]:
    """Node names matching any fnmatch pattern; a pattern that matches nothing is refused (a typo
    would otherwise quantize the layer the user meant to keep)."""
    names = [n.name for n in model.graph.node]
    out: List[str] = []
    for pattern in patterns:
        hit = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hit:
            example = next((n for n in names if n), "")
            raise IrepError("{}: --exclude {} matches no node (node names look like {})".format(
                path, quote(pattern), quote(example)))
        out.extend(n for n in hit if n not in out)
    return out


class CalibReader:
    """An onnxruntime CalibrationDataReader (duck-typed: ``get_next``) over prepared batches;
    ``progress_bar`` (optional) counts the batches onnxruntime has taken."""

    def __init__(self, name: str, data: Sequence[np.ndarray], progress_bar: Any = None) -> None:
        self.name = name
        self.data = list(data)
        self.index = 0
        self.progress_bar = progress_bar

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        if self.progress_bar is not None and self.progress_bar.n < self.index:  # the batches handed out are run
            self.progress_bar.update(self.index - self.progress_bar.n)
        if self.index >= len(self.data):
            return None
        self.index += 1
        return {self.name: self.data[self.index - 1]}

    def rewind(self) -> None:  # onnxruntime >= 1.16 may call it between passes
        self.index = 0
        if self.progress_bar is not None:
            self.progress_bar.reset()


def _calibration_batches(inp: Any, calib: str, size: int, data_root: Optional[str], calib_size: int,
                         path: PathLike) -> List[np.ndarray]:
    """``calib_size`` training images (the seeded subset ``build-trt --int8`` and ``bench --int8``
    calibrate on) as the model's input batches; a short last batch is kept (dynamic batch only: a
    fixed batch divides ``calib_size``, checked before), so every requested image counts."""
    from .int8 import calibration_images
    images = calibration_images(calib, (inp.channels, size, size), calib_size, data_root, source=str(path))
    step = inp.batch or CALIB_BATCH
    return [images[i:i + step] for i in range(0, len(images), step)]


def _check_settings(path: PathLike, method: str, calib_size: int, batch: Optional[int]) -> None:
    if method not in METHODS:
        raise IrepError("unknown calibration method {!r} (choose from {})".format(method, ", ".join(METHODS)))
    if method == "entropy" and importlib.util.find_spec("scipy") is None:
        raise NotAvailableError("--method entropy needs scipy (onnxruntime's entropy calibration imports it): pip install scipy")
    if calib_size < MIN_CALIB_IMAGES:
        raise IrepError("--calib-size {} is too small: calibrate on at least {} images".format(
            calib_size, MIN_CALIB_IMAGES))
    if batch and calib_size % batch:
        raise IrepError("{}: --calib-size {} is not a multiple of the model's fixed batch {}".format(
            path, calib_size, batch))


def _without_zero_spike(hist: np.ndarray) -> np.ndarray:
    """The histogram with its zero bin no higher than its neighbours: after a ReLU most values are
    exactly 0, and left in, that one bin dominates the KL divergence and drives every threshold to the
    smallest candidate (cosine 0.80 on a ResNet-18); TensorRT's calibrators leave the spike out too."""
    hist = np.array(hist, copy=True)
    zero = hist.size // 2  # onnxruntime's histograms are symmetric about 0: this bin starts at 0
    if 0 < zero < hist.size - 1:
        hist[zero] = min(hist[zero], max(hist[zero - 1], hist[zero + 1]))
    return hist


def _unless_degenerate(chosen: Tuple[Any, Any], histogram: Any, quantized_bins: int) -> Tuple[Any, Any]:
    """The KL threshold, or the full range when the search ended on its smallest candidate: then a spike
    of values far below the maximum decided it, not a tail of outliers. Fashion-MNIST's uniform
    background gives the first conv's output such spikes; clipped to 1/8 of its range, that one tensor
    cost a VGG-16 11.4 points of top-1 (with its minmax range: 0.04)."""
    edges = histogram[1]  # one more than the bins; onnxruntime's candidates end at edges[zero + i + 1]
    smallest = edges[min(len(histogram[0]) // 2 + quantized_bins // 2 + 1, len(edges) - 1)]
    full = (histogram[2], histogram[3]) if len(histogram) >= 4 else (edges[0], edges[-1])
    return full if chosen[1] <= smallest < full[1] else chosen


def first_conv_outputs(proto: Any) -> List[str]:
    """The outputs of the convolutions nearest the graph's input (no Conv between them and the input),
    and of a Relu/Clip right after each: the tensors shaped by the images themselves."""
    consumers: Dict[str, List[Any]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    weights = {i.name for i in proto.graph.initializer}
    frontier = [i.name for i in proto.graph.input if i.name not in weights]
    seen, found = set(frontier), []
    while frontier:
        for node in consumers.get(frontier.pop(0), []):
            if node.op_type == "Conv":
                found.append(node.output[0])
                after = consumers.get(node.output[0], [])
                if len(after) == 1 and after[0].op_type in ("Relu", "Clip"):
                    found.append(after[0].output[0])
                continue
            for name in node.output:
                if name not in seen:
                    seen.add(name)
                    frontier.append(name)
    return sorted(set(found))


@contextlib.contextmanager
def _entropy_histogram(full_range: Sequence[str] = (), num_bins: int = ENTROPY_BINS,
                       num_quantized_bins: int = ENTROPY_QUANTIZED_BINS) -> Any:
    """onnxruntime's entropy calibration with ``num_bins``/``num_quantized_bins``, without the zero
    spike, and with the tensors ``full_range`` kept at their whole calibration range. The first
    convolution's output holds one spike per channel for a uniform background (Fashion-MNIST's), not
    the smooth distribution the KL search assumes; clipped at 37 % of its range it cost the networks
    with every branch 1.3-1.8 points of top-1 (0.15 with that one tensor at its range). quantize_static
    has no option for any of this (onnxruntime 1.15 to 1.2x), so its module-level ``create_calibrator``
    and the histogram collector's threshold search are wrapped for the call."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import HistogramCollector

    # the module, not the package's ``quantize`` function of the same name
    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")
    create, threshold = ort_quantize.create_calibrator, HistogramCollector.get_entropy_threshold
    entropy = HistogramCollector.compute_entropy

    def create_calibrator(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("calibrate_method") == CalibrationMethod.Entropy:
            options = dict(kwargs.get("extra_options") or {})
            options.setdefault("num_bins", num_bins)
            options.setdefault("num_quantized_bins", num_quantized_bins)
            kwargs["extra_options"] = options
        return create(*args, **kwargs)

    def get_entropy_threshold(self: Any, histogram: Any, quantized_bins: int) -> Any:
        hist = _without_zero_spike(histogram[0])
        return _unless_degenerate(threshold(self, (hist,) + tuple(histogram[1:]), quantized_bins), histogram,
                                  quantized_bins)

    def compute_entropy(self: Any) -> Any:
        thresholds = entropy(self)
        for name in set(full_range) & set(thresholds):
            histogram = self.histogram_dict[name]  # (hist, edges, min, max)
            thresholds[name] = (histogram[2], histogram[3]) + tuple(thresholds[name][2:])
        return thresholds

    ort_quantize.create_calibrator = create_calibrator
    HistogramCollector.get_entropy_threshold = get_entropy_threshold
    HistogramCollector.compute_entropy = compute_entropy
    try:
        yield
    finally:
        ort_quantize.create_calibrator = create
        HistogramCollector.get_entropy_threshold = threshold
        HistogramCollector.compute_entropy = entropy


def ort_quantize_qdq(src: Path, dst: Path, reader: CalibReader, method: str, per_channel: bool,
                  excluded: List[str], tmp: Path) -> None:
    """onnxruntime's quantize_static in the form TensorRT reads (shared by ``quantize`` and ``bench --int8``)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # Shape inference as onnxruntime recommends before quantizing; its graph optimisation is skipped
    # so that node names stay those of the FP32 file (--exclude patterns and the metadata name them).
    pre = tmp / "preprocessed.onnx"
    quant_pre_process(str(src), str(pre), skip_optimization=True)
    kwargs: Dict[str, Any] = {}
    if "optimize_model" in inspect.signature(quantize_static).parameters:
        kwargs["optimize_model"] = False  # onnxruntime 1.15: on by default; it could rename or fuse nodes
    # quantize_static prints its calibration progress with print(); the CLI prints its own summary.
    if method == "entropy":
        import onnx

        bins: Any = _entropy_histogram(first_conv_outputs(onnx.load(str(src), load_external_data=False)))
    else:
        bins = contextlib.nullcontext()
    with contextlib.redirect_stdout(io.StringIO()), bins, _quiet_ort_warnings():
        quantize_static(
            str(pre), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
            calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                              "percentile": CalibrationMethod.Percentile}[method],
            # Symmetric INT8 (zero point 0) is what TensorRT's explicit quantization runs; biases stay
            # FP32 (TensorRT quantizes them itself and takes INT8 Q/DQ tensors, not INT32).
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
            **kwargs)


class _DropOrtWarnings(logging.Filter):
    """Drops onnxruntime's warnings logged on the root logger ("Expected bias ... initializer" for every
    FP32 bias we keep on purpose): they would break the one line an error gets and bury the summary."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or "onnxruntime" not in record.pathname


@contextlib.contextmanager
def _quiet_ort_warnings() -> Iterator[None]:
    drop = _DropOrtWarnings()
    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def quantize(model: PathLike, calib: str, out: Optional[PathLike] = None, data_root: Optional[str] = None,
             calib_size: int = 512, method: str = "minmax", per_channel: bool = True,
             exclude: Sequence[str] = (), min_cosine: Optional[float] = DEFAULT_MIN_COSINE,
             progress: bool = True) -> QuantizeReport:
    """Quantize an FP32 ONNX model to a QDQ INT8 one, calibrated on ``calib_size`` training images of
    the dataset ``calib``. Nothing is written unless the INT8 model loads in onnxruntime and its logits
    on the first calibration batch have cosine similarity >= ``min_cosine`` with the FP32 model's.
    ``progress``: a bar on stderr counting the calibration batches onnxruntime has run."""
    from .onnx import _MAX_PROTO_BYTES, load_onnx, op_types, require_onnx
    from .onnx_eval import check_fits, image_input, run_batch
    from .tensorrt import sha256_file

    out = Path(out) if out is not None else default_int8_path(model)
    check_writable(out, inputs=(model,))
    onnx = require_onnx()
    ort = ort_helpers.require_onnxruntime()
    proto = load_onnx(model)
    done = quantized_ops(proto)
    if done:
        raise IrepError("{}: already quantized ({}); quantize the FP32 model it was made from".format(
            model, ", ".join("{} {}".format(n, op) for op, n in sorted(done.items()))))
    inp = image_input(proto, model)
    _check_settings(model, method, calib_size, inp.batch)
    size = check_fits(inp, calib, model, flag="--calib")
    excluded = match_nodes(proto, exclude, model)
    if inp.batch:  # a dynamic batch is calibrated in batches of at most CALIB_BATCH
        from ..resources import require_memory
        require_memory((inp.batch, inp.channels, size, size), None, "a calibration batch",
                       "{}: its fixed batch {}".format(model, inp.batch))
    data = _calibration_batches(inp, calib, size, data_root, calib_size, model)
    fp32 = ort_helpers.make_session(str(model), source=str(model))
    with tempfile.TemporaryDirectory(prefix="irep-quantize.") as tmp:
        dst = Path(tmp) / "int8.onnx"
        try:
            with bar(total=len(data), desc="quantize: calibrating", enabled=progress, unit="batch") as calibrated:
                ort_quantize_qdq(Path(model), dst, CalibReader(inp.name, data, calibrated), method, per_channel,
                                 excluded, Path(tmp))
        except (ValueError, RuntimeError) + ort_helpers.run_errors() as exc:
            raise IrepError("{}: onnxruntime could not quantize it: {}".format(model, first_line(exc))) from exc
        qproto = onnx.load(str(dst))
    meta = {"method": method, "per_channel": json.dumps(per_channel), "format": "QDQ",
            "symmetric": "activations and weights (int8, zero point 0)",
            "calib_dataset": calib, "calib_split": "train", "calib_size": str(calib_size),
            "excluded_nodes": json.dumps(excluded), "source_sha256": sha256_file(model),
            "source": Path(model).name, "onnxruntime": ort.__version__, "irep_deploy": __version__}
    keep = [p for p in qproto.metadata_props if not p.key.startswith(META_PREFIX)]
    del qproto.metadata_props[:]
    qproto.metadata_props.extend(keep)
    for key, value in meta.items():
        qproto.metadata_props.add(key=META_PREFIX + key, value=value)
    if qproto.ByteSize() > _MAX_PROTO_BYTES:
        raise IrepError("{}: the quantized model is larger than 2 GiB, which a single ONNX file cannot hold".format(
            model))
    blob = qproto.SerializeToString()
    int8 = ort_helpers.make_session(blob, source=str(out))
    x = data[0]
    want = run_batch(fp32, inp, x, model)
    got = run_batch(int8, inp, x, out)
    check = compare(want, got, INT8_CALIB.but(min_cosine=min_cosine))
    cos, agree = check.cosine, float(check.top1_agreement or 0.0)
    if not check.passed:
        raise VerificationError("{}: INT8 output differs from FP32 on a calibration batch of {}: {} (top-1 agreement "
                                "{:.1%}); nothing written (keep sensitive layers in float with --exclude, or try "
                                "another --method)".format(out, x.shape[0], "; ".join(check.failures), agree))
    with atomic_write(out, "wb") as handle:
        handle.write(blob)
    return QuantizeReport(str(out), method, per_channel, calib, calib_size, excluded, cos, agree, int(x.shape[0]),
                          op_types(qproto), meta, len(blob))
