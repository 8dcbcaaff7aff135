"""Whole-step CUDA graphs: forward, loss, backward, optimizer step and LR schedule captured once and
replayed per batch (``train --cuda-graph``; the DES search reuses the same pieces).

A CUDA graph replays the kernels its capture recorded, reading and writing the same memory; nothing
on the host runs during a replay. A captured step may therefore neither read a tensor on the host
(``.item()``, ``if tensor:``) nor depend on a Python value that changes between steps. Three pieces
make ``steps.optimizer_step`` such a step:

* :class:`StepGraph` wraps ``step(*inputs) -> outputs`` (static-shape tensors). Disabled (or on
  CPU) it calls ``step`` eagerly. Enabled on CUDA, its first ``warmup`` calls run eagerly on a side
  stream (real steps on real batches: the optimizers create their state, cuDNN picks its kernels),
  the next call copies its inputs into static buffers, captures ``step`` with
  :class:`torch.cuda.graph` (a private memory pool) and replays it once, so that batch's step
  happens exactly once; every later call copies its inputs into the buffers and replays.
  **The returned tensors are the graph's static outputs: valid until the next call**, which
  overwrites them (read or clone them before). An input whose shape or dtype differs from the
  first call's is an error (``ValueError``), never a silent re-capture: ``train`` drops the last
  short batch (``data.train_loader``, ``drop_last=True``), so every batch has one shape.
  :meth:`StepGraph.reset` forgets the graph (warm-up and capture again at the next call) for
  when a Python value the step reads changes, such as the drop-path probability at each epoch.

* :func:`make_capturable` ``(optimizers, scheduler, dev) -> DeviceSchedule`` switches the
  optimizers, in place, to torch's fused kernels, which take their learning rate as a device tensor
  and the gradient scaler's ``found_inf`` on the device: ``SGD(fused=True)``
  (``torch._fused_sgd_``: CPU and CUDA, so the CPU tests run the kernel path the GPU runs) and
  ``Adam(fused=True)``, with ``capturable=True`` on CUDA (its step count stays on the device;
  ``capturable`` does not exist on CPU). Eager ``SGD`` with a tensor lr calls
  ``param.add_(grad, alpha=-lr)``, which reads the lr on the host: a sync that fails under capture.
  The learning rate of the scheduler's optimizer becomes a float32 device tensor that
  :meth:`DeviceSchedule.step` sets, inside the graph, to ``CosineAnnealingLR``'s closed form
  ``eta_min + (base - eta_min) * (1 + cos(pi * t / T_max)) / 2`` of a device step counter ``t``
  (float64). Contract:

  - call it after every ``load_state_dict`` of the optimizers and the scheduler (a load puts the
    saved param-group flags and float lrs back); call it again after any later load;
  - inside the step, after the optimizer steps, call ``schedule.step()`` where the eager loop calls
    ``scheduler.step()``; never call ``scheduler.step()`` itself;
  - at the end of every epoch (before the scheduler is read or saved) call
    :meth:`DeviceSchedule.sync_to_scheduler` (one host read): it sets the scheduler's
    ``last_epoch``, ``_step_count`` and ``_last_lr`` to what as many ``scheduler.step()`` calls
    would have left (``_last_lr`` from the closed form in float64);
  - save an optimizer with :meth:`DeviceSchedule.state_dict` ``(optimizer)``: the state dict of
    the optimizer as it was before the switch (float lrs, its own ``fused``/``foreach``/
    ``capturable`` flags, Adam's step counts on the host as non-capturable Adam keeps them), so a
    checkpoint is the one an eager run writes and resumes with or without capture.

  Only ``CosineAnnealingLR`` (the schedule of ``train`` and of the search) is supported. SGD
  momentum buffers are created as zeros where missing (see :func:`zero_momentum`: fused SGD's
  first step skipped by the fp16 scaler would leave them uninitialised); :meth:`DeviceSchedule.state_dict`
  leaves out those still zero (no gradient reached them), as the eager optimizer has none there.

* Mixed precision: bf16 autocast runs inside the captured step (``cache_enabled=False``: autocast's
  weight-cast cache must not outlive a capture). fp16 is captured too: with fused optimizers
  ``GradScaler.step`` takes the ``_step_supports_amp_scaling`` path, which hands the optimizer the
  scale and ``found_inf`` as device tensors (the skip of a step with inf/nan gradients happens in
  the kernel), and ``GradScaler.update`` is ``torch._amp_update_scale_``, on the device; the
  unfused path reads ``found_inf`` on the host (``_maybe_opt_step``), which is why the switch to
  fused kernels comes first.

:func:`capture_refusal` says why a step cannot be captured (None: it can). Refused: CPU, more than
one process (DDP's gradient all-reduce is not part of a captured step here), ``--deterministic``
(its promise, a bit-identical resume, is not verified when a resume's eager warm-up steps stand
where the uninterrupted run replayed), and a torch without fused SGD or CUDA graphs. Drop-path is
captured: ``bernoulli_`` on CUDA draws from philox with a seed and offset the graph reads at each
replay (torch registers the default generator with the graph), so each replay draws new masks
from the epoch's seed; the probability itself is a Python float, so ``train`` resets the graph
when it changes (each epoch). Gradient clipping is captured (``clip_grad_norm_`` with the default
``error_if_nonfinite=False`` reads nothing on the host).

:func:`run_graph_epoch` is ``steps.run_epoch`` for a step wrapped in a :class:`StepGraph`; the
running metrics (:class:`~irep_deploy.steps.StepMonitor`) are updated on the device right after
each replay and read every ``LOG_EVERY`` steps, as in the eager loop. Nothing of the CUDA path has
run on a GPU yet (written against the CUDA-graph rules; the tests marked ``cuda`` check it).
"""
from __future__ import annotations

