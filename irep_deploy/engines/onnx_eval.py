"""ONNX files on real data: which images fit a model's input, and ``irep-deploy eval`` of an .onnx file.

The images come from :func:`irep_deploy.data.load_data` with the evaluation transforms, exactly as
``eval`` of a checkpoint feeds them (grey images copied into every channel of a 3-channel network);
the model runs on onnxruntime's CPU provider, the one every machine has.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Tuple, Union

import numpy as np

from .._io import quote
from ..data import channel_adapter, dataset_spec, eval_loader, load_data
from ..errors import DataError, IrepError, UsageError, first_line
from ..progress import bar as progress_bar
from ..resources import require_memory
from . import ort as ort_helpers
from .onnx import load_onnx

PathLike = Union[str, "os.PathLike[str]"]

# Op types that only a quantized graph holds (QDQ or QOperator format).
QUANT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                       "MatMulInteger", "DynamicQuantizeLinear", "QLinearAdd", "QGemm"})


@dataclass(frozen=True)
class ImageInput:
    """The single image input of a model: name, fixed batch (None when dynamic), channels, height, width
    (height/width None when symbolic: the dataset's size is then taken)."""

    name: str
    batch: Optional[int]
    channels: int
    height: Optional[int]
    width: Optional[int]


def image_input(model: Any, path: PathLike) -> ImageInput:
    """What a model takes, refused in one line unless it is one FP32 N x C x H x W tensor with a known C."""
    from onnx import TensorProto

    inits = {i.name for i in model.graph.initializer}
    inp = [i for i in model.graph.input if i.name not in inits][0]  # load_onnx checked there is one
    elem = inp.type.tensor_type.elem_type
    if elem != TensorProto.FLOAT:
        raise IrepError("{}: input {} is {}, expected FLOAT (an FP32 model)".format(
            path, quote(inp.name), TensorProto.DataType.Name(elem)))
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise IrepError("{}: input {} has {} dimensions, expected an image batch N x C x H x W".format(
            path, quote(inp.name), len(dims)))
    batch, channels, height, width = dims
    if channels is None:
        raise IrepError("{}: input {} has no fixed channel count".format(path, quote(inp.name)))
    return ImageInput(inp.name, batch, channels, height, width)


def check_fits(spec_input: ImageInput, dataset: str, path: PathLike, flag: str = "--dataset") -> int:
    """Refuse a dataset whose images the model cannot take (channels, size); returns the image size.

    Decided from the dataset's description, before any image is read."""
    try:
        spec = dataset_spec(dataset)
        channel_adapter(dataset, spec_input.channels)
    except DataError as exc:
        raise IrepError("{}: {} {}: {}".format(path, flag, dataset, exc)) from exc
    size = spec.input_size
    for have in (spec_input.height, spec_input.width):
        if have is not None and have != size:
            raise IrepError("{}: the model takes {}x{} images, {} {} gives {}x{} (export at --input-size {} "
                            "or use matching data)".format(
                                path, spec_input.height, spec_input.width, flag, dataset, size, size, size))
    return size


def batches(dataset: Any, batch_size: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """(images, labels) as numpy arrays, in order."""
    for x, y in eval_loader(dataset, batch_size):
        yield x.numpy().astype(np.float32, copy=False), y.numpy()


def run_batch(session: Any, inp: ImageInput, x: np.ndarray, path: PathLike) -> np.ndarray:
    """The output for ``x``; a fixed-batch model gets ``x`` padded with zeros to its batch (the padding's
    rows are dropped). onnxruntime's own errors become one line naming the file."""
    n = x.shape[0]
    if inp.batch and n < inp.batch:
        x = np.concatenate([x, np.zeros((inp.batch - n,) + x.shape[1:], np.float32)])
    try:
        out = np.asarray(session.run(None, {inp.name: x})[0])
    except ort_helpers.run_errors() as exc:
        raise IrepError("{}: onnxruntime cannot run it on {}: {}".format(
            path, "x".join(map(str, x.shape)), first_line(exc))) from exc
    if out.ndim != 2 or out.shape[0] != x.shape[0]:
        raise IrepError("{}: output of shape {} for input {}, expected logits N x classes".format(
            path, "x".join(map(str, out.shape)), "x".join(map(str, x.shape))))
    return out[:n]


@dataclass
class OnnxEvalResult:
    top1: float
    top5: float
    loss: float
    examples: int
    dataset: str
    reference: Optional[str] = None
    reference_top1: Optional[float] = None
    reference_top5: Optional[float] = None
    differ: Optional[int] = None  # predictions (top-1 classes) that differ from the reference's


def _hits(logits: np.ndarray, labels: np.ndarray) -> Tuple[int, int, float]:
    """(top-1 hits, top-5 hits, summed cross-entropy) of a batch; equal logits rank by class index."""
    k = min(5, logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return (int((top[:, 0] == labels).sum()), int((top == labels[:, None]).any(axis=1).sum()),
            float(-logp[np.arange(len(labels)), labels].sum()))


def _session(path: PathLike, threads: Optional[int]) -> Tuple[Any, ImageInput]:
    model = load_onnx(path)
    return ort_helpers.make_session(str(path), threads=threads, source=str(path)), image_input(model, path)


def evaluate_onnx(path: PathLike, dataset: str, split: str = "test", data_root: Optional[str] = None,
                  batch_size: int = 256, val_fraction: float = 0.0, split_seed: int = 0,
                  limit: Optional[int] = None, reference: Optional[PathLike] = None,
                  threads: Optional[int] = None, progress: bool = True) -> OnnxEvalResult:
    """Top-1/top-5 (percent) and mean loss of an ONNX model (FP32 or INT8) on onnxruntime (CPU), and with
    ``reference`` (another ONNX file, e.g. the FP32 model of an INT8 one) its scores and how many
    predicted classes differ between the two on the same images. ``progress``: a bar on stderr counting
    the batches evaluated."""
    session, inp = _session(path, threads)
    ref = None
    if reference is not None:
        ref_session, ref_inp = _session(reference, threads)
        if (ref_inp.channels, ref_inp.height, ref_inp.width) != (inp.channels, inp.height, inp.width):
            raise IrepError("{}: --reference takes {}x{}x{} input, {} takes {}x{}x{}".format(
                reference, ref_inp.channels, ref_inp.height, ref_inp.width, path, inp.channels, inp.height,
                inp.width))
        ref = (ref_session, ref_inp)
    check_fits(inp, dataset, path)
    parts = ("test",) if split == "test" else ("train",)
    data = load_data(dataset, data_root, val_fraction=val_fraction, split_seed=split_seed, augment=False,
                     limit=limit, parts=parts, in_channels=inp.channels)
    fixed = {i.batch for i in ([inp] + ([ref[1]] if ref else [])) if i.batch}
    if len(fixed) > 1:
        raise IrepError("{}: fixed batch {} differs from --reference {}'s {}; export one with a dynamic batch".format(
            path, inp.batch, reference, ref[1].batch if ref else None))
    images = data.split(split)
    step = min(fixed) if fixed else min(batch_size, max(1, len(images)))
    require_memory((step, inp.channels, data.input_size, data.input_size), None, "an evaluation batch",
                   "{}: its fixed batch {}".format(path, step) if fixed else "--batch-size {}".format(batch_size),
                   IrepError if fixed else UsageError)
    n, differ = 0, 0
    sums = [0, 0, 0.0]
    ref_sums = [0, 0, 0.0]
    with progress_bar(total=-(-len(images) // step), desc="eval", enabled=progress, unit="batch") as evaluated:
        for x, y in batches(images, step):
            logits = _checked(run_batch(session, inp, x, path), path, data.num_classes)
            for i, v in enumerate(_hits(logits, y)):
                sums[i] += v
            if ref is not None:
                other = _checked(run_batch(ref[0], ref[1], x, reference), reference, data.num_classes)  # type: ignore[arg-type]
                for i, v in enumerate(_hits(other, y)):
                    ref_sums[i] += v
                differ += int((other.argmax(1) != logits.argmax(1)).sum())
            n += len(y)
            evaluated.update()
    if n == 0:
        raise IrepError("{}: the {} split of {} is empty".format(path, split, dataset))
    loss = sums[2] / n
    if not np.isfinite(loss):
        raise IrepError("{}: the model's outputs are NaN or inf on {}; no result".format(path, dataset))
    result = OnnxEvalResult(100.0 * sums[0] / n, 100.0 * sums[1] / n, loss, n, data.name)
    if ref is not None:
        result.reference = str(reference)
        result.reference_top1 = 100.0 * ref_sums[0] / n
        result.reference_top5 = 100.0 * ref_sums[1] / n
        result.differ = differ
    return result


def _checked(logits: np.ndarray, path: PathLike, classes: int) -> np.ndarray:
    if logits.shape[1] < classes:
        raise IrepError("{}: the model has {} outputs, the dataset has {} classes".format(
            path, logits.shape[1], classes))
    return logits
