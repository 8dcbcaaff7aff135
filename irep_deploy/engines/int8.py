"""INT8 helpers shared by ``build-trt --int8`` and ``bench``: real calibration images, recognising a
quantized (QDQ) ONNX graph, a small onnxruntime QDQ quantizer, and the INT8 output check.

Calibration and verification images go through the dataset's evaluation transform (the one ``eval``
uses): scales measured on differently normalised data would be wrong for every real input.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from ..compare import INT8_REAL, Comparison, Tolerance, compare
from ..errors import DataError, IrepError, VerificationError

DEFAULT_CALIB_SIZE = 512


def is_quantized(model: Any) -> bool:
    """True when an ONNX ModelProto holds quantize/dequantize or integer ops."""
    from .onnx_eval import QUANT_OPS

    return any(node.op_type in QUANT_OPS for node in model.graph.node)


def calibration_images(dataset: str, chw: Sequence[int], size: int, data_root: Optional[str] = None,
                       split: str = "train", seed: int = 0, source: str = "<model>") -> np.ndarray:
    """``size`` real images (N x C x H x W float32) of ``dataset`` after its evaluation transform.

    ``train`` (calibration) draws a seeded random subset of the training set; ``test`` (verification)
    a seeded subset of the test set, so that an engine is never checked on the images it was
    calibrated with. Wrong size or channels, or too few images: an IrepError naming ``source``.
    """
    from ..data import channel_adapter, dataset_spec, load_data

    c, h, w = (int(d) for d in chw)
    try:
        spec = dataset_spec(dataset)
        if (h, w) != (spec.input_size, spec.input_size):
            raise IrepError("{}: takes {}x{}x{} input, {} images are {}x{}x{}: calibration data of the wrong "
                            "shape".format(source, c, h, w, dataset, spec.in_channels, spec.input_size,
                                           spec.input_size))
        channel_adapter(dataset, c)  # 3-channel data for a 1-channel model: refused in one line
        data = load_data(dataset, data_root, augment=False, limit=size, parts=(split,), in_channels=c,
                         split_seed=seed)
    except DataError as exc:
        raise IrepError("{}: --calib {}: {}".format(source, dataset, exc)) from exc
    images = data.split(split)
    if len(images) < size:  # type: ignore[arg-type]
        raise IrepError("{}: --calib {} has only {} {} images, --calib-size asks for {}".format(
            source, dataset, len(images), split, size))  # type: ignore[arg-type]
    return torch.stack([images[i][0] for i in range(size)]).numpy().astype(np.float32)


def batches(images: np.ndarray, batch: int) -> Tuple[np.ndarray, ...]:
    """Whole batches of ``batch`` images; a short last batch is dropped (a calibrator's batch is fixed)."""
    return tuple(images[i:i + batch] for i in range(0, len(images) - batch + 1, batch))


def quantize_qdq(onnx_bytes: bytes, images: np.ndarray, per_channel: bool = True, method: str = "minmax",
                 batch: int = 32, source: str = "<onnx>") -> bytes:
    """A QDQ INT8 copy of a float ONNX model, calibrated on ``images``: the quantizer of
    ``irep-deploy quantize`` (:func:`~irep_deploy.engines.quantize.ort_quantize_qdq`) on bytes, for
    ``bench --int8``."""
    import onnx

    from .quantize import METHODS, CalibReader, ort_quantize_qdq

    if method not in METHODS:
        raise IrepError("unknown calibration method {!r} (choose from {})".format(method, ", ".join(METHODS)))
    model = onnx.load_from_string(onnx_bytes)
    if is_quantized(model):
        raise IrepError("{}: is already quantized (it has quantize/dequantize nodes)".format(source))
    reader = CalibReader(model.graph.input[0].name, batches(images, min(batch, len(images))))
    # quantize_static of onnxruntime 1.15 (the Jetson floor) reads and writes files only
    with tempfile.TemporaryDirectory(prefix="irep-int8-") as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(onnx_bytes)
        ort_quantize_qdq(src, dst, reader, method, per_channel, [], Path(tmp))
        return dst.read_bytes()


def check_int8(reference: np.ndarray, got: np.ndarray, tolerance: Tolerance = INT8_REAL,
               what: str = "INT8 engine") -> Comparison:
    """INT8 output against a reference on the same real images (:data:`~irep_deploy.compare.INT8_REAL`:
    cosine similarity of all logits and top-1 agreement); a one-line VerificationError when too far."""
    check = compare(reference, got, tolerance)
    if not check.passed:
        raise VerificationError("{} output differs from onnxruntime on {} real images: {}; nothing written".format(
            what, check.examples, "; ".join(check.failures)))
    return check
