"""The training step and epoch shared by ``train`` (one network) and the DES search (B subnets per step).

One step: forward under autocast, backward, a step of every optimizer (through the fp16 gradient
scaler when there is one), one step of the per-iteration schedule. Per step nothing is read on the
host; the running sums and the first non-finite loss stay on the device (:class:`StepMonitor`)
and are read every ``LOG_EVERY`` steps, all-reduced so every rank stops after the same step.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .errors import raise_if_interrupted
from .progress import bar as progress_bar
from .runtime import Dist, all_reduce, autocast

LOG_EVERY = 10  # training steps between host reads of the running metrics and the non-finite-loss flag
#: ``loss_of(x, y)``: the loss to minimise and the logits to count correct predictions with.
LossFn = Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]

_SCHEDULER_ORDER_WARNING = r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"


def _has_grad(opt: torch.optim.Optimizer) -> bool:
    return any(p.grad is not None for group in opt.param_groups for p in group["params"])


def clip_gradients(optimizers: Sequence[torch.optim.Optimizer], max_norm: float) -> None:
    """Scale the gradients of every optimizer's parameters to a total 2-norm of at most ``max_norm``
    (DARTS's ``clip_grad_norm_``, over all of them at once). Nothing is read on the host."""
    params = [p for opt in optimizers for group in opt.param_groups for p in group["params"] if p.grad is not None]
    if params:
        nn.utils.clip_grad_norm_(params, max_norm)


def optimizer_step(loss: torch.Tensor, optimizers: Sequence[torch.optim.Optimizer], scheduler: Any,
                   scaler: Any = None, grad_clip: float = 0.0) -> None:
    """Backward of ``loss``, the gradients clipped to a total norm of ``grad_clip`` (0: not clipped),
    a step of every optimizer (through the fp16 gradient scaler when given), then one step of the
    per-iteration schedule. Reads nothing on the host except what the scaler does.
    """
    if scaler is None:
        loss.backward()
        if grad_clip:
            clip_gradients(optimizers, grad_clip)
        for opt in optimizers:
            opt.step()
        scheduler.step()
        return
    scaler.scale(loss).backward()
    # An optimizer none of whose parameters got a gradient (DES: alpha/beta when every sampled code
    # has no branch) has nothing to step, and scaler.step would raise "No inf checks were recorded".
    stepped = [opt for opt in optimizers if _has_grad(opt)]
    if grad_clip:
        for opt in stepped:
            scaler.unscale_(opt)  # the norm is the true gradients'; scaler.step then does not unscale again
        clip_gradients(stepped, grad_clip)
    for opt in stepped:
        scaler.step(opt)
    scaler.update()
    # The schedule follows the iteration count, whether or not the scaler skipped this step (inf/nan
    # gradients, typical of the first steps while the scale settles). A skipped first step makes the
    # scheduler warn that optimizer.step() was not called: expected here, so that one warning is muted.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SCHEDULER_ORDER_WARNING, category=UserWarning)
        scheduler.step()


def correct_count(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Right top-1 predictions of a batch, a device scalar (nothing read on the host)."""
    return (logits.detach().argmax(1) == target).sum()


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
        return self.add(step, loss, correct_count(logits, target), target.numel())

    def add(self, step: int, loss: torch.Tensor, correct: torch.Tensor, examples: int) -> Optional[Tuple[int, float]]:
        """:meth:`update` of a step whose right predictions are counted already (``correct``, a device
        scalar: a captured step's output); device arithmetic only, ``loss`` and ``correct`` are read
        before this returns (a CUDA graph's outputs may then be overwritten by its next replay)."""
        loss = loss.detach().double()
        first = torch.isinf(self.first_bad) & ~torch.isfinite(loss)
        self.first_bad = torch.where(first, torch.full_like(self.first_bad, step), self.first_bad)
        self.bad_value = torch.where(first, loss, self.bad_value)
        self.loss_sum += loss * examples
        self.correct += correct
        self.seen += examples
        return self.check() if (step + 1) % self.every == 0 else None

    def check(self) -> Optional[Tuple[int, float]]:
        """Read the flag (all ranks agree) and the running loss; (step, loss) of a non-finite loss or None."""
        first = all_reduce(self.first_bad.clone(), self.dist, "min")
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
        n, loss_sum, correct = all_reduce(torch.stack([seen, self.loss_sum, self.correct]), self.dist).tolist()
        return n, loss_sum, correct


@dataclass
class EpochTotals:
    """One epoch's training metrics over all ranks, or where it stopped."""

    examples: int
    loss: float  # mean per example
    top1: float  # percent
    seconds: float
    diverged: Optional[Tuple[int, float]] = None  # (step, loss) of the first non-finite loss
    overflowed: bool = False  # the weight update itself left float32's range (a learning rate such as 1e300)
    cpu_seconds: Optional[float] = None  # this process's CPU time (user + system, all threads) over the epoch

    def divergence(self, epoch: int, state_file: Path) -> str:
        """The one-line message of a diverged epoch (``epoch`` counted from 0)."""
        assert self.diverged is not None
        step, value = self.diverged
        # The weights in memory may have taken a few bad steps since; state_file holds the last finished epoch
        # (a search writes none before its first epoch ends, and its run directory is then removed).
        kept = ("the last good state (after epoch {}) is kept in {}".format(epoch, state_file)
                if state_file.is_file() else "no state was saved yet")
        what = "the weight update overflowed float32" if self.overflowed else "loss became {}".format(value)
        return "{} at epoch {} step {}; stopped, {} (try a lower --lr)".format(what, epoch + 1, step + 1, kept)


def run_epoch(net: nn.Module, loader: Iterable, loss_of: LossFn, optimizers: Sequence[torch.optim.Optimizer],
              scheduler: Any, dev: torch.device, dist: Dist, scaler: Any = None, amp: str = "none",
              layout: torch.memory_format = torch.contiguous_format, desc: str = "",
              progress: bool = False, grad_clip: float = 0.0) -> EpochTotals:
    """One pass over ``loader``, one optimizer step per batch (gradients clipped to ``grad_clip``
    when > 0); stops at the first non-finite loss (``diverged`` set, every rank after the same step).
    The caller seeds the epoch's randomness."""
    net.train()
    t0, cpu0 = time.time(), cpu_time()
    monitor = StepMonitor(dev, dist)
    bar = progress_bar(loader, desc=desc, enabled=progress and dist.main)
    bad: Optional[Tuple[int, float]] = None
    overflow: Optional[Tuple[int, float]] = None
    for step, (x, y) in enumerate(bar):
        raise_if_interrupted()
        x = x.to(dev, non_blocking=True).contiguous(memory_format=layout)
        y = y.to(dev, non_blocking=True)
        with autocast(amp, dev):
            loss, logits = loss_of(x, y)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        # fp16: the scaler scales the loss so small gradients survive and skips steps with inf/nan gradients
        try:
            optimizer_step(loss, optimizers, scheduler, scaler, grad_clip)
        except RuntimeError as exc:  # torch refuses a step of lr * grad beyond float32 ("without overflow")
            if "overflow" not in str(exc):
                raise
            overflow = (step, float("inf"))
            break
        bad = monitor.update(step, loss, logits, y)  # reads the host only every LOG_EVERY steps
        if bad is not None:
            break
        if (step + 1) % monitor.every == 0:
            bar.set_postfix(loss="{:.3f}".format(monitor.mean_loss), lr="{:.3g}".format(scheduler.get_last_lr()[0]),
                            refresh=False)  # shown at the next redraw: in a log every LOG_INTERVAL_S, not each time
    bad = bad or monitor.check() or overflow  # a non-finite loss before the overflow is the first problem
    bar.close()
    n, loss_sum, correct = monitor.totals()
    d = max(n, 1)
    return EpochTotals(int(n), loss_sum / d, 100.0 * correct / d, round(time.time() - t0, 3), bad,
                       overflow is not None and bad is overflow, round(cpu_time() - cpu0, 3))


def cpu_time() -> float:
    """CPU seconds (user + system) of this process's threads and of its ended child processes (loader
    workers count once they exit). Beside the wall time it shows how loaded the machine was."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system
