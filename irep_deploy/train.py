"""Retraining and evaluation of multi-branch networks: one process, or one per GPU/CPU under torchrun.

A run directory holds::

    state.pt     resume state (model, optimizer, scheduler, finished epochs, RNG states, settings),
                 written atomically at the start and after every epoch; read with weights_only=True
    log.jsonl    one JSON object per epoch (and a final one)
    config.json  the run's settings, for people (state.pt holds the copy that counts)
    arch.bin     the architecture code trained
    ckpt.pt      the trained multi-branch checkpoint (save_checkpoint), input of `irep-deploy fuse`
    metrics.json the final test accuracy of the multi-branch and of the fused model

Reproducibility: every epoch reseeds its randomness from (seed, epoch) (see data.epoch_seed), and
the state is saved only at epoch boundaries, so resuming after a kill at any moment redoes the
interrupted epoch and ends with exactly the weights of an uninterrupted run (on the same machine
and thread count; on CUDA only with ``deterministic``, since cuDNN's convolution backward is not).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._io import (append_jsonl, atomic_write, check_writable, no_typed_storage_warning, run_directory, trim_jsonl,
                  write_json)
from .arch import ArchCode
from .checkpoint import load_checkpoint, recorded_dataset, save_checkpoint
from .data import (DataError, DataSplits, channel_adapter, dataset_spec, epoch_seed, eval_loader, load_data, set_epoch,
                   train_loader)
from .errors import CheckpointError, IrepError, TrainingDiverged, UsageError, VerificationError, first_line
from .models import MODELS, build_model, is_spec, searchable_layers
from .models.external import check_spec
from .compare import FUSE_EVAL, compare
from .precision import exact_fp32
from .reparam import fuse_model

PathLike = Union[str, "os.PathLike[str]"]
STATE_FORMAT = "irep-deploy-train-state"
STATE_VERSION = 1
AMP_MODES = ("none", "bf16", "fp16")
FUSED_TOLERANCE = FUSE_EVAL.max_rel_error  # fused vs multi-branch logits over a test set (true FP32)
LOG_EVERY = 10  # training steps between host reads of the running metrics and the non-finite-loss flag


def check_model_settings(backbone: str, width: float, model_kwargs: Optional[Dict[str, Any]],
                         weights: Optional[str], include: Optional[Sequence[str]],
                         exclude: Optional[Sequence[str]]) -> None:
    """The network settings of a run (train or search), checked before any data is read."""
    if not is_spec(backbone):
        if backbone not in MODELS:
            raise IrepError("unknown backbone {!r} (known: {}; or a model spec such as torchvision:resnet18)".format(
                backbone, ", ".join(MODELS)))
        given = [flag for flag, value in (("--model-kwargs", model_kwargs), ("--weights", weights),
                                          ("--include", include), ("--exclude", exclude)) if value]
        if given:
            raise UsageError("{} applies to model specs (--model torchvision:NAME or package.module:factory), "
                             "not to the built-in {}".format(given[0], backbone))
        return
    if width != 1.0:
        raise UsageError("--width applies to the built-in backbones; {} keeps its own channels".format(backbone))
    check_spec(backbone, model_kwargs, weights)


def build_run_model(backbone: str, data: DataSplits, width: float, **options: Any) -> nn.Module:
    """The network of a run on ``data``: a built-in backbone takes the data's channels; a model spec
    keeps its own (the caller adapts the data with ``data.with_channels``)."""
    spec = is_spec(backbone)
    model = build_model(backbone, num_classes=data.num_classes, width=width,
                        in_channels=None if spec else data.in_channels, input_size=data.input_size, **options)
    return model


@dataclass
class TrainConfig:
    """Settings that decide what a run computes (stored in the run; a resume uses them as saved).

    ``arch`` is the architecture code's text (None: the plain backbone, no branches). ``backbone``
    is a built-in backbone or a model spec (``torchvision:resnet18``, ``package.module:factory``);
    ``model_kwargs``, ``weights`` (a state-dict file or a torchvision weights name, loaded once at
    the start), ``include`` and ``exclude`` apply to specs (see :func:`~irep_deploy.models.build_model`).
    Defaults are
    the paper's retraining recipe: SGD lr 0.1, momentum 0.9, weight decay 5e-4, cosine schedule
    stepped every iteration. ``batch_size`` is global (split evenly over processes).
    """

    backbone: Optional[str] = None
    arch: Optional[str] = None
    dataset: str = "fashion-mnist"
    width: float = 1.0
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    label_smoothing: float = 0.0
    val_fraction: float = 0.0
    split_seed: int = 0
    limit: Optional[int] = None
    seed: int = 0
    init_from: Optional[str] = None
    amp: str = "none"  # autocast dtype of the training forward: none, bf16, or fp16 (CUDA, gradient scaler)
    deterministic: bool = False  # deterministic cuDNN/cuBLAS kernels: bit-identical resume on CUDA too
    model_kwargs: Optional[Dict[str, Any]] = None
    weights: Optional[str] = None
    include: Optional[List[str]] = None
    exclude: Optional[List[str]] = None

    def code(self) -> Optional[ArchCode]:
        if self.arch is None:
            return None
        return ArchCode.loads(self.arch, source="run settings (architecture code)")

    def check(self) -> None:
        dataset_spec(self.dataset)
        if self.backbone is None and self.arch is None:
            raise IrepError("give an architecture code (--arch) or a backbone (--backbone)")
        code = self.code()
        if code is not None:
            if self.backbone is None:
                self.backbone = code.backbone
            elif self.backbone != code.backbone:
                raise IrepError("--backbone {} differs from the architecture code's backbone {}".format(
                    self.backbone, code.backbone))
        check_model_settings(self.backbone, self.width, self.model_kwargs, self.weights, self.include,
                             self.exclude)
        if self.init_from is not None and is_spec(self.backbone):
            raise UsageError("--init-from {} applies to the built-in backbones; give the weights of {} with "
                             "--weights".format(self.init_from, self.backbone))
        for name, value, ok in (("epochs", self.epochs, self.epochs >= 1),
                                ("batch size", self.batch_size, self.batch_size >= 1),
                                ("learning rate", self.lr, self.lr > 0), ("width", self.width, self.width > 0),
                                ("label smoothing", self.label_smoothing, 0.0 <= self.label_smoothing < 1.0)):
            if not ok:
                raise IrepError("invalid {}: {}".format(name, value))
        if self.amp not in AMP_MODES:
            raise IrepError("invalid --amp {!r} (choose from {})".format(self.amp, ", ".join(AMP_MODES)))

    @classmethod
    def from_dict(cls, data: Dict[str, Any], source: str) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise CheckpointError("{}: unknown setting {!r} (written by a newer irep-deploy?)".format(source, unknown[0]))
        return cls(**data)


@dataclass
class EvalResult:
    top1: float  # percent
    top5: float  # percent
    loss: float
    examples: int
    dataset: Optional[str] = None  # set by evaluate()


@dataclass
class TrainReport:
    run_dir: str
    ckpt: str
    epochs: int
    resumed_from_epoch: int
    multi_branch: EvalResult
    fused: EvalResult
    fused_rel_error: float
    disagreements: int  # test examples whose predicted class differs between the two models
    history: List[Dict[str, Any]] = field(default_factory=list)
    main_process: bool = True  # False on ranks > 0 under torchrun (they write and print nothing)


# -- distributed ------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owned: bool = False  # this module created the process group (and destroys it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """Join the process group described by torchrun's environment (WORLD_SIZE > 1); gloo on CPU,
    NCCL on CUDA. Without it, a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as tdist

    owned = not tdist.is_initialized()
    if owned:
        tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return Dist(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owned)