import inspect
import math
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .errors import UsageError, raise_if_interrupted
from .options import CUDA_GRAPH_MODES
from .progress import bar as progress_bar
from .runtime import Dist, autocast
from .steps import LossFn, EpochTotals, StepMonitor, correct_count, cpu_time, optimizer_step

#: ``step(*inputs) -> outputs``: one training step on static-shape tensors.
Step = Callable[..., Tuple[torch.Tensor, ...]]
WARMUP = 3  # eager steps before the capture (torch's CUDA-graph examples use 3; DDP would need 11)


class StepGraph:
    """``step`` run eagerly, or captured once as a CUDA graph and replayed (module docstring)."""

    def __init__(self, step: Step, dev: torch.device, enabled: bool = True, warmup: int = WARMUP,
                 pool: Any = None) -> None:
        if warmup < 1:  # the optimizers' state (momentum buffers) must exist before the capture
            raise ValueError("a captured step needs at least 1 warm-up step, got {}".format(warmup))
        self.step, self.dev, self.warmup, self.pool = step, dev, warmup, pool
        self.enabled = enabled and dev.type == "cuda"
        self.signature: Optional[List[Tuple[torch.Size, torch.dtype]]] = None
        self.calls = 0  # eager calls since the last reset
        self.graph: Any = None
        self.side: Any = None  # the warm-up stream, made once (each stream keeps its own cached blocks)
        self.static_inputs: List[torch.Tensor] = []
        self.static_outputs: Tuple[torch.Tensor, ...] = ()

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def reset(self) -> None:
        """Forget the captured graph: the next calls warm up and capture again (a Python value the
        step reads has changed). The input signature stays."""
        self.graph, self.static_inputs, self.static_outputs, self.calls = None, [], (), 0

    def __call__(self, *inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        self._check(inputs)
        if not self.enabled:
            return self.step(*inputs)
        if self.graph is not None:
            for buffer, x in zip(self.static_inputs, inputs):
                buffer.copy_(x, non_blocking=True)
            self.graph.replay()
            return self.static_outputs
        if self.calls < self.warmup:
            self.calls += 1
            return self._side_stream(inputs)
        return self._capture(inputs)

    def _check(self, inputs: Sequence[torch.Tensor]) -> None:
        signature = [(x.shape, x.dtype) for x in inputs]
        if self.signature is None:
            self.signature = signature
        elif signature != self.signature:
            raise ValueError("a captured step takes inputs of one shape and dtype: got {}, first {}".format(
                _describe(signature), _describe(self.signature)))

    def _side_stream(self, inputs: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        # torch.cuda.graph's rule: warm-up work runs on a side stream, so that no lazily created state
        # (cuBLAS workspaces, autograd streams) belongs to the stream the capture uses.
        if self.side is None:
            self.side = torch.cuda.Stream(self.dev)
        side = self.side
        side.wait_stream(torch.cuda.current_stream(self.dev))
        with torch.cuda.stream(side):
            outputs = self.step(*inputs)
        torch.cuda.current_stream(self.dev).wait_stream(side)
        return outputs

    def _capture(self, inputs: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        self.static_inputs = [torch.empty_like(x, device=self.dev) for x in inputs]  # keeps channels_last
        for buffer, x in zip(self.static_inputs, inputs):
            buffer.copy_(x)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the data loader's pin-memory thread may allocate pinned memory (cudaHostAlloc)
        # while this thread captures; the default "global" mode would fail that call in the other thread.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            outputs = self.step(*self.static_inputs)
        self.graph, self.static_outputs = graph, tuple(outputs)
        graph.replay()  # the capture recorded the step without running it: this batch's step
        return self.static_outputs


def _describe(signature: Sequence[Tuple[torch.Size, torch.dtype]]) -> str:
    return ", ".join("{}{}".format(str(dtype).replace("torch.", ""), list(shape)) for shape, dtype in signature)


# -- optimizers and the LR schedule on the device ------------------------------------------------------
_FLAGS = ("fused", "foreach", "capturable")


def fused_sgd_available() -> bool:
    return "fused" in inspect.signature(torch.optim.SGD).parameters


class DeviceSchedule:
    """CosineAnnealingLR's per-step learning rate kept on the device (see the module docstring)."""

    def __init__(self, scheduler: Any, dev: torch.device, flags: Dict[int, List[Dict[str, Any]]],
                 zeroed: Optional[Dict[int, List[torch.Tensor]]] = None) -> None:
        if not isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
            raise TypeError("a device schedule follows CosineAnnealingLR, not {}".format(type(scheduler).__name__))
        self.scheduler, self.dev, self.flags, self.zeroed = scheduler, dev, flags, zeroed or {}
        self.t_max, self.eta_min = scheduler.T_max, scheduler.eta_min
        self.base = torch.tensor(scheduler.base_lrs, dtype=torch.float64, device=dev)
        self.count = torch.tensor(float(scheduler.last_epoch), dtype=torch.float64, device=dev)
        self.lr = torch.tensor(scheduler.get_last_lr(), dtype=torch.float32, device=dev)
        for i, group in enumerate(scheduler.optimizer.param_groups):
            group["lr"] = self.lr[i]  # a view: the fused kernel reads the value step() writes

    def lr_at(self, count: int) -> List[float]:
        """The learning rates after ``count`` schedule steps (host arithmetic, float64)."""
        return [self.eta_min + (base - self.eta_min) * (1 + math.cos(math.pi * count / self.t_max)) / 2
                for base in self.scheduler.base_lrs]

    def step(self) -> None:
        """One schedule step on the device (capturable): the counter, then the learning rates."""
        self.count.add_(1.0)
        lrs = self.eta_min + (self.base - self.eta_min) * (1 + torch.cos(self.count * (math.pi / self.t_max))) / 2
        self.lr.copy_(lrs)

    def sync_to_scheduler(self) -> None:
        """Give the scheduler the state ``count`` eager ``scheduler.step()`` calls leave (one host read)."""
        count = int(round(self.count.item()))
        sched = self.scheduler
        sched.last_epoch, sched._step_count = count, count + 1
        sched._last_lr = self.lr_at(count)

    def state_dict(self, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
        """``optimizer``'s state dict as before :func:`make_capturable` (float lrs, its own flags,
        Adam's step counts on the host); call :meth:`sync_to_scheduler` first."""
        state = optimizer.state_dict()
        flags = self.flags.get(id(optimizer))
        scheduled = optimizer is self.scheduler.optimizer
        for i, group in enumerate(state["param_groups"]):
            if scheduled:
                group["lr"] = self.scheduler._last_lr[i]
            elif isinstance(group["lr"], torch.Tensor):
                group["lr"] = float(group["lr"])
            if flags is not None:
                group.update(flags[i])
        made = self.zeroed.get(id(optimizer))
        if made:  # a zero buffer make_capturable made is no buffer (the same next step): saved as eager saves
            index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
            still = torch.stack([optimizer.state[p]["momentum_buffer"].count_nonzero() for p in made]).eq(0).tolist()
            for p, zero in zip(made, still):
                entry = state["state"].get(index[id(p)])
                if zero and entry is not None:
                    rest = {k: v for k, v in entry.items() if k != "momentum_buffer"}
                    if rest:
                        state["state"][index[id(p)]] = rest
                    else:
                        del state["state"][index[id(p)]]
        if flags is not None and isinstance(optimizer, torch.optim.Adam):
            host = {i for i, f in enumerate(flags) if not (f.get("fused") or f.get("capturable"))}
            ids = {p: i for i, g in enumerate(state["param_groups"]) for p in g["params"]}
            state["state"] = {k: (dict(v, step=v["step"].detach().to("cpu", torch.float32))
                                  if ids.get(k) in host and isinstance(v.get("step"), torch.Tensor) else v)
                              for k, v in state["state"].items()}
        return state


def make_capturable(optimizers: Sequence[torch.optim.Optimizer], scheduler: Any,
                    dev: torch.device) -> DeviceSchedule:
    """Switch ``optimizers`` (SGD, Adam) in place to fused kernels whose steps read nothing on the
    host, and the learning rate of ``scheduler`` (CosineAnnealingLR) to a device tensor stepped by
    the returned :class:`DeviceSchedule` (contract in the module docstring)."""
    flags: Dict[int, List[Dict[str, Any]]] = {}
    zeroed: Dict[int, List[torch.Tensor]] = {}
    for opt in optimizers:
        if type(opt) not in (torch.optim.SGD, torch.optim.Adam):
            raise TypeError("make_capturable switches SGD and Adam, not {}".format(type(opt).__name__))
        flags[id(opt)] = [{k: g.get(k) for k in _FLAGS if k in g} for g in opt.param_groups]
        for group in opt.param_groups:
            group["fused"], group["foreach"] = True, None
            if isinstance(opt, torch.optim.SGD) and group["momentum"] and not group["dampening"]:
                zeroed.setdefault(id(opt), []).extend(zero_momentum(opt, group))
            if isinstance(opt, torch.optim.Adam):
                group["capturable"] = dev.type == "cuda"  # Adam's capturable exists on accelerators only
                for p in group["params"]:  # fused/capturable Adam keeps the step count on the device, float32
                    state = opt.state.get(p)
                    if state and isinstance(state.get("step"), torch.Tensor):
                        state["step"] = state["step"].to(p.device, torch.float32)
        opt._step_supports_amp_scaling = True  # type: ignore[attr-defined]  # GradScaler: found_inf on the device
    return DeviceSchedule(scheduler, dev, flags, zeroed)


def zero_momentum(opt: torch.optim.SGD, group: Dict[str, Any]) -> List[torch.Tensor]:
    """Zero momentum buffers where there are none yet. Fused SGD's first step allocates them with
    ``empty_like`` and lets its kernel fill them; a first step the fp16 scaler skips (inf gradients)
    leaves them uninitialised and the next step would read that memory. From zero, the first step
    gives what the unfused first step gives (the buffer = the gradient, without dampening). Returns
    the parameters given one."""
    made = []
    for p in group["params"]:
        state = opt.state[p]
        if state.get("momentum_buffer") is None:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            made.append(p)
    return made


# -- when the step is captured ----------------------------------------------------------------------
def capture_refusal(dev: torch.device, dist: Dist, deterministic: bool = False) -> Optional[str]:
    """Why the training step of a run cannot be captured as a CUDA graph; None when it can."""
    if dev.type != "cuda":
        return "CUDA graphs need a CUDA device (this run is on {})".format(dev.type)
    if dist.enabled:
        return "DDP's gradient all-reduce is not captured here ({} processes)".format(dist.world_size)
    if deterministic:
        return ("--deterministic promises a bit-identical resume, not verified with a captured step (a resume's "
                "eager warm-up steps stand where the run replayed)")
    if not fused_sgd_available() or not hasattr(torch.cuda, "graph"):
        return "torch {} has no fused SGD or torch.cuda.graph".format(torch.__version__)
    return None


def resolve_cuda_graph(mode: str, refusal: Optional[str]) -> bool:
    """Whether to capture: ``on`` refused is a usage error, ``auto`` captures where nothing refuses."""
    if mode not in CUDA_GRAPH_MODES:
        raise UsageError("--cuda-graph {!r}: choose from {}".format(mode, ", ".join(CUDA_GRAPH_MODES)))
    if mode == "off":
        return False
    if refusal is not None and mode == "on":
        raise UsageError("--cuda-graph on: " + refusal)
    return refusal is None


# -- the step and the epoch --------------------------------------------------------------------------
def make_train_step(loss_of: LossFn, optimizers: Sequence[torch.optim.Optimizer], schedule: DeviceSchedule,
                    dev: torch.device, scaler: Any = None, amp: str = "none",
                    grad_clip: float = 0.0) -> Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]:
    """``step(x, y) -> (loss, correct)``: the eager loop's step (``steps.optimizer_step``) with the
    device schedule; ``correct`` counts the batch's right top-1 predictions (a device scalar)."""
    def step(x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)  # under capture the gradients come from the graph's pool
        with autocast(amp, dev, cache=False):
            loss, logits = loss_of(x, y)
        optimizer_step(loss, optimizers, schedule, scaler, grad_clip)
        return loss.detach(), correct_count(logits, y)
    return step


def run_graph_epoch(graph: StepGraph, loader: Iterable, schedule: DeviceSchedule, dev: torch.device, dist: Dist,
                    net: Optional[nn.Module] = None, layout: torch.memory_format = torch.contiguous_format,
                    desc: str = "", progress: bool = False,
                    extra: Optional[Callable[[int], Sequence[torch.Tensor]]] = None) -> EpochTotals:
    """``steps.run_epoch`` with each batch's step through ``graph``: ``graph(x, y, *extra(step))``
    returns ``(loss, correct)`` (a step of :func:`make_train_step`, or the search's, whose
    ``extra(step)`` gives that step's further inputs, such as its branch masks). Ends with
    :meth:`DeviceSchedule.sync_to_scheduler`. A weight update beyond float32 shows as a non-finite
    loss at the next step (the fused kernels raise no overflow error)."""
    if net is not None:
        net.train()
    t0, cpu0 = time.time(), cpu_time()
    monitor = StepMonitor(dev, dist)
    bar = progress_bar(loader, desc=desc, enabled=progress and dist.main)
    bad: Optional[Tuple[int, float]] = None
    start = schedule.scheduler.last_epoch
    try:
        for step, (x, y) in enumerate(bar):
            raise_if_interrupted()
            x = x.to(dev, non_blocking=True).contiguous(memory_format=layout)
            y = y.to(dev, non_blocking=True)
            loss, correct = graph(x, y, *(extra(step) if extra is not None else ()))
            bad = monitor.add(step, loss, correct, y.numel())  # device ops on the static outputs, no host read
            if bad is not None:
                break
            if (step + 1) % monitor.every == 0:
                bar.set_postfix(loss="{:.3f}".format(monitor.mean_loss),
                                lr="{:.3g}".format(schedule.lr_at(start + step + 1)[0]), refresh=False)
        bad = bad or monitor.check()
    finally:
        bar.close()
    schedule.sync_to_scheduler()
    n, loss_sum, correct_sum = monitor.totals()
    d = max(n, 1)
    return EpochTotals(int(n), loss_sum / d, 100.0 * correct_sum / d, round(time.time() - t0, 3), bad,
                       False, round(cpu_time() - cpu0, 3))
