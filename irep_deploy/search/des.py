"""Algorithm 1: the directional evolutionary strategy, resumable, one process or torchrun.

Warm-up epochs train the SuperNet on codes drawn from the initial population; then every round runs
``round_epochs`` epochs in which each mini-batch trains B codes of the population with one averaged
step (Eq. 3-5), scores every code *fused* on a validation split carved out of the training set,
and forms the next population (kept parents, SuperNet samples by Eq. 8-10, crossover/mutation).

All randomness of an epoch (data order, augmentation, which codes each batch trains) and of a
round's evolution is seeded from (seed, epoch) or (seed, round) alone, so a run resumed from its
last saved state (written atomically after every epoch) ends exactly where an uninterrupted run
with the same seed ends (on CUDA only with ``deterministic``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from tqdm import tqdm

from .._io import atomic_write, run_directory, trim_jsonl, write_json, writing
from ..arch import ArchCode
from ..checkpoint import save_checkpoint
from ..data import eval_loader, epoch_seed, load_data, set_epoch, train_loader
from ..devicedata import MODES as DEVICE_DATA_MODES, training_batches
from ..errors import CheckpointError, IrepError, UsageError, TrainingDiverged, first_line, raise_if_interrupted
from ..evaluation import topk_hits
from ..models import MODELS, is_spec
from ..ops import SPACES
from .. import options as opt
from ..data import DATASETS
from ..ops import REGISTRY
from ..options import BACKBONE_HELP, DEVICE_DATA_HELP, SEARCH_STEPS, model_setting, setting
from ..progress import bar
from ..runs import (build_run_model, check_epoch, check_model_settings, check_settings, check_tensors, load_part,
                    read_run_state, state_part, state_path, write_run_state)
from ..runtime import (AMP_MODES, Dist, all_reduce, broadcast_buffers, close_distributed, deterministic_mode,
                       init_distributed, launched_main, make_scaler, resolve_device, wrap_ddp)
from ..steps import run_epoch
from ..graphs import DeviceSchedule, StepGraph, capture_refusal, resolve_cuda_graph, run_graph_epoch
from .population import SAMPLERS, STRATEGIES, EvolutionConfig, initial_population, next_population
from .answer import explain
from .records import (ALPHA_BETA_FILE, ANSWER_FILE, BEST_SEEN_FILE, LOG_FILE, POPULATION_FILE, AlphaBetaRecord,
                      BestSeen, EpochRecord, LogRecord, Population, PopulationCode, RoundRecord, append_record,
                      write_population)
from .static_step import StaticSearchStep, graphed_step, static_step_refusal
from .supernet import SuperNet, averaged_loss, fuse_code

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class SearchConfig:
    """Everything that decides what a search computes (saved in the run; a resume uses it as saved).

    Defaults are the paper's CIFAR-10 search (section 4.1: population 128, B = 5, C = 2/3, 500
    epochs; weights SGD lr 0.1, alpha/beta Adam lr 1e-4, betas (0.5, 0.999); p_mut = p_cross = 0.5);
    where the paper is silent (the warm-up, how the epochs split into rounds, the batch size) they are
    our choices, named in docs/search.md. ``budget`` is the ratio C / (available branches).
    ``batch_size`` is global.
    """

    backbone: str = setting("resnet18_cifar", BACKBONE_HELP, flags=("--model", "--backbone"), metavar="SPEC")
    dataset: str = setting("fashion-mnist", "%(choices)s", choices=DATASETS, metavar="NAME")
    width: float = setting(1.0, "channel width multiplier (built-in backbones; a --model network keeps its own)",
                           type=opt.WIDTH)
    ops: Optional[List[str]] = setting(None, "the op space, the branch types a block may have (default: the "
                                             "backbone's space)", choices=tuple(REGISTRY), nargs="+", metavar="OP")
    population: int = setting(128, "population size", type=opt.int_in(2, 100000))
    subnets: int = setting(5, "B, codes trained per mini-batch (paper: 5 CIFAR, 1 ImageNet)",
                           type=opt.int_in(1, 10000))
    budget: float = setting(2 / 3, "C as a ratio of all available branches (paper: 2/3 or 1/2)",
                            type=opt.float_in(0.0, 1.0, lo_open=True))
    # 25 + 95 x 5 = the paper's 500 CIFAR epochs; the split is ours (docs/search.md, "Presets")
    warmup_epochs: int = setting(25, "E_warm, epochs of SuperNet warm-up before the first round",
                                 type=opt.int_in(0, 100000))
    rounds: int = setting(95, "evolution rounds", type=opt.EPOCHS)
    round_epochs: int = setting(5, "E_p, epochs per round (search epochs in all: warm-up + rounds x E_p)",
                                type=opt.EPOCHS)
    batch_size: int = setting(128, "global batch size", type=opt.GLOBAL_BATCH)
    lr: float = setting(0.1, "SGD learning rate of the weights", type=opt.POSITIVE)
    momentum: float = setting(0.9, "SGD momentum of the weights", type=opt.FRACTION)
    weight_decay: float = setting(5e-4, "weight decay of the weights", type=opt.NON_NEGATIVE)
    arch_lr: float = setting(1e-4, "Adam learning rate of alpha/beta", type=opt.POSITIVE)
    arch_betas: Tuple[float, float] = setting((0.5, 0.999), "Adam betas of alpha/beta, as B1,B2",
                                              type=opt.float_pair(0.0, 1.0, hi_open=True), metavar="B1,B2")
    p_cross: float = setting(0.5, "crossover probability", type=opt.float_in(0.0, 1.0))
    p_mut: float = setting(0.5, "mutation probability", type=opt.float_in(0.0, 1.0))
    keep: float = setting(0.25, "share of the population kept as parents each round", type=opt.float_in(0.0, 1.0))
    sampled: float = setting(0.25, "share of the next population sampled from the SuperNet (Eq. 8-10)",
                             type=opt.float_in(0.0, 1.0))
    sampler: str = setting("directional", "how the --sampled share is drawn: directional (Eq. 8-10, from alpha/beta) "
                                          "or uniform (random codes of the same size; the ablation)", choices=SAMPLERS)
    strategy: str = setting("des", "des (Algorithm 1) or random (random search: every round scores fresh random "
                                   "codes at the budget, same SuperNet training and number of evaluations)",
                            choices=STRATEGIES)
    val_fraction: float = setting(0.1, "fraction of the training set held out to score codes",
                                  type=opt.float_in(0.0, 1.0, lo_open=True, hi_open=True))
    split_seed: int = setting(0, "seed of the train/val split", type=opt.SEED)
    limit: Optional[int] = setting(None, "use at most N examples per split (CPU-scale runs)", type=opt.COUNT,
                                   metavar="N")
    eval_batch_size: int = setting(256, "batch size of the fitness evaluation", type=opt.GLOBAL_BATCH)
    recalibrate: int = setting(0, "training batches that re-estimate each code's BatchNorm statistics before it is "
                                  "scored (0: score with the SuperNet's own statistics, as the paper does)",
                               type=opt.int_in(0, 100000), metavar="N")
    seed: int = setting(0, "seed of the SuperNet, the populations and the data order", type=opt.SEED)
    amp: str = setting("none", "autocast the SuperNet forward (fp16: CUDA only, with a gradient scaler)",
                       choices=AMP_MODES)
    channels_last: bool = setting(False, "NHWC activations and weights (faster convolutions on recent GPUs)")
    deterministic: bool = setting(False, "deterministic cuDNN/cuBLAS kernels (slower on GPUs): a resumed CUDA "
                                         "search ends bit-identical")
    # a model spec's settings (see TrainConfig); ``backbone`` may be a spec, whose default op space is SPACES["any"]
    model_kwargs: Optional[Dict[str, Any]] = model_setting("model_kwargs")
    weights: Optional[str] = model_setting("weights")
    include: Optional[List[str]] = model_setting("include")
    exclude: Optional[List[str]] = model_setting("exclude")
    device_data: str = setting("auto", DEVICE_DATA_HELP, choices=DEVICE_DATA_MODES)
    #: Searches saved before ``device_data`` existed read their training split with a DataLoader.
    SETTINGS_BEFORE: ClassVar[Dict[str, Any]] = {"device_data": "off"}

    def check(self) -> None:
        check_model_settings(self.backbone, self.width, self.model_kwargs, self.weights, self.include, self.exclude)
        if self.batch_size == 1:  # train-mode BatchNorm normalises over the batch: one example has no spread
            raise UsageError("--batch-size 1: BatchNorm needs at least 2 examples per batch in training; give 2 or more")
        for name, value, ok in (
                ("population", self.population, self.population >= 2),
                ("subnets (B)", self.subnets, self.subnets >= 1),
                ("budget", self.budget, 0.0 < self.budget <= 1.0),
                ("rounds", self.rounds, self.rounds >= 1),
                ("round epochs", self.round_epochs, self.round_epochs >= 1),
                ("warm-up epochs", self.warmup_epochs, self.warmup_epochs >= 0),
                ("batch size", self.batch_size, self.batch_size >= 1),
                ("width", self.width, self.width > 0),
                ("validation fraction", self.val_fraction, 0.0 < self.val_fraction < 1.0),
                ("amp", self.amp, self.amp in AMP_MODES),
                ("device data", self.device_data, self.device_data in DEVICE_DATA_MODES),
                ("sampler", self.sampler, self.sampler in SAMPLERS),
                ("strategy", self.strategy, self.strategy in STRATEGIES)):
            if not ok:
                raise IrepError("invalid {}: {}".format(name, value))

    @property
    def total_epochs(self) -> int:
        return self.warmup_epochs + self.rounds * self.round_epochs

    def evolution(self) -> EvolutionConfig:
        return EvolutionConfig(population=self.population, keep=self.keep, sampled=self.sampled,
                               p_cross=self.p_cross, p_mut=self.p_mut, sampler=self.sampler)


#: Named settings. The ``paper-*`` presets are the paper's searches (section 4.1: CIFAR-10, 500
#: epochs; section 4.2: ImageNet, 100 epochs with E_warm = 5, B = 1, C = 1/2, batch 256, the space
#: without dil2x2, whatever the backbone); a field a preset leaves out is SearchConfig's default
#: (the paper's CIFAR setting or our named choice). docs/search.md's preset table is checked against
#: this dict. ``cpu`` finishes a real Fashion-MNIST search on 2 cores in a few minutes.
PRESETS: Dict[str, Dict[str, Any]] = {
    "paper-cifar": dict(backbone="resnet18_cifar", dataset="cifar10"),
    # 5 + 19 x 5 = 100 epochs
    "paper-imagenet": dict(backbone="resnet18", dataset="imagenet", subnets=1, budget=0.5, batch_size=256,
                           warmup_epochs=5, rounds=19, round_epochs=5, ops=list(SPACES["resnet_imagenet"])),
    # a preset's width applies to the built-in backbones only (make_config)
    "cpu": dict(backbone="resnet18_cifar", dataset="fashion-mnist", width=0.125, population=16, subnets=2,
                warmup_epochs=1, rounds=4, round_epochs=1, batch_size=64, limit=6000, eval_batch_size=500),
}


def make_config(preset: Optional[str] = None, **overrides: Any) -> SearchConfig:
    if preset is not None and preset not in PRESETS:
        raise IrepError("unknown preset {!r} (known: {})".format(preset, ", ".join(PRESETS)))
    values = dict(PRESETS[preset]) if preset is not None else {}
    if is_spec(overrides.get("backbone") or ""):
        values.pop("width", None)  # a spec network keeps its own channels
    values.update({k: v for k, v in overrides.items() if v is not None})
    config = SearchConfig(**values)
    config.check()
    return config


@dataclass
class SearchReport:
    """``best``: the answer (``arch.bin``), the best code of the final round; ``best_seen``: the
    best-scoring code of any round (``best_seen_arch.bin``), scored in ``best_seen_round``."""

    run_dir: str
    best: ArchCode
    best_fitness: float
    rounds: List[Dict[str, Any]] = field(default_factory=list)
    resumed_from_epoch: int = 0
    main_process: bool = True
    best_seen: Optional[ArchCode] = None
    best_seen_fitness: Optional[float] = None
    best_seen_round: Optional[int] = None

    def answer(self, where: Optional[str] = None) -> str:
        """The line that says which code is the answer and why (search.answer.explain); the files are
        named under ``where`` (default: the run directory)."""
        seen = None if self.best_seen is None else BestSeen(
            self.best_seen_round or 0, self.best_seen_fitness or 0.0, self.best_seen.count(),
            _codes_to_data([self.best_seen])[0])
        return explain(len(self.rounds), self.best_fitness, _codes_to_data([self.best])[0], seen,
                       "{}{}".format(self.run_dir, os.sep) if where is None else where)


# -- state ------------------------------------------------------------------------------------------
def _codes_to_data(codes: Sequence[ArchCode]) -> List[List[str]]:
    return [["".join(map(str, row)) for row in c.bits] for c in codes]


def _codes_from_data(template: ArchCode, data: Sequence[Sequence[str]]) -> List[ArchCode]:
    return [template.with_bits([[int(ch) for ch in row] for row in rows]) for rows in data]


# -- the step ---------------------------------------------------------------------------------------
def plan_step(search_step: str, cuda_graph: str, supernet: SuperNet, dev: torch.device, dist: Dist,
              config: SearchConfig) -> Tuple[Optional[str], bool]:
    """(static layout or None for the eager step, capture) of a search's training steps.

    The eager step switches branches in Python between the B subnets, so only the static step can
    be captured; capture needs what ``train``'s does (graphs.capture_refusal). A mode given
    explicitly that cannot apply is a one-line usage error; ``auto`` falls back to the eager step."""
    if search_step not in SEARCH_STEPS:
        raise UsageError("--search-step {!r}: choose from {}".format(search_step, ", ".join(SEARCH_STEPS)))
    refusal = static_step_refusal(supernet)
    if refusal is None and dist.enabled:
        refusal = "it trains the SuperNet without DDP's gradient all-reduce ({} processes)".format(dist.world_size)
    if search_step in ("sequential", "batched") and refusal is not None:
        raise UsageError("--search-step {}: the static step does not apply here: {}".format(search_step, refusal))
    capture_no = capture_refusal(dev, dist, config.deterministic)
    if capture_no is None and refusal is not None:
        capture_no = "the static search step does not apply: " + refusal
    if capture_no is None and search_step == "eager":
        capture_no = "--search-step eager switches branches in Python between subnets (only the static step is captured)"
    capture = resolve_cuda_graph(cuda_graph, capture_no)
    if search_step == "auto":
        return ("batched" if capture else None), capture
    return (None if search_step == "eager" else search_step), capture


# -- the driver -------------------------------------------------------------------------------------
#: Host memory the decoded validation split may take when it stays in memory for the whole search (CPU).
VAL_CACHE_HOST_BYTES = 2 << 30
#: Share of the GPU's free memory it may take on the device.
VAL_CACHE_GPU_SHARE = 0.25

Batches = List[Tuple[torch.Tensor, torch.Tensor]]


def recalibration_batches(dataset: Any, batch_size: int, count: int, seed: int, dev: torch.device,
                          layout: torch.memory_format = torch.contiguous_format) -> List[torch.Tensor]:
    """``count`` augmented training batches, a function of ``seed`` alone, on ``dev``: what
    ``recalibrate`` re-estimates BatchNorm statistics on. The caller's random stream is left as it was."""
    seed = epoch_seed(seed, -2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # augmentation draws from the global generator
        loader = train_loader(dataset, batch_size, seed)
        return [x.to(dev).contiguous(memory_format=layout) for x, _ in itertools.islice(loader, count)]


class _Search:
    def __init__(self, run: Path, config: SearchConfig, dev: torch.device, dist: Dist, data_root: Optional[str],
                 progress: bool, workers: int = 0, resuming: bool = False, trust_pickle: bool = False,
                 search_step: str = "eager", cuda_graph: str = "off") -> None:
        self.run, self.config, self.dev, self.dist, self.progress = run, config, dev, dist, progress
        data = load_data(config.dataset, data_root, val_fraction=config.val_fraction,
                         split_seed=config.split_seed, limit=config.limit, parts=("train", "val"))
        ops = config.ops or list(SPACES["any" if is_spec(config.backbone) else MODELS[config.backbone].space])
        torch.manual_seed(config.seed)  # identical SuperNet initialisation on every rank
        model = build_run_model(config.backbone, data, config.width, ops=ops, supernet=True,
                                model_kwargs=config.model_kwargs, include=config.include,
                                weights=None if resuming else config.weights,  # a resume loads its own state
                                exclude=config.exclude, trust_pickle=trust_pickle).to(dev)
        self.data = data.with_channels(model.irep_config["in_channels"])
        self.layout = torch.channels_last if config.channels_last else torch.contiguous_format
        model = model.to(memory_format=self.layout)
        self.scaler = make_scaler(config.amp, dev)
        self.supernet = SuperNet(model)
        self.template = ArchCode.full(config.backbone, ops)
        self.budget = self.template.budget(config.budget)
        # branches no sampled code uses get no gradient
        self.net = wrap_ddp(self.supernet, dev, dist, find_unused=True)
        per_rank = config.batch_size // dist.world_size
        if per_rank < 2:
            raise UsageError("batch size {} over {} processes leaves fewer than the 2 examples per batch BatchNorm "
                             "needs".format(config.batch_size, dist.world_size))
        pin = dev.type == "cuda"
        self.loader = training_batches(config.device_data, config.dataset, self.data.train, per_rank, config.seed, dev,
                                       dist.rank, dist.world_size, workers, pin)
        self.val_loader = eval_loader(self.data.val, config.eval_batch_size, workers, pin_memory=pin)
        self._val_cache: Optional[Batches] = None  # the decoded validation split, when it fits
        self._recal: Optional[List[torch.Tensor]] = None  # the batches that recalibrate BatchNorm
        self.w_opt = torch.optim.SGD(self.supernet.weight_parameters(), lr=config.lr, momentum=config.momentum,
                                     weight_decay=config.weight_decay)
        self.a_opt = torch.optim.Adam(self.supernet.arch_parameters(), lr=config.arch_lr,
                                      betas=tuple(config.arch_betas))
        steps = max(1, len(self.loader)) * config.total_epochs
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.w_opt, T_max=steps)
        self.criterion = nn.CrossEntropyLoss()
        self.epoch = 0
        self.population = initial_population(self.template, config.population, self.budget,
                                             random.Random(epoch_seed(config.seed, -1)))
        self.fitness: Optional[List[float]] = None
        self.rounds: List[Dict[str, Any]] = []
        self.history: Dict[str, List[List[float]]] = {}  # code key -> [[round, fitness], ...]
        self.best_seen: Optional[Dict[str, Any]] = None  # {"round", "fitness", "bits"}: highest fitness of any round
        self.writer = self._tensorboard() if dist.main else None
        self.static, self.capture = plan_step(search_step, cuda_graph, self.supernet, dev, dist, config)
        self._stepper: Optional[StaticSearchStep] = None  # built at the first epoch, after a resume's loads
        self._graph: Optional[StepGraph] = None
        self._schedule: Optional[DeviceSchedule] = None

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # optional extra
            return None
        with writing(self.run / "tensorboard"):
            return SummaryWriter(str(self.run / "tensorboard"))

    # state
    def state(self) -> Dict[str, Any]:
        """What state.pt holds besides the format header and the settings (runs.write_run_state)."""
        return {
            "epoch": self.epoch, "model": self.supernet.model.state_dict(), "w_opt": self._opt_state(self.w_opt),
            "a_opt": self._opt_state(self.a_opt), "sched": self.sched.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "population": _codes_to_data(self.population), "fitness": self.fitness, "rounds": self.rounds,
            "history": self.history, "best_seen": self.best_seen,
        }

    def _opt_state(self, opt: torch.optim.Optimizer) -> Dict[str, Any]:
        # a static or captured step saves its optimizers as the eager step would (float lr, unfused)
        return self._schedule.state_dict(opt) if self._schedule is not None else opt.state_dict()

    def restore(self, state: Dict[str, Any]) -> None:
        """Continue from ``state`` (checked by :func:`validate_search_state`); a part that does not fit
        the network of the run's settings is one line naming the file."""
        path = state_path(self.run)
        load_part(path, "SuperNet", lambda: self.supernet.model.load_state_dict(state["model"]))
        load_part(path, "weight optimizer state", lambda: self.w_opt.load_state_dict(state["w_opt"]))
        load_part(path, "alpha/beta optimizer state", lambda: self.a_opt.load_state_dict(state["a_opt"]))
        load_part(path, "scheduler state", lambda: self.sched.load_state_dict(state["sched"]))
        if self.scaler is not None and state.get("scaler"):
            load_part(path, "gradient scaler state", lambda: self.scaler.load_state_dict(state["scaler"]))
        self.epoch = state["epoch"]
        try:
            self.population = _codes_from_data(self.template, state["population"])
        except (ValueError, IrepError) as exc:  # rows or bits that are not the network's
            raise CheckpointError("{}: the saved population does not fit the run's network ({})".format(
                path, first_line(exc, 120))) from exc
        self.fitness = state["fitness"]
        self.rounds = list(state["rounds"])
        self.history = {k: [list(v) for v in vs] for k, vs in state["history"].items()}
        # a state of an earlier version has no best_seen: the history holds every code's every score
        self.best_seen = state["best_seen"] if "best_seen" in state else _best_in_history(self.history)
        if self.best_seen is not None:
            try:
                _codes_from_data(self.template, [self.best_seen["bits"]])
            except (ValueError, IrepError) as exc:
                raise CheckpointError("{}: the saved best-seen code does not fit the run's network ({})".format(
                    path, first_line(exc, 120))) from exc
        trim_jsonl(self.run / "log.jsonl", lambda r: r.get("epoch", 0) <= self.epoch)
        trim_jsonl(self.run / "alpha_beta.jsonl", lambda r: r.get("round", 0) <= len(self.rounds))

    def save(self) -> None:
        if not self.dist.main:
            return
        write_run_state(self.run, "search", self.config, **self.state())

    def log(self, record: LogRecord) -> None:
        if self.dist.main:
            append_record(self.run / LOG_FILE, record)

    # training
    def train_epoch(self) -> EpochRecord:
        config, epoch = self.config, self.epoch
        torch.manual_seed(epoch_seed(config.seed, epoch, self.dist.rank))  # augmentation of this epoch
        set_epoch(self.loader, config.seed, epoch)
        picker = random.Random(epoch_seed(config.seed, epoch))  # same codes on every rank
        phase = "warmup" if epoch < config.warmup_epochs else "round {}".format(self._round_of(epoch))

        def draw() -> List[ArchCode]:
            return [self.population[picker.randrange(len(self.population))] for _ in range(config.subnets)]

        desc = "epoch {}/{} ({})".format(epoch + 1, config.total_epochs, phase)
        if self.static:
            graph, schedule, stepper = self._static_step()
            totals = run_graph_epoch(graph, self.loader, schedule, self.dev, self.dist, self.supernet, self.layout,
                                     desc, self.progress, extra=lambda step: (stepper.gates(draw()),))
        else:
            def loss_of(x: torch.Tensor, y: torch.Tensor):
                outputs = self.net(x, draw())
                return averaged_loss([o.float() for o in outputs], y, self.criterion), outputs[-1]

            totals = run_epoch(self.net, self.loader, loss_of, [self.w_opt, self.a_opt], self.sched, self.dev,
                               self.dist, self.scaler, config.amp, self.layout, desc, self.progress)
        if totals.diverged is not None:
            raise TrainingDiverged("search " + totals.divergence(epoch, state_path(self.run)))
        return EpochRecord(epoch=epoch + 1, phase=phase, train_loss=totals.loss, train_acc=totals.top1,
                           lr=self.sched.get_last_lr()[0])

    def _static_step(self) -> Tuple[StepGraph, DeviceSchedule, StaticSearchStep]:
        """The static step (static_step.py) with the device schedule, in a StepGraph that captures it
        where ``capture``; built once, after a resume has loaded the optimizers (graphs.make_capturable)."""
        if self._stepper is None:
            self._graph, self._schedule, self._stepper = graphed_step(
                self.supernet, self.w_opt, self.a_opt, self.sched, self.criterion, self.dev,
                batched=self.static == "batched", capture=self.capture, scaler=self.scaler, amp=self.config.amp)
        assert self._graph is not None and self._schedule is not None
        return self._graph, self._schedule, self._stepper

    def _round_of(self, epoch: int) -> int:
        return (epoch - self.config.warmup_epochs) // self.config.round_epochs + 1

    # population
    def _val_chunks(self) -> Iterator[Batches]:
        """The validation split as decoded, transformed batches on the device, in chunks that fit.

        The split uses the evaluation transforms, so it is the same every round: when it fits (all of
        CIFAR's or Fashion-MNIST's) it is decoded once per search and kept; otherwise (ImageNet) it is
        read once per round in chunks, and every code is scored on each chunk before the next is read.
        """
        if self._val_cache is not None:
            yield self._val_cache
            return
        if self.dev.type == "cuda":
            limit = int(torch.cuda.mem_get_info(self.dev)[0] * VAL_CACHE_GPU_SHARE)
        else:
            limit = VAL_CACHE_HOST_BYTES
        chunk: Batches = []
        size, whole = 0, True
        for x, y in self.val_loader:
            chunk.append((x.to(self.dev, non_blocking=True), y.to(self.dev, non_blocking=True)))
            size += x.numel() * x.element_size()
            if size >= limit:
                whole = False
                yield chunk
                chunk, size = [], 0
        if whole:
            self._val_cache = chunk
        if chunk:
            yield chunk

    def fused(self, code: ArchCode) -> nn.Module:
        """``code`` fused from the SuperNet, with its own BatchNorm statistics where ``recalibrate`` asks."""
        if self.config.recalibrate and self._recal is None:  # the same training batches for every code and round
            self._recal = recalibration_batches(self.data.train, self.loader.batch_size, self.config.recalibrate,
                                                self.config.seed, self.dev, self.layout)
        return fuse_code(self.supernet, code, self._recal)

    @torch.no_grad()
    def evaluate_population(self) -> List[float]:
        """Top-1 (percent) of every code, fused, on the validation split; codes split across ranks,
        results gathered. Every rank scores with rank 0's BatchNorm statistics."""
        broadcast_buffers(self.supernet.model, self.dist)
        mine = range(self.dist.rank, len(self.population), self.dist.world_size)
        correct = torch.zeros(len(self.population), dtype=torch.int64, device=self.dev)
        seen = 0
        with bar(total=len(mine), desc="search: scoring codes", enabled=self.progress and self.dist.main,
                 unit="code") as scored:
            for n, chunk in enumerate(self._val_chunks()):
                seen += sum(int(y.numel()) for _, y in chunk)
                if n:  # a split read in chunks scores every code again on each
                    scored.total += len(mine)
                for i in mine:
                    raise_if_interrupted()  # once per code scored: the split is cached after the first round
                    fused = self.fused(self.population[i])
                    for x, y in chunk:
                        correct[i] += topk_hits(fused(x).float(), y)[0].sum()
                    scored.update()
        # The same arithmetic as evaluate_models' top-1, so fitness values do not depend on the path.
        fitness = torch.tensor([100.0 * float(c) / max(seen, 1) if i in mine else 0.0
                                for i, c in enumerate(correct.tolist())], dtype=torch.float64)
        if self.dist.enabled:
            fitness = all_reduce(fitness.to(self.dev), self.dist).cpu()
        return fitness.tolist()

    def finish_round(self, round_no: int) -> RoundRecord:
        fitness = self.evaluate_population()
        self.fitness = fitness
        for code, f in zip(self.population, fitness):
            self.history.setdefault(_key(code), []).append([round_no, f])
        alpha, beta = self.supernet.alpha(), self.supernet.beta()
        best = max(range(len(fitness)), key=fitness.__getitem__)
        if self.best_seen is None or fitness[best] > self.best_seen["fitness"]:  # a tie keeps the earlier round
            self.best_seen = {"round": round_no, "fitness": fitness[best],
                              "bits": _codes_to_data([self.population[best]])[0]}
        counts = {op: sum(c.op_counts()[op] for c in self.population) for op in self.template.ops}
        record = RoundRecord(round=round_no, epoch=self.epoch, best_fitness=fitness[best],
                             mean_fitness=sum(fitness) / len(fitness), best_branches=self.population[best].count(),
                             population_op_counts=counts)
        self.rounds.append(record.to_dict())
        if self.dist.main:
            self.write_outputs(round_no, best, alpha, beta)
            self.tensorboard_round(record)
        if round_no < self.config.rounds:
            self.population = self.next_population(round_no, fitness, alpha, beta)
            self.fitness = None
        return record

    def next_population(self, round_no: int, fitness: List[float], alpha: torch.Tensor,
                        beta: torch.Tensor) -> List[ArchCode]:
        """The population of round ``round_no + 1``, seeded from (seed, round) alone (resumable)."""
        seed = self.config.seed
        if self.config.strategy == "random":  # nothing carried over: as many fresh codes as DES evaluates
            return initial_population(self.template, self.config.population, self.budget,
                                      random.Random(epoch_seed(seed, round_no, 3)))
        return next_population(self.population, fitness, self.budget, self.config.evolution(),
                               random.Random(epoch_seed(seed, round_no, 1)),
                               torch.Generator().manual_seed(epoch_seed(seed, round_no, 2)), alpha, beta)

    def write_outputs(self, round_no: int, best: int, alpha: torch.Tensor, beta: torch.Tensor) -> None:
        self.population[best].save(self.run / ANSWER_FILE)
        seen = self.best_seen_code()
        seen.save(self.run / BEST_SEEN_FILE)
        order = sorted(range(len(self.population)), key=lambda i: -self.fitness[i])
        ops, layers = list(self.template.ops), list(self.template.layers)
        assert self.best_seen is not None
        write_population(self.run / POPULATION_FILE, Population(
            round=round_no, budget=self.budget, ops=ops, layers=layers,
            codes=[PopulationCode(rank=r + 1, fitness=self.fitness[i], branches=self.population[i].count(),
                                  bits=_codes_to_data([self.population[i]])[0],
                                  history=[(h[0], h[1]) for h in self.history[_key(self.population[i])]])
                   for r, i in enumerate(order)],
            best_seen=BestSeen(round=self.best_seen["round"], fitness=self.best_seen["fitness"], branches=seen.count(),
                               bits=list(self.best_seen["bits"]))))
        append_record(self.run / ALPHA_BETA_FILE, AlphaBetaRecord(round=round_no, ops=ops, layers=layers,
                                                                  alpha=alpha.tolist(), beta=beta.tolist()))
        self.supernet.activate(self.template)  # the SuperNet checkpoint records every branch active
        save_checkpoint(self.run / "supernet.pt", self.supernet.model,
                        extra={"round": round_no, "search_config": dataclasses.asdict(self.config)})

    def best_seen_code(self) -> ArchCode:
        assert self.best_seen is not None
        return _codes_from_data(self.template, [self.best_seen["bits"]])[0]

    def tensorboard_round(self, record: RoundRecord) -> None:
        if self.writer is None:
            return
        r = record.round
        with writing(self.run / "tensorboard"):
            self.writer.add_scalar("fitness/best", record.best_fitness, r)
            self.writer.add_scalar("fitness/mean", record.mean_fitness, r)
            for op, n in record.population_op_counts.items():
                self.writer.add_scalar("branches/" + op, n, r)
            self.writer.flush()

    def run_all(self) -> None:
        config = self.config
        while self.epoch < config.total_epochs:
            record = self.train_epoch()
            self.epoch += 1
            self.log(record)
            if self.writer is not None:
                with writing(self.run / "tensorboard"):
                    self.writer.add_scalar("train/loss", record.train_loss, self.epoch)
                    self.writer.add_scalar("train/acc", record.train_acc, self.epoch)
            line = "epoch {}/{} ({}): loss {:.4f}, train acc {:.2f}%".format(
                self.epoch, config.total_epochs, record.phase, record.train_loss, record.train_acc)
            after_warmup = self.epoch - config.warmup_epochs
            if after_warmup > 0 and after_warmup % config.round_epochs == 0:
                round_no = after_warmup // config.round_epochs
                rec = self.finish_round(round_no)
                self.log(rec)
                line = "round {}/{}: best fitness {:.2f}% ({} branches), mean {:.2f}%; {}".format(
                    round_no, config.rounds, rec.best_fitness, rec.best_branches, rec.mean_fitness, line)
            if self.dist.main and self.progress:
                tqdm.write(line)
            self.save()
        if self.writer is not None:
            with writing(self.run / "tensorboard"):
                self.writer.close()