def close_distributed(dist: Dist) -> None:
    """Leave the process group if :func:`init_distributed` created it."""
    if dist.owned:
        import torch.distributed as tdist
        tdist.destroy_process_group()


def _all_sum(values: List[float], dist: Dist, device: torch.device) -> List[float]:
    if not dist.enabled:
        return values
    import torch.distributed as tdist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return t.tolist()


def _barrier(dist: Dist) -> None:
    if dist.enabled:
        import torch.distributed as tdist
        tdist.barrier()


def broadcast_buffers(module: nn.Module, dist: Dist) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics) before an evaluation.

    DDP broadcasts them only at the start of a training forward, and each rank's forward then updates
    its own copy, so after the last step the ranks hold different statistics; metrics and fitness
    must come from one model. The next training forward would overwrite them the same way, so
    training is unchanged.
    """
    if not dist.enabled:
        return
    import torch.distributed as tdist
    for buf in module.buffers():
        tdist.broadcast(buf, 0)


def cuda_index(dev: torch.device) -> int:
    """The GPU this process uses. Under torchrun (LOCAL_RANK set) the local rank decides, so N
    processes use N GPUs; an explicit index naming another GPU is refused here rather than left to
    NCCL ("Duplicate GPU detected")."""
    local = os.environ.get("LOCAL_RANK")
    if local is None:
        return 0 if dev.index is None else dev.index
    if dev.index is not None and dev.index != int(local):
        raise IrepError("--device {} conflicts with LOCAL_RANK={} under torchrun: each process uses the GPU of its "
                        "local rank (give --device cuda; choose GPUs with CUDA_VISIBLE_DEVICES)".format(dev, local))
    return int(local)


def resolve_device(device: str, dist: Optional[Dist] = None) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        index = cuda_index(dev)
        if not torch.cuda.is_available():
            raise IrepError("device {} asked for, but CUDA is not available".format(device))
        dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
    return dev


#: cuBLAS needs this workspace setting for deterministic matmuls; it is read when cuBLAS starts.
CUBLAS_WORKSPACE = ":4096:8"


@contextlib.contextmanager
def deterministic_mode(enabled: bool) -> Iterator[None]:
    """Deterministic kernels inside the block (``enabled``), the caller's settings restored after.

    cuDNN's default convolution backward and algorithm autotuning (``benchmark``) are not
    deterministic, so without this a resumed CUDA run continues the run but is not bit-identical.
    ``CUBLAS_WORKSPACE_CONFIG`` must be set before cuBLAS starts: enter this before anything touches
    the GPU. It stays set (a process-wide environment variable that costs a little workspace memory).
    """
    if not enabled:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    # warn_only: the backward of AdaptiveAvgPool2d (every backbone's head) has no deterministic CUDA
    # kernel by PyTorch's list and would stop every run; at the output sizes used here (1x1, 7x7 on 7x7)
    # each input gradient gets exactly one addition, so its result does not depend on the order.
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[0], saved[1]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


def autocast(amp: str, device: torch.device) -> Any:
    """The autocast context of an ``amp`` mode (a no-op for ``none``)."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(amp: str, device: torch.device) -> Any:
    """A gradient scaler for fp16 (CUDA only); None otherwise."""
    if amp != "fp16":
        return None
    if device.type != "cuda":
        raise IrepError("--amp fp16 needs a CUDA device (use bf16 on CPU)")
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()


