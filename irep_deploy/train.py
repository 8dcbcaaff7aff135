"""Retraining of multi-branch networks: one process, or one per GPU/CPU under torchrun.

A run directory holds::

    state.pt     resume state (model, optimizer, scheduler, finished epochs, RNG states, settings),
                 written atomically at the start and after every epoch (runs.write_run_state)
    log.jsonl    one JSON object per epoch (and a final one)
    config.json  the run's settings, for people (state.pt holds the copy that counts)
    arch.bin     the architecture code trained
    ckpt.pt      the trained multi-branch checkpoint (save_checkpoint), input of `irep-deploy fuse`
    metrics.json the final test accuracy of the multi-branch and of the fused model

This module holds the run's settings and its loop; the device, process group, AMP and RNG state
are :mod:`.runtime`'s, the step :mod:`.steps`', the accuracy :mod:`.evaluation`'s.

Reproducibility: every epoch reseeds its randomness from (seed, epoch) (see data.epoch_seed), and
the state is saved only at epoch boundaries, so resuming after a kill at any moment redoes the
interrupted epoch and ends with exactly the weights of an uninterrupted run (on the same machine
and thread count; on CUDA only with ``deterministic``, since cuDNN's convolution backward is not).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from ._io import append_jsonl, run_directory, trim_jsonl, write_json
from .arch import ArchCode
from .checkpoint import save_checkpoint
from .data import DataSplits, dataset_spec, epoch_seed, eval_loader, load_data, set_epoch
from .devicedata import MODES as DEVICE_DATA_MODES, training_batches
from .errors import ArchMismatchError, CheckpointError, IrepError, TrainingDiverged, UsageError, VerificationError, first_line
from . import options as opt
from .compare import FUSE_EVAL
from .data import DATASETS
from .evaluation import EvalResult, evaluate, evaluate_models  # evaluate: documented as irep_deploy.train.evaluate
from .graphs import DeviceSchedule, StepGraph, capture_refusal, make_capturable, make_train_step, resolve_cuda_graph, run_graph_epoch
from .progress import bar as progress_bar
from .binding import searchable_layers
from .block import set_drop_path
from .models import is_spec
from .models.external import named_spec
from .options import BACKBONE_HELP, DEVICE_DATA_HELP, model_setting, setting
from .precision import exact_fp32
from .reparam import fuse_model, init_from_torchvision
from .runs import (build_run_model, check_epoch, check_model_settings, check_settings, check_tensors, load_part,
                   read_run_state, state_part, state_path, write_run_state)
from .runtime import (AMP_MODES, Dist, barrier, broadcast_buffers, close_distributed, deterministic_mode,
                      init_distributed, launched_main, make_scaler, resolve_device, rng_state, set_rng_state,
                      wrap_ddp)
from .steps import run_epoch

__all__ = ["TrainConfig", "TrainReport", "TrainingDiverged", "TRAIN_PRESETS", "make_train_config", "train", "evaluate"]

PathLike = Union[str, "os.PathLike[str]"]
FUSED_TOLERANCE = FUSE_EVAL.max_rel_error  # fused vs multi-branch logits over a test set (true FP32)


@dataclass
class TrainConfig:
    """Settings that decide what a run computes (stored in the run; a resume uses them as saved).

    ``arch`` is the architecture code's text (None: the plain backbone, no branches). ``backbone``
    is a built-in backbone or a model spec (``torchvision:resnet18``, ``package.module:factory``);
    ``model_kwargs``, ``weights`` (a state-dict file or a torchvision weights name, loaded once at
    the start), ``include`` and ``exclude`` apply to specs (see :func:`~irep_deploy.models.build_model`).
    Defaults
    (no preset): SGD lr 0.1, momentum 0.9, weight decay 5e-4, batch 128, cosine schedule stepped every
    iteration, no drop-path, cutout or clipping; the paper's recipes are :data:`TRAIN_PRESETS`.
    ``batch_size`` is global (split evenly over processes).
    """

    backbone: Optional[str] = setting(None, BACKBONE_HELP, flags=("--model", "--backbone"), metavar="SPEC")
    arch: Optional[str] = setting(None, "architecture code file (arch.bin); the run stores its text (none: the "
                                        "plain backbone)", metavar="ARCH_BIN")
    dataset: str = setting("fashion-mnist", "%(choices)s", choices=DATASETS, metavar="NAME")
    width: float = setting(1.0, "channel width multiplier of a built-in backbone", type=opt.WIDTH)
    epochs: int = setting(10, "epochs", type=opt.EPOCHS)
    batch_size: int = setting(128, "global batch size (split evenly over processes)", type=opt.GLOBAL_BATCH)
    lr: float = setting(0.1, "SGD learning rate, cosine-annealed per step", type=opt.POSITIVE)
    momentum: float = setting(0.9, "SGD momentum", type=opt.FRACTION)
    weight_decay: float = setting(5e-4, "weight decay", type=opt.NON_NEGATIVE)
    nesterov: bool = setting(False, "Nesterov momentum")
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy", type=opt.FRACTION)
    drop_path: float = setting(0.0, "drop-path probability of the re-parameterization branches (per example; "
                                    "ramped linearly from 0 over the epochs, as in DARTS; the fixed 3x3 conv and "
                                    "identity branches are never dropped)", type=opt.FRACTION, metavar="P")
    cutout: int = setting(0, "side of the square cutout zeroes in every training image (DARTS: 16; 0: off)",
                          type=opt.int_in(0, opt.MAX_SIZE), metavar="N")
    grad_clip: float = setting(0.0, "clip the gradients' total norm to this (DARTS: 5; 0: off)",
                               type=opt.NON_NEGATIVE, metavar="NORM")
    val_fraction: float = setting(0.0, "fraction of the training set held out as the val split", type=opt.FRACTION)
    split_seed: int = setting(0, "seed of the train/val split", type=opt.SEED)
    limit: Optional[int] = setting(None, "use at most N examples of each split (CPU-scale runs)", type=opt.COUNT,
                                   metavar="N")
    seed: int = setting(0, "seed of initialisation, order and augmentation", type=opt.SEED)
    init_from: Optional[str] = setting(None, "torchvision-layout state dict for the fixed convs of a built-in "
                                             "backbone (ImageNet layouts; for a --model network use --weights)",
                                       metavar="PATH")
    amp: str = setting("none", "mixed precision of the training forward (fp16: CUDA only, with a gradient scaler)",
                       choices=AMP_MODES)
    deterministic: bool = setting(False, "deterministic cuDNN/cuBLAS kernels (slower on GPUs): a resumed CUDA run "
                                         "ends bit-identical")
    model_kwargs: Optional[Dict[str, Any]] = model_setting("model_kwargs")
    weights: Optional[str] = model_setting("weights")
    include: Optional[List[str]] = model_setting("include")
    exclude: Optional[List[str]] = model_setting("exclude")
    device_data: str = setting("auto", DEVICE_DATA_HELP, choices=DEVICE_DATA_MODES)
    #: Runs saved before ``device_data`` existed read their training split with a DataLoader (runs.config_from_dict).
    SETTINGS_BEFORE: ClassVar[Dict[str, Any]] = {"device_data": "off"}

    def code(self) -> Optional[ArchCode]:
        if self.arch is None:
            return None
        return ArchCode.loads(self.arch, source="run settings (architecture code)")

    def check(self) -> None:
        dataset_spec(self.dataset)
        if self.backbone is None and self.arch is None:
            raise UsageError("give an architecture code (--arch) or a network (--model)")
        code = self.code()
        if code is not None:  # the code's text came from a file: it names no network by itself
            self.backbone = named_spec(code.backbone, self.backbone, "the run's architecture code (--arch)",
                                       ArchMismatchError)
        check_model_settings(self.backbone, self.width, self.model_kwargs, self.weights, self.include,
                             self.exclude)
        if self.init_from is not None and is_spec(self.backbone):
            raise UsageError("--init-from {} applies to the built-in backbones; give the weights of {} with "
                             "--weights".format(self.init_from, self.backbone))
        if self.batch_size == 1:  # train-mode BatchNorm normalises over the batch: one example has no spread
            raise UsageError("--batch-size 1: BatchNorm needs at least 2 examples per batch in training; give 2 or more")
        for name, value, ok in (("epochs", self.epochs, self.epochs >= 1),
                                ("batch size", self.batch_size, self.batch_size >= 1),
                                ("learning rate", self.lr, self.lr > 0), ("width", self.width, self.width > 0),
                                ("label smoothing", self.label_smoothing, 0.0 <= self.label_smoothing < 1.0),
                                ("drop-path probability", self.drop_path, 0.0 <= self.drop_path < 1.0),
                                ("cutout", self.cutout, self.cutout >= 0),
                                ("gradient clip", self.grad_clip, self.grad_clip >= 0.0)):
            if not ok:
                raise IrepError("invalid {}: {}".format(name, value))
        if self.amp not in AMP_MODES:
            raise IrepError("invalid --amp {!r} (choose from {})".format(self.amp, ", ".join(AMP_MODES)))
        if self.device_data not in DEVICE_DATA_MODES:
            raise IrepError("invalid --device-data {!r} (choose from {})".format(
                self.device_data, ", ".join(DEVICE_DATA_MODES)))


#: The paper's retraining recipes (docs/training.md, "Presets"). CIFAR-10 (section 4.1): DARTS's
#: recipe (600 epochs, batch 96, SGD momentum 0.9, weight decay 3e-4, cosine to 0, cutout 16,
#: gradient norm clipped at 5) with the paper's lr 0.05 and drop-path 0.08; DARTS's auxiliary head
#: is not built. ImageNet (section 4.2): 120 epochs with ResNet's augmentation; batch, lr, momentum
#: and weight decay are ResNet's, the schedule stays cosine. A field left out is TrainConfig's default.
TRAIN_PRESETS: Dict[str, Dict[str, Any]] = {
    "paper-cifar": dict(dataset="cifar10", epochs=600, batch_size=96, lr=0.05, momentum=0.9, weight_decay=3e-4,
                        drop_path=0.08, cutout=16, grad_clip=5.0),
    "paper-imagenet": dict(dataset="imagenet", epochs=120, batch_size=256, lr=0.1, momentum=0.9, weight_decay=1e-4),
}


def make_train_config(preset: Optional[str] = None, **given: Any) -> TrainConfig:
    """The settings of a new run: ``preset``'s (none: TrainConfig's defaults), overridden by every
    value in ``given`` that is not None (flags given explicitly)."""
    if preset is not None and preset not in TRAIN_PRESETS:
        raise UsageError("unknown preset {!r} (known: {})".format(preset, ", ".join(TRAIN_PRESETS)))
    values = dict(TRAIN_PRESETS[preset]) if preset is not None else {}
    values.update({k: v for k, v in given.items() if v is not None})
    return TrainConfig(**values)


def drop_path_at(config: TrainConfig, epoch: int) -> float:
    """The drop-path probability of ``epoch`` (from 0): DARTS's linear ramp, ``drop_path * epoch / epochs``
    (a function of the epoch alone, so a resumed run drops exactly as an uninterrupted one)."""
    return config.drop_path * epoch / config.epochs


def arch_setting(path: PathLike, backbone: Optional[str] = None) -> Tuple[str, str]:
    """The ``arch`` and ``backbone`` settings of a run on the code file at ``path``: the code's text,
    and the network, which a model spec the code records does not name by itself (``backbone``, what
    the user named, must; :func:`~irep_deploy.models.external.named_spec`)."""
    code = ArchCode.load(path)
    return code.dumps(), named_spec(code.backbone, backbone, str(path), ArchMismatchError)


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
    branches: bool = True  # False for a plain network (no architecture code): "multi_branch" is it as trained


# -- training ---------------------------------------------------------------------------------------
def train(run_dir: PathLike, config: Optional[TrainConfig] = None, resume: bool = False,
          data_root: Optional[str] = None, device: str = "auto", workers: int = 0, progress: bool = True,
          on_epoch_end: Optional[Callable[[int, Dict[str, Any]], None]] = None,
          channels_last: bool = False, model: Optional[str] = None, trust_pickle: bool = False,
          cuda_graph: str = "auto") -> TrainReport:
    """Train a multi-branch network (the pipeline's data + arch.bin -> ckpt.pt step).

    New run: ``config`` says what to train; ``run_dir`` must not hold a run yet. ``resume=True``:
    continue the run in ``run_dir`` with its saved settings (``config`` must then be None or equal).
    ``data_root``, ``device``, ``workers`` and ``progress`` are where/how, not what, and may change
    between a run and its resume. ``on_epoch_end(epoch, record)`` is called (every rank) after each
    epoch's state is saved; an exception from it stops the run, which stays resumable.
    ``channels_last`` stores activations and weights NHWC (faster convolutions on recent GPUs).
    ``model``: on resume, the network the user names; required (and must be the same) when the run's
    settings name a model spec, since a file never decides what is imported.
    Under torchrun (WORLD_SIZE > 1) every process calls this; only rank 0 writes files.
    ``trust_pickle``: read old pickle-format files (a state of an earlier version, ``--weights``,
    ``--init-from``) on torch < 2.10 too, whose unpickler can run code even with ``weights_only``.
    ``cuda_graph``: ``auto`` (default) captures each training step as one CUDA graph where
    :func:`~irep_deploy.graphs.capture_refusal` finds no reason against it (else trains eagerly and,
    with ``progress`` on a GPU, says why on stderr), ``on`` requires it (a reason against is a usage
    error), ``off`` never captures. Like ``channels_last`` it is how, not what: it may change on resume.
    """
    run = Path(run_dir)
    if not resume:
        config = _new_run_config(run, config)
    # one writer per run (rank 0 writes for all); a failed start leaves no run directory behind
    with run_directory(run, keep=lambda p: state_path(p).exists(), command="train",
                       new=not resume) if launched_main() else contextlib.nullcontext(run):
        state, saved = None, None
        if resume:
            state, saved = read_run_state(run, "train", TrainConfig, config, model, trust_pickle)
            validate_train_state(state, saved, state_path(run))
        # Deterministic kernels are switched on before the device is touched (cuBLAS reads its setting once).
        settings = saved or config
        with deterministic_mode(settings is not None and settings.deterministic):
            dev = resolve_device(device)
            dist = init_distributed(dev)
            try:
                assert settings is not None
                capture = _capture(cuda_graph, dev, dist, settings, progress)
                return _train(run, config, state, saved, data_root, dev, dist, workers, progress, on_epoch_end,
                              channels_last, trust_pickle, capture)
            finally:
                close_distributed(dist)


def _capture(mode: str, dev: torch.device, dist: Dist, config: TrainConfig, progress: bool) -> bool:
    """Whether the run's steps are captured as CUDA graphs (``train``'s ``cuda_graph``), decided
    before anything is written; ``auto`` refused on a GPU says why (a CPU run needs no word)."""
    refusal = capture_refusal(dev, dist, config.deterministic)
    capture = resolve_cuda_graph(mode, refusal)
    if mode == "auto" and refusal is not None and progress and dist.main and dev.type == "cuda":
        print("training without CUDA graphs: " + refusal, file=sys.stderr, flush=True)
    return capture


def _new_run_config(run: Path, config: Optional[TrainConfig]) -> TrainConfig:
    """The checked settings of a new run in ``run``; refusals that need no data come first."""
    if config is None:
        raise IrepError("train needs settings (a TrainConfig) for a new run")
    config = dataclasses.replace(config)
    config.check()
    if state_path(run).exists():
        raise IrepError("{}: already holds a training run; continue it with --resume {} or choose another "
                        "directory".format(run, run))
    if run.exists() and not run.is_dir():
        raise IrepError("{}: exists and is not a directory".format(run))
    return config


def _train(run: Path, config: Optional[TrainConfig], state: Optional[Dict[str, Any]], saved: Optional[TrainConfig],
           data_root: Optional[str], dev: torch.device, dist: Dist, workers: int, progress: bool,
           on_epoch_end: Optional[Callable[[int, Dict[str, Any]], None]], channels_last: bool,
           trust_pickle: bool = False, capture: bool = False) -> TrainReport:
    if saved is not None:  # read_run_state refused a config that differs from it
        config = saved
    assert config is not None
    if config.batch_size % dist.world_size or config.batch_size // dist.world_size < 2:
        raise UsageError("batch size {} does not split evenly over {} processes into batches of at least 2 (what "
                         "BatchNorm needs)".format(config.batch_size, dist.world_size))

    # Data errors come before anything is written: a failed start leaves no run directory behind.
    data = load_data(config.dataset, data_root, val_fraction=config.val_fraction, split_seed=config.split_seed,
                     limit=config.limit, cutout=config.cutout)
    if len(data.train) < config.batch_size:  # type: ignore[arg-type]
        raise IrepError("the training split has {} examples, fewer than one batch of {}".format(
            len(data.train), config.batch_size))  # type: ignore[arg-type]

    torch.manual_seed(config.seed)  # the same initial weights on every rank and every run of this seed
    model = build_run_model(config.backbone, data, config.width, arch=config.code(), model_kwargs=config.model_kwargs,
                            weights=config.weights if state is None else None,  # a resume loads its own state
                            include=config.include, exclude=config.exclude, trust_pickle=trust_pickle)
    data = data.with_channels(model.irep_config["in_channels"])
    per_rank = config.batch_size // dist.world_size
    pin = dev.type == "cuda"
    loader = training_batches(config.device_data, config.dataset, data.train, per_rank, config.seed, dev, dist.rank,
                              dist.world_size, workers, pin)
    val_loader = eval_loader(data.val, per_rank, workers, dist.rank, dist.world_size, pin) if data.val else None
    test_loader = eval_loader(data.test, per_rank, workers, dist.rank, dist.world_size, pin)
    if config.init_from and state is None:
        init_from_torchvision(model, config.init_from, trust_pickle)
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
        path = state_path(run)
        load_part(path, "model", lambda: model.load_state_dict(state["model"], strict=True))
        load_part(path, "optimizer state", lambda: optimizer.load_state_dict(state["optimizer"]))
        load_part(path, "scheduler state", lambda: scheduler.load_state_dict(state["scheduler"]))
        if scaler is not None and state.get("scaler"):
            load_part(path, "gradient scaler state", lambda: scaler.load_state_dict(state["scaler"]))
        set_rng_state(state["rng"])
        start, history = state["epoch"], list(state["history"])
        if dist.main:
            trim_jsonl(run / "log.jsonl", lambda r: r.get("event") == "epoch" and r.get("epoch", 0) <= start)
    elif dist.main:
        code = config.code() or ArchCode.empty(config.backbone, model.irep_config["ops"])
        code.save(run / "arch.bin")
        write_json(run / "config.json", dataclasses.asdict(config))
        _save_state(run, config, 0, model, optimizer, scheduler, history, scaler)
    barrier(dist)

    # A block with no active branch never uses its alpha/beta: DDP must be told to expect that.
    net = wrap_ddp(model, dev, dist, find_unused=any(not block.active for _, block in searchable_layers(model)))
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    loss_of = _loss_fn(net, criterion)
    # Captured steps (graphs.py): switched after the states are loaded, since a load puts float lrs back.
    schedule = make_capturable([optimizer], scheduler, dev) if capture else None
    graph = StepGraph(make_train_step(loss_of, [optimizer], schedule, dev, scaler, config.amp, config.grad_clip),
                      dev) if schedule is not None else None

    for epoch in range(start, config.epochs):
        set_epoch(loader, config.seed, epoch)
        torch.manual_seed(epoch_seed(config.seed, epoch, dist.rank))  # augmentation, dropout, drop-path
        set_drop_path(model, drop_path_at(config, epoch))
        if graph is not None and config.drop_path:
            graph.reset()  # the probability is a Python float the captured step holds: capture this epoch's
        record = _train_epoch(net, loader, optimizer, scheduler, loss_of, dev, dist, epoch, config, progress, run,
                              scaler, layout, graph, schedule)
        if val_loader is not None:
            broadcast_buffers(model, dist)
            (val,), _, _ = evaluate_models([model], val_loader, dev, dist)
            record.update(val_top1=val.top1, val_top5=val.top5, val_loss=val.loss)
        history.append(record)
        if dist.main:
            _save_state(run, config, epoch + 1, model, optimizer, scheduler, history, scaler, schedule)
            append_jsonl(run / "log.jsonl", record)
            if progress:
                print(_epoch_line(record, config.epochs), flush=True)
        barrier(dist)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)

    test_batches = progress_bar(test_loader, desc="test: multi-branch and fused", enabled=progress and dist.main,
                                unit="batch")
    return _finish(run, config, model, test_batches, dev, dist, start, history, data)


def validate_train_state(state: Dict[str, Any], config: TrainConfig, path: Path) -> None:
    """Everything a resume uses from ``state`` (read by runs.read_run_state), checked before any of it
    is used: the settings, the finished epochs, the parts' types and the RNG states. A damaged or
    edited file is one line naming it; whether the parts fit the network is checked as they load."""
    check_settings(config, path)
    epoch = check_epoch(state, config.epochs, path)
    check_tensors(state, "model", path)
    for key in ("optimizer", "scheduler"):
        state_part(state, key, dict, path)
    history = state_part(state, "history", list, path)
    if len(history) != epoch or not all(isinstance(r, dict) for r in history):
        raise CheckpointError("{}: the run state's history does not hold one record per finished epoch ({})".format(
            path, epoch))
    if state.get("scaler") is not None:
        state_part(state, "scaler", dict, path)
    rng = state_part(state, "rng", dict, path)
    current = rng_state()
    try:  # the states are set exactly as the resume will set them, then put back
        set_rng_state(rng)
    except Exception as exc:  # whatever a damaged entry makes torch, numpy or random raise
        raise CheckpointError("{}: the run state's random-number states are unusable ({}: {})".format(
            path, type(exc).__name__, first_line(exc, 100))) from exc
    finally:
        set_rng_state(current)


def _save_state(run: Path, config: TrainConfig, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: Any, history: List[Dict[str, Any]], scaler: Any = None,
                schedule: Optional[DeviceSchedule] = None) -> None:
    # a captured run saves the optimizer as the eager run would (float lr, unfused): either resumes it
    opt_state = schedule.state_dict(optimizer) if schedule is not None else optimizer.state_dict()
    write_run_state(run, "train", config, epoch=epoch, model={k: v.detach().cpu() for k, v in model.state_dict().items()},
                    optimizer=opt_state, scheduler=scheduler.state_dict(), rng=rng_state(),
                    history=history, scaler=scaler.state_dict() if scaler is not None else None)


def _loss_fn(net: nn.Module, criterion: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]:
    def loss_of(x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        out = net(x)
        return criterion(out.float(), y), out
    return loss_of


def _train_epoch(net: nn.Module, loader: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                 loss_of: Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]],
                 dev: torch.device, dist: Dist, epoch: int, config: TrainConfig,
                 progress: bool, run: Path, scaler: Any = None,
                 layout: torch.memory_format = torch.contiguous_format, graph: Optional[StepGraph] = None,
                 schedule: Optional[DeviceSchedule] = None) -> Dict[str, Any]:
    desc = "epoch {}/{}".format(epoch + 1, config.epochs)
    if graph is not None and schedule is not None:
        totals = run_graph_epoch(graph, loader, schedule, dev, dist, net, layout, desc, progress)
    else:
        totals = run_epoch(net, loader, loss_of, [optimizer], scheduler, dev, dist, scaler, config.amp, layout,
                           desc, progress, config.grad_clip)
    if totals.diverged is not None:
        raise TrainingDiverged(totals.divergence(epoch, state_path(run)))
    record = {"event": "epoch", "epoch": epoch + 1, "train_loss": totals.loss, "train_top1": totals.top1,
              "lr": scheduler.get_last_lr()[0], "seconds": totals.seconds, "cpu_seconds": totals.cpu_seconds,
              "examples": totals.examples}
    if config.drop_path:
        record["drop_path"] = drop_path_at(config, epoch)
    if graph is not None:
        record["cuda_graph"] = True  # the steps were captured (how, not what: absent when eager)
    return record


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
    barrier(dist)
    if not err <= FUSED_TOLERANCE:
        raise VerificationError("fused model differs from the multi-branch model on the test set: relative logit "
                                "error {:.3g} > {:.0e} ({} wrote the multi-branch checkpoint)".format(
                                    err, FUSED_TOLERANCE, ckpt))
    return TrainReport(str(run), str(ckpt), config.epochs, start, multi, plain, err, disagree, history, dist.main,
                       config.arch is not None)