def _key(code: ArchCode) -> str:
    return "|".join("".join(map(str, row)) for row in code.bits)


def _best_in_history(history: Dict[str, List[List[float]]]) -> Optional[Dict[str, Any]]:
    """The highest score in the codes' histories, earliest round first: the best-seen code of a state
    written before it was saved."""
    scores = [(-f, r, key) for key, pairs in history.items() for r, f in pairs]
    if not scores:
        return None
    f, r, key = min(scores)
    return {"round": int(r), "fitness": -f, "bits": key.split("|")}


def validate_search_state(state: Dict[str, Any], config: SearchConfig, path: Path) -> None:
    """Everything a resume uses from ``state`` (read by runs.read_run_state), checked before any of it
    is used: the settings, the finished epochs, the parts' types, the population's codes, fitness and
    records. A damaged or edited file is one line naming it; whether the parts fit the network is
    checked as they load (:meth:`_Search.restore`)."""
    check_settings(config, path)
    check_epoch(state, config.total_epochs, path)
    check_tensors(state, "model", path)
    for key in ("w_opt", "a_opt", "sched"):
        state_part(state, key, dict, path)
    if state.get("scaler") is not None:
        state_part(state, "scaler", dict, path)
    population = state_part(state, "population", list, path)
    shapes = {(len(rows), tuple(len(r) for r in rows)) if isinstance(rows, list) and all(
        isinstance(r, str) and set(r) <= {"0", "1"} for r in rows) else None for rows in population}
    if len(population) != config.population or None in shapes or len(shapes) != 1:
        raise CheckpointError("{}: the saved population is not {} codes of one shape (rows of 0/1 bits)".format(
            path, config.population))
    fitness = state.get("fitness")
    if fitness is not None and not (isinstance(fitness, list) and len(fitness) == len(population) and all(
            isinstance(f, (int, float)) and not isinstance(f, bool) for f in fitness)):
        raise CheckpointError("{}: the saved fitness is not one number per code".format(path))
    rounds = state_part(state, "rounds", list, path)
    if not all(isinstance(r, dict) for r in rounds):
        raise CheckpointError("{}: the saved round records are not records".format(path))
    history = state_part(state, "history", dict, path)
    if not all(isinstance(v, list) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in v)
               for v in history.values()):
        raise CheckpointError("{}: the saved fitness history is not [round, fitness] pairs".format(path))
    seen = state.get("best_seen")
    if seen is not None and not (isinstance(seen, dict) and isinstance(seen.get("round"), int)
                                 and isinstance(seen.get("fitness"), (int, float))
                                 and isinstance(seen.get("bits"), list) and all(isinstance(r, str) for r in seen["bits"])):
        raise CheckpointError("{}: the saved best-seen code is not {{round, fitness, bits}}".format(path))