_SCHEDULER_ORDER_WARNING = r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"


def optimizer_step(loss: torch.Tensor, optimizers: Sequence[torch.optim.Optimizer], scheduler: Any,
                   scaler: Any = None) -> None:
    """Backward of ``loss``, a step of every optimizer (through the fp16 gradient scaler when given),
    then one step of the per-iteration schedule. Reads nothing on the host except what the scaler does.
    """
    if scaler is None:
        loss.backward()
        for opt in optimizers:
            opt.step()
        scheduler.step()
        return
    scaler.scale(loss).backward()
    for opt in optimizers:
        # An optimizer none of whose parameters got a gradient (DES: alpha/beta when every sampled code
        # has no branch) has nothing to step, and scaler.step would raise "No inf checks were recorded".
        if any(p.grad is not None for group in opt.param_groups for p in group["params"]):
            scaler.step(opt)
    scaler.update()
    # The schedule follows the iteration count, whether or not the scaler skipped this step (inf/nan
    # gradients, typical of the first steps while the scale settles). A skipped first step makes the
    # scheduler warn that optimizer.step() was not called: expected here, so that one warning is muted.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SCHEDULER_ORDER_WARNING, category=UserWarning)
        scheduler.step()


class StepMonitor:
    """The running loss sum, correct count and first non-finite loss of an epoch, kept on the device.

    Per step nothing is read on the host (which would wait for the GPU to finish the step); every
    ``every`` steps and at the end of the epoch :meth:`check` reads them in one transfer, with the
    non-finite flag reduced over ranks first, so every rank stops after the same step.
    """

    def __init__(self, dev: torch.device, dist: Dist, every: Optional[int] = None) -> None:
        self.dev, self.dist = dev, dist
        self.every = every or LOG_EVERY
        self.seen = 0
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        self.loss_sum, self.correct = zero.clone(), zero.clone()
        self.first_bad = torch.full((), math.inf, dtype=torch.float64, device=dev)  # step of the first bad loss
        self.bad_value = zero.clone()
        self.mean_loss = math.nan  # as of the last check, for progress bars

    def update(self, step: int, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> Optional[Tuple[int, float]]:
        """Add one step; at the end of an interval, return (step, loss) of the first non-finite loss if any."""
        loss = loss.detach().double()
        first = torch.isinf(self.first_bad) & ~torch.isfinite(loss)
        self.first_bad = torch.where(first, torch.full_like(self.first_bad, step), self.first_bad)
        self.bad_value = torch.where(first, loss, self.bad_value)
        self.loss_sum += loss * target.numel()
        self.correct += (logits.detach().argmax(1) == target).sum()
        self.seen += target.numel()
        return self.check() if (step + 1) % self.every == 0 else None

    def check(self) -> Optional[Tuple[int, float]]:
        """Read the flag (all ranks agree) and the running loss; (step, loss) of a non-finite loss or None."""
        first = self.first_bad.clone()
        if self.dist.enabled:
            import torch.distributed as tdist
            tdist.all_reduce(first, op=tdist.ReduceOp.MIN)
        step, local_step, value, loss_sum = torch.stack([first, self.first_bad, self.bad_value,
                                                         self.loss_sum]).tolist()
        self.mean_loss = loss_sum / max(self.seen, 1)
        if math.isinf(step):
            return None
        # The rank whose loss went bad reports its value; the others report nan.
        return int(step), value if local_step == step else math.nan

    def totals(self) -> Tuple[float, float, float]:
        """Examples, loss sum and correct predictions, summed over ranks (one host read)."""
        seen = torch.full((), float(self.seen), dtype=torch.float64, device=self.dev)
        total = torch.stack([seen, self.loss_sum, self.correct])
        if self.dist.enabled:
            import torch.distributed as tdist
            tdist.all_reduce(total)
        n, loss_sum, correct = total.tolist()
        return n, loss_sum, correct


# -- RNG state as plain data (weights_only-loadable) ------------------------------------------------
def rng_state() -> Dict[str, Any]:
    import numpy as np

    np_state = np.random.get_state()
    py_state = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [str(np_state[0]), torch.from_numpy(np_state[1].astype("int64")), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- evaluation -------------------------------------------------------------------------------------
def topk_hits(logits: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-example top-1 and top-5 hits, as boolean tensors on the logits' device."""
    k = min(5, logits.shape[1])
    hit = logits.topk(k, dim=1).indices.eq(target.unsqueeze(1))
    return hit[:, 0], hit.any(dim=1)


def _topk_correct(logits: torch.Tensor, target: torch.Tensor) -> Tuple[int, int]:
    top1, top5 = topk_hits(logits, target)
    return int(top1.sum()), int(top5.sum())


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
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        outs = [m(x).float() for m in models]
        n += y.numel()
        for s, out in zip(sums, outs):
            c1, c5 = _topk_correct(out, y)
            s[0] += F.cross_entropy(out, y, reduction="sum").item()
            s[1] += c1
            s[2] += c5
        for out in outs[1:]:
            worst = max(worst, compare(outs[0], out).rel_error)
            disagree += int((out.argmax(1) != outs[0].argmax(1)).sum())
    flat = _all_sum([float(n), float(disagree)] + [v for s in sums for v in s], dist, device)
    n, disagree = int(flat[0]), int(flat[1])
    if dist.enabled:
        import torch.distributed as tdist
        w = torch.tensor([worst], device=device)
        tdist.all_reduce(w, op=tdist.ReduceOp.MAX)
        worst = float(w.item())
    results = []
    for i in range(len(models)):
        loss, c1, c5 = flat[2 + 3 * i: 5 + 3 * i]
        d = max(n, 1)
        results.append(EvalResult(100.0 * c1 / d, 100.0 * c5 / d, loss / d, n))
    return results, worst, disagree


def evaluate(ckpt: PathLike, dataset: Optional[str] = None, split: str = "test", data_root: Optional[str] = None,
             batch_size: int = 256, val_fraction: float = 0.0, split_seed: int = 0, limit: Optional[int] = None,
             device: str = "auto", workers: int = 0, model: Union[str, nn.Module, None] = None) -> EvalResult:
    """Top-1/top-5 accuracy (percent) and mean loss of a checkpoint (multi-branch or deploy) on a
    split of a dataset (default: the one ``train`` recorded in the checkpoint). ``val`` needs the
    ``val_fraction``/``split_seed`` the split was made with. ``model`` names the network of a
    checkpoint that is not built in (:meth:`~irep_deploy.checkpoint.Checkpoint.build`); grey images
    are copied into every channel of a network that takes more (as ``train`` did)."""
    checkpoint = load_checkpoint(ckpt)
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
    if data.num_classes > h["num_classes"]:
        raise IrepError("{}: the model has {} classes, {} has {}".format(ckpt, h["num_classes"], dataset,
                                                                       data.num_classes))
    dev = resolve_device(device)
    loader = eval_loader(data.split(split), batch_size, workers, pin_memory=dev.type == "cuda")
    results, _, _ = evaluate_models([net.to(dev)], loader, dev)
    if not math.isfinite(results[0].loss):
        raise IrepError("{}: the model's outputs are NaN or inf on {} (overflowing weights?); no result".format(
            ckpt, dataset))
    return dataclasses.replace(results[0], dataset=dataset)


# -- training ---------------------------------------------------------------------------------------
def _state_path(run_dir: Path) -> Path:
    return run_dir / "state.pt"


def _save_state(run_dir: Path, config: TrainConfig, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: Any, history: List[Dict[str, Any]], scaler: Any = None) -> None:
    payload = {
        "format": STATE_FORMAT, "format_version": STATE_VERSION, "config": dataclasses.asdict(config),
        "epoch": epoch, "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
        "history": history, "scaler": scaler.state_dict() if scaler is not None else None,
    }
    with atomic_write(_state_path(run_dir), "wb") as handle:
        torch.save(payload, handle)


def load_state(run_dir: PathLike) -> Dict[str, Any]:
    """The resume state of a run directory, read safely (weights_only=True)."""
    path = _state_path(Path(run_dir))
    if not path.is_file():
        raise IrepError("{}: no training state here (state.pt missing); not a run directory of `irep-deploy train`".format(
            run_dir))
    try:
        with no_typed_storage_warning():  # torch 2.0 warns about its own internals here
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refusals, truncation, not a zip: all mean "unusable file"
        raise CheckpointError("{}: unreadable training state ({})".format(
            path, first_line(exc, 120))) from exc
    if not isinstance(obj, dict) or obj.get("format") != STATE_FORMAT:
        raise CheckpointError("{}: not an irep-deploy training state".format(path))
    if not isinstance(obj.get("format_version"), int) or obj["format_version"] > STATE_VERSION:
        raise CheckpointError("{}: training state version {!r} is newer than this irep-deploy reads".format(
            path, obj.get("format_version")))
    return obj


def init_from_torchvision(model: nn.Module, path: PathLike) -> int:
    """Copy a torchvision-layout state dict into the fixed 3x3 conv-BNs (and the other plain layers
    whose names match); branches, alpha and beta stay freshly initialised. Returns tensors copied."""
    from .reparam import _torchvision_names

    try:
        with no_typed_storage_warning():  # torch 2.0 warns about its own internals here
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise IrepError("{}: no such file".format(path)) from exc
    except Exception as exc:
        raise CheckpointError("{}: not a readable state dict ({})".format(
            path, first_line(exc, 120))) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("{}: not a state dict of tensors".format(path))
    backbone = model.irep_config["backbone"]
    if MODELS[backbone].torchvision is None:
        raise IrepError("--init-from needs a backbone with a torchvision layout ({}), not {}".format(
            ", ".join(n for n, e in MODELS.items() if e.torchvision), backbone))
    own = model.state_dict()
    blocks = dict(searchable_layers(model))
    mapping: Dict[str, str] = {}  # our tensor name -> torchvision's
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):  # the head: copied only where the class count matches
            for p in ("weight", "bias"):
                if tuple(state.get(name + "." + p, torch.empty(0)).shape) == tuple(m.weight.shape if p == "weight"
                                                                                  else m.bias.shape):
                    mapping[name + "." + p] = name + "." + p
        # ConvBN modules outside the branches: the stem, the 1x1 shortcuts and the fixed 3x3 ops F.
        if not (isinstance(m, nn.Sequential) and isinstance(getattr(m, "conv", None), nn.Conv2d)
                and isinstance(getattr(m, "bn", None), nn.BatchNorm2d)) or ".branches." in name:
            continue
        layer = name[:-len(".conv")] if name.endswith(".conv") and name[:-len(".conv")] in blocks else name
        tv_conv, tv_bn = _torchvision_names(backbone, layer)
        mapping[name + ".conv.weight"] = tv_conv + ".weight"
        # torchvision's VGG-16 has no BN (its conv bias is not carried over); its ResNets have one per conv.
        if tv_bn is not None:
            for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                mapping["{}.bn.{}".format(name, p)] = "{}.{}".format(tv_bn, p)
    copied = 0
    with torch.no_grad():
        for ours, theirs in mapping.items():
            if theirs not in state:
                raise CheckpointError("{}: lacks tensor {!r} (needed for {})".format(path, theirs, ours))
            if tuple(state[theirs].shape) != tuple(own[ours].shape):
                raise CheckpointError("{}: tensor {!r} has shape {}, the model's {} needs {}".format(
                    path, theirs, tuple(state[theirs].shape), ours, tuple(own[ours].shape)))
            own[ours].copy_(state[theirs])
            copied += 1
    if copied == 0:
        raise CheckpointError("{}: no tensor matches {}'s torchvision layout".format(path, backbone))
    return copied


def train(run_dir: PathLike, config: Optional[TrainConfig] = None, resume: bool = False,
          data_root: Optional[str] = None, device: str = "auto", workers: int = 0, progress: bool = True,
          on_epoch_end: Optional[Callable[[int, Dict[str, Any]], None]] = None,
          channels_last: bool = False) -> TrainReport:
    """Train a multi-branch network (the pipeline's data + arch.bin -> ckpt.pt step).

    New run: ``config`` says what to train; ``run_dir`` must not hold a run yet. ``resume=True``:
    continue the run in ``run_dir`` with its saved settings (``config`` must then be None or equal).
    ``data_root``, ``device``, ``workers`` and ``progress`` are where/how, not what, and may change
    between a run and its resume. ``on_epoch_end(epoch, record)`` is called (every rank) after each
    epoch's state is saved; an exception from it stops the run, which stays resumable.
    ``channels_last`` stores activations and weights NHWC (faster convolutions on recent GPUs).
    Under torchrun (WORLD_SIZE > 1) every process calls this; only rank 0 writes files.
    """
    run = Path(run_dir)
    state = load_state(run) if resume else None
    saved = TrainConfig.from_dict(dict(state["config"]), str(_state_path(run))) if state is not None else None
    # Deterministic kernels are switched on before the device is touched (cuBLAS reads its setting once).
    settings = saved or config
    with deterministic_mode(settings is not None and settings.deterministic):
        dev = resolve_device(device)
        dist = init_distributed(dev)
        try:
            return _train(run, config, state, saved, data_root, dev, dist, workers, progress, on_epoch_end,
                          channels_last)
        finally:
            close_distributed(dist)


def _train(run: Path, config: Optional[TrainConfig], state: Optional[Dict[str, Any]], saved: Optional[TrainConfig],
           data_root: Optional[str], dev: torch.device, dist: Dist, workers: int, progress: bool,
           on_epoch_end: Optional[Callable[[int, Dict[str, Any]], None]], channels_last: bool) -> TrainReport:
    if saved is not None:
        if config is not None and dataclasses.asdict(config) != dataclasses.asdict(saved):
            diff = [k for k, v in dataclasses.asdict(config).items() if dataclasses.asdict(saved)[k] != v]
            raise IrepError("{}: resume uses the run's own settings; {} differs ({!r} saved, {!r} given)".format(
                run, diff[0], getattr(saved, diff[0]), getattr(config, diff[0])))
        config = saved
    else:
        if config is None:
            raise IrepError("train needs settings (a TrainConfig) for a new run")
        config = dataclasses.replace(config)
        config.check()
        if _state_path(run).exists():
            raise IrepError("{}: already holds a training run; continue it with --resume {} or choose another "
                            "directory".format(run, run))
        if run.exists() and not run.is_dir():
            raise IrepError("{}: exists and is not a directory".format(run))
        if not run.parent.is_dir():
            raise IrepError("{}: cannot create: directory {} does not exist".format(run, run.parent))
    assert config is not None
    if config.batch_size % dist.world_size:
        raise IrepError("batch size {} does not split evenly over {} processes".format(config.batch_size, dist.world_size))

    # Data errors come before anything is written: a failed start leaves no run directory behind.
    data = load_data(config.dataset, data_root, val_fraction=config.val_fraction, split_seed=config.split_seed,
                     limit=config.limit)
    if len(data.train) < config.batch_size:  # type: ignore[arg-type]
        raise IrepError("the training split has {} examples, fewer than one batch of {}".format(
            len(data.train), config.batch_size))  # type: ignore[arg-type]

    torch.manual_seed(config.seed)  # the same initial weights on every rank and every run of this seed
    model = build_run_model(config.backbone, data, config.width, arch=config.code(), model_kwargs=config.model_kwargs,
                            weights=config.weights if state is None else None,  # a resume loads its own state
                            include=config.include, exclude=config.exclude)
    data = data.with_channels(model.irep_config["in_channels"])
    per_rank = config.batch_size // dist.world_size
    pin = dev.type == "cuda"
    loader = train_loader(data.train, per_rank, config.seed, workers, dist.enabled, pin)
    val_loader = eval_loader(data.val, per_rank, workers, dist.rank, dist.world_size, pin) if data.val else None
    test_loader = eval_loader(data.test, per_rank, workers, dist.rank, dist.world_size, pin)
    if config.init_from and state is None:
        init_from_torchvision(model, config.init_from)
    model.to(dev)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=layout)
    scaler = make_scaler(config.amp, dev)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, nesterov=config.nesterov)
    steps = len(loader)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps)
    history: List[Dict[str, Any]] = []
    start = 0
    if state is not None:
        try:
            model.load_state_dict(state["model"], strict=True)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError("{}: does not fit the model of its own settings ({})".format(
                _state_path(run), first_line(exc, 120))) from exc
        set_rng_state(state["rng"])
        start, history = int(state["epoch"]), list(state["history"])
        if dist.main:
            trim_jsonl(run / "log.jsonl", lambda r: r.get("event") == "epoch" and r.get("epoch", 0) <= start)
    elif dist.main:
        with run_directory(run, keep=lambda p: _state_path(p).exists()):  # no empty run dir on failure
            check_writable(_state_path(run))
            code = config.code() or ArchCode.empty(config.backbone, model.irep_config["ops"])
            code.save(run / "arch.bin")
            write_json(run / "config.json", dataclasses.asdict(config))
            _save_state(run, config, 0, model, optimizer, scheduler, history, scaler)
    _barrier(dist)

    net: nn.Module = model
    if dist.enabled:
        # A block with no active branch never uses its alpha/beta: DDP must be told to expect that.
        unused = any(not block.active for _, block in searchable_layers(model))
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=unused)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    for epoch in range(start, config.epochs):
        set_epoch(loader, config.seed, epoch)
        torch.manual_seed(epoch_seed(config.seed, epoch, dist.rank))  # augmentation, dropout
        record = _train_epoch(net, loader, optimizer, scheduler, criterion, dev, dist, epoch, config, progress, run,
                              scaler, layout)
        if val_loader is not None:
            broadcast_buffers(model, dist)
            (val,), _, _ = evaluate_models([model], val_loader, dev, dist)
            record.update(val_top1=val.top1, val_top5=val.top5, val_loss=val.loss)
        history.append(record)
        if dist.main:
            _save_state(run, config, epoch + 1, model, optimizer, scheduler, history, scaler)
            append_jsonl(run / "log.jsonl", record)
            if progress:
                print(_epoch_line(record, config.epochs), flush=True)
        _barrier(dist)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)

    return _finish(run, config, model, test_loader, dev, dist, start, history, data)


