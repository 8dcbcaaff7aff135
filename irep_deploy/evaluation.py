"""Accuracy of PyTorch models: several models on the same batches (sharded over ranks), and a
checkpoint on a dataset split (``irep-deploy eval CKPT``)."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import load_checkpoint, recorded_dataset
from .data import DataError, channel_adapter, eval_loader, load_data
from .errors import IrepError, raise_if_interrupted
from .compare import compare
from .progress import bar
from .resources import require_input_memory
from .runtime import Dist, all_reduce, all_sum, resolve_device

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class EvalResult:
    top1: float  # percent
    top5: float  # percent
    loss: float
    examples: int
    dataset: Optional[str] = None  # set by evaluate()


def topk_hits(logits: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-example top-1 and top-5 hits, as boolean tensors on the logits' device."""
    k = min(5, logits.shape[1])
    hit = logits.topk(k, dim=1).indices.eq(target.unsqueeze(1))
    return hit[:, 0], hit.any(dim=1)


@torch.no_grad()
def evaluate_models(models: Sequence[nn.Module], loader: Iterable, device: torch.device,
                    dist: Optional[Dist] = None) -> Tuple[List[EvalResult], float, int]:
    """Evaluate several models on the same batches in one pass.

    Returns their results, the largest relative logit error of models[1:] against models[0] and
    how many examples get a different predicted class (summed over ranks when distributed).
    """
    dist = dist or Dist()
    for m in models:
        m.eval()
    n = 0
    sums = [[0.0, 0.0, 0.0] for _ in models]  # loss, top1, top5
    worst, disagree = 0.0, 0
    for x, y in loader:
        raise_if_interrupted()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        outs = [m(x).float() for m in models]
        n += y.numel()
        for s, out in zip(sums, outs):
            top1, top5 = topk_hits(out, y)
            s[0] += F.cross_entropy(out, y, reduction="sum").item()
            s[1] += int(top1.sum())
            s[2] += int(top5.sum())
        for out in outs[1:]:
            worst = max(worst, compare(outs[0], out).rel_error)
            disagree += int((out.argmax(1) != outs[0].argmax(1)).sum())
    flat = all_sum([float(n), float(disagree)] + [v for s in sums for v in s], dist, device)
    n, disagree = int(flat[0]), int(flat[1])
    worst = float(all_reduce(torch.tensor([worst], device=device), dist, "max").item())
    results = []
    for i in range(len(models)):
        loss, c1, c5 = flat[2 + 3 * i: 5 + 3 * i]
        d = max(n, 1)
        results.append(EvalResult(100.0 * c1 / d, 100.0 * c5 / d, loss / d, n))
    return results, worst, disagree


def evaluate(ckpt: PathLike, dataset: Optional[str] = None, split: str = "test", data_root: Optional[str] = None,
             batch_size: int = 256, val_fraction: float = 0.0, split_seed: int = 0, limit: Optional[int] = None,
             device: str = "auto", workers: int = 0, model: Union[str, nn.Module, None] = None,
             trust_pickle: bool = False, progress: bool = True) -> EvalResult:
    """Top-1/top-5 accuracy (percent) and mean loss of a checkpoint (multi-branch or deploy) on a
    split of a dataset (default: the one ``train`` recorded in the checkpoint). ``val`` needs the
    ``val_fraction``/``split_seed`` the split was made with. ``model`` names the network of a
    checkpoint that is not built in (:meth:`~irep_deploy.checkpoint.Checkpoint.build`); grey images
    are copied into every channel of a network that takes more (as ``train`` did). ``trust_pickle``:
    read an old pickle-format checkpoint on torch < 2.10 too (:func:`~irep_deploy.load_checkpoint`).
    ``progress``: a bar on stderr counting the batches evaluated."""
    checkpoint = load_checkpoint(ckpt, trust_pickle=trust_pickle)
    if dataset is None:
        dataset = recorded_dataset(checkpoint)
        if dataset is None:
            raise IrepError("{}: the checkpoint does not record the dataset it was trained on (made before "
                            "irep-deploy recorded it, or not by `train`); pass --dataset".format(ckpt))
    h = checkpoint.header
    try:
        channel_adapter(dataset, h["in_channels"])
    except DataError as exc:
        raise IrepError("{}: {}".format(ckpt, exc)) from exc
    net = checkpoint.build(model)  # a missing or wrong --model is refused before the data is read
    parts = ("test",) if split == "test" else ("train",)
    data = load_data(dataset, data_root, val_fraction=val_fraction, split_seed=split_seed, augment=False,
                     limit=limit, parts=parts, in_channels=h["in_channels"])
    if data.input_size != h["input_size"]:  # a conv net runs on any size, but its accuracy there means nothing
        raise IrepError("{}: the model takes {}x{} images (its input_size), {} has {}x{} images; evaluate it on "
                        "data of its own size".format(ckpt, h["input_size"], h["input_size"], dataset,
                                                      data.input_size, data.input_size))
    if data.num_classes > h["num_classes"]:
        raise IrepError("{}: the model has {} classes, {} has {}".format(ckpt, h["num_classes"], dataset,
                                                                       data.num_classes))
    images = data.split(split)
    require_input_memory(net, min(batch_size, max(1, len(images))), data.in_channels,  # type: ignore[arg-type]
                         data.input_size, None, str(ckpt), "an evaluation batch", "--batch-size {}".format(batch_size))
    dev = resolve_device(device)
    loader = eval_loader(images, batch_size, workers, pin_memory=dev.type == "cuda")
    with bar(loader, desc="eval", enabled=progress, unit="batch") as batches:
        results, _, _ = evaluate_models([net.to(dev)], batches, dev)
    if not math.isfinite(results[0].loss):
        raise IrepError("{}: the model's outputs are NaN or inf on {} (overflowing weights?); no result".format(
            ckpt, dataset))
    return dataclasses.replace(results[0], dataset=dataset)