def search(run_dir: PathLike, config: Optional[SearchConfig] = None, resume: bool = False,
           data_root: Optional[str] = None, device: str = "auto", progress: bool = True,
           workers: int = 0, model: Optional[str] = None, trust_pickle: bool = False,
           search_step: str = "auto", cuda_graph: str = "auto") -> SearchReport:
    """Run (or resume) a DES search in ``run_dir``; returns the best code of the last round.
    ``workers`` loader processes, ``search_step`` (:data:`SEARCH_STEPS`, :func:`plan_step`) and
    ``cuda_graph`` (as train's) are where/how, not what: they may change on resume. ``model``: on
    resume, the network the user names; required (and the same) when the run's settings name a
    model spec, since a file never decides what is imported. ``trust_pickle``: read old
    pickle-format files (a state of an earlier version, ``--weights``) on torch < 2.10 too."""
    run = Path(run_dir)
    if not resume:
        config = config or make_config()
        if state_path(run).exists():
            raise IrepError("{}: holds a search already; resume it with --resume or choose another directory".format(run))
    # one writer per run (rank 0 writes for all); a failed start leaves no run directory behind
    with run_directory(run, keep=lambda p: state_path(p).exists(), command="search",
                       new=not resume) if launched_main() else contextlib.nullcontext(run):
        state: Optional[Dict[str, Any]] = None
        if resume:  # the run's own settings; a differing ``config`` is refused
            state, config = read_run_state(run, "search", SearchConfig, config, model, trust_pickle)
            validate_search_state(state, config, state_path(run))
        assert config is not None
        return _search(run, config, state, data_root, device, progress, workers, trust_pickle, search_step,
                       cuda_graph)


def _search(run: Path, config: SearchConfig, state: Optional[Dict[str, Any]], data_root: Optional[str],
            device: str, progress: bool, workers: int, trust_pickle: bool, search_step: str = "auto",
            cuda_graph: str = "auto") -> SearchReport:
    with deterministic_mode(config.deterministic):  # before the device is touched
        dev = resolve_device(device)
        dist = init_distributed(dev)
        try:
            job = _Search(run, config, dev, dist, data_root, progress, workers, resuming=state is not None,
                          trust_pickle=trust_pickle, search_step=search_step, cuda_graph=cuda_graph)
            if state is not None:
                job.restore(state)
            elif dist.main:
                write_json(run / "config.json", dataclasses.asdict(config))
                with atomic_write(run / LOG_FILE, "w"):
                    pass
            start = job.epoch
            job.run_all()
            fitness = job.fitness or []
            best = max(range(len(fitness)), key=fitness.__getitem__)
            seen = job.best_seen or {}
            return SearchReport(str(run), job.population[best], fitness[best], job.rounds, start, dist.main,
                                job.best_seen_code() if seen else None, seen.get("fitness"), seen.get("round"))
        finally:
            close_distributed(dist)