def _train_epoch(net: nn.Module, loader: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                 criterion: nn.Module, dev: torch.device, dist: Dist, epoch: int, config: TrainConfig,
                 progress: bool, run: Path, scaler: Any = None,
                 layout: torch.memory_format = torch.contiguous_format) -> Dict[str, Any]:
    from tqdm import tqdm

    net.train()
    t0 = time.time()
    monitor = StepMonitor(dev, dist)
    bar = tqdm(loader, desc="epoch {}/{}".format(epoch + 1, config.epochs), leave=False, dynamic_ncols=True,
               disable=not (progress and dist.main))
    bad: Optional[Tuple[int, float]] = None
    for step, (x, y) in enumerate(bar):
        x, y = x.to(dev, non_blocking=True).contiguous(memory_format=layout), y.to(dev, non_blocking=True)
        with autocast(config.amp, dev):
            out = net(x)
            loss = criterion(out.float(), y)
        optimizer.zero_grad(set_to_none=True)
        # fp16: the scaler scales the loss so small gradients survive and skips steps with inf/nan gradients
        optimizer_step(loss, [optimizer], scheduler, scaler)
        bad = monitor.update(step, loss, out, y)  # reads the host only every LOG_EVERY steps
        if bad is None and (step + 1) % monitor.every == 0:
            bar.set_postfix(loss="{:.3f}".format(monitor.mean_loss), lr="{:.3g}".format(scheduler.get_last_lr()[0]))
        if bad is not None:
            break
    bad = bad or monitor.check()
    if bad is not None:
        # The weights in memory may have taken a few bad steps since; state.pt holds the last finished epoch.
        bar.close()
        raise TrainingDiverged("loss became {} at epoch {} step {}; stopped, the last good state (after epoch {}) "
                               "is kept in {} (try a lower --lr)".format(
                                   bad[1], epoch + 1, bad[0] + 1, epoch, _state_path(run)))
    n, loss_sum, correct = monitor.totals()
    return {"event": "epoch", "epoch": epoch + 1, "train_loss": loss_sum / n, "train_top1": 100.0 * correct / n,
            "lr": scheduler.get_last_lr()[0], "seconds": round(time.time() - t0, 3), "examples": int(n)}


def _epoch_line(record: Dict[str, Any], epochs: int) -> str:
    line = "epoch {}/{}: train loss {:.4f} top-1 {:.2f}%".format(
        record["epoch"], epochs, record["train_loss"], record["train_top1"])
    if "val_top1" in record:
        line += ", val top-1 {:.2f}%".format(record["val_top1"])
    return line + " ({:.1f} s)".format(record["seconds"])


def _finish(run: Path, config: TrainConfig, model: nn.Module, test_loader: Any, dev: torch.device, dist: Dist,
            start: int, history: List[Dict[str, Any]], data: DataSplits) -> TrainReport:
    """Test accuracy of the multi-branch model and of its fusion; write ckpt.pt and metrics.json."""
    model.eval()
    broadcast_buffers(model, dist)  # every rank evaluates rank 0's model, the one ckpt.pt holds
    fused = fuse_model(model)
    with exact_fp32():  # FUSED_TOLERANCE assumes float32 arithmetic, not TF32 (on by default for cuDNN)
        (multi, plain), err, disagree = evaluate_models([model, fused], test_loader, dev, dist)
    ckpt = run / "ckpt.pt"
    summary = {"dataset": config.dataset, "epochs": config.epochs, "seed": config.seed,
               "test_top1": multi.top1, "test_top5": multi.top5, "fused_test_top1": plain.top1,
               "fused_test_top5": plain.top5, "fused_rel_error": err, "disagreements": disagree,
               "test_examples": multi.examples}
    if dist.main:
        save_checkpoint(ckpt, model, extra=dict(summary, train_config=dataclasses.asdict(config)))
        write_json(run / "metrics.json", summary)
        append_jsonl(run / "log.jsonl", dict(summary, event="final"))
    _barrier(dist)
    if not err <= FUSED_TOLERANCE:
        raise VerificationError("fused model differs from the multi-branch model on the test set: relative logit "
                                "error {:.3g} > {:.0e} ({} wrote the multi-branch checkpoint)".format(
                                    err, FUSED_TOLERANCE, ckpt))
    return TrainReport(str(run), str(ckpt), config.epochs, start, multi, plain, err, disagree, history, dist.main)
