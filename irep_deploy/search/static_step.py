"""The search step with a static shape: B subnets trained by one fixed sequence of kernels.

Today's step (:meth:`SuperNet.forward` + :func:`averaged_loss`) switches each block's active branch
set in Python between the B forwards, so the kernels it launches change from step to step and the
step cannot be captured in a CUDA graph. Here every branch a block holds runs in every step and the
code decides, through a 0/1 *gate* tensor on the device, what each branch adds:

- a block adds ``gate * sigmoid(alpha_o) * sigmoid(beta) * f_o(x)`` for every branch: an inactive
  branch adds exactly 0 and its parameters (and alpha_o) get a zero gradient;
- every BatchNorm of a branch updates its running statistics (and ``num_batches_tracked``) only in
  the subnets whose code holds the branch, in the order of the subnets, as the eager step does;
- after the optimizers' step, every tensor of a branch that no code of the step held (its weights,
  their momentum buffers, and alpha/beta with their Adam moments and step count for a block none of
  whose branches was held) is put back as it was: no weight decay, momentum or moment decay on a
  branch the step did not train, as when the eager step left its gradient ``None``. The optimizers'
  state is created up front as zeros, which is what a first step would create (SGD without
  dampening, Adam), so a tensor's state exists before its first step.

Two layouts compute that step (:class:`StaticSearchStep` ``batched``):

- sequential: the B subnets one after the other on the batch (B forwards, one backward);
- batched: one forward of the batch repeated B times (B x N examples), every BatchNorm normalising
  each subnet's N examples with their own statistics, so each subnet sees what it sees alone.

Both equal the eager step to float rounding (tests/search/test_static_step.py checks losses,
parameters, optimizer state and BatchNorm statistics over many steps on real data). Inactive
branches cost their full arithmetic here (at C = 2/3 about half again the branch work the eager step
does); what the static shape buys is that the step can be captured whole (:mod:`irep_deploy.graphs`).

The modules are changed only inside :meth:`StaticSearchStep.step` (their ``forward`` is replaced by
a gated one for the duration of the step and put back after), so the SuperNet, its fusion and its
state dict are the same objects as for the eager step.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..arch import ArchCode
from ..binding import plan_arch
from ..block import IrepConv
from ..ops import OneByOneThen
from ..graphs import DeviceSchedule, StepGraph, make_capturable, zero_momentum
from ..runtime import autocast
from ..steps import correct_count, optimizer_step
from .supernet import SuperNet, averaged_loss

_BatchNorm = nn.modules.batchnorm._BatchNorm
#: Codes whose gate rows are kept (a population is 128; a round replaces some of it).
ROW_CACHE = 4096


def static_step_refusal(supernet: SuperNet) -> Optional[str]:
    """None when :class:`StaticSearchStep` computes what the eager step computes for ``supernet``,
    else why not (one short clause)."""
    for block in supernet.blocks:
        if block.drop_path > 0.0:
            return "drop-path draws per-branch masks the eager step draws in another order"
    for m in supernet.model.modules():
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.momentum is None:
            return "a BatchNorm with momentum=None (a cumulative average) reads its batch count on the host"
    return None


class _Gates:
    """The gates the patched forwards read: rows (G x U) for the subnets of the current forward."""

    def __init__(self) -> None:
        self.rows: Optional[torch.Tensor] = None

    @property
    def groups(self) -> int:
        assert self.rows is not None
        return int(self.rows.shape[0])


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(G*N, ...) seen as (G, N, ...): subnet g's examples are the g-th block of the batch."""
    return x.reshape((groups, x.shape[0] // groups) + tuple(x.shape[1:]))


def _batch_norm(bn: _BatchNorm, gates: _Gates, unit: Optional[int], x: torch.Tensor) -> torch.Tensor:
    """``bn`` in training mode, each subnet's examples normalised by their own statistics; running
    statistics updated subnet after subnet, by a branch's BatchNorm only where the subnet's code holds
    the branch (``unit``: its gate column; None: a BatchNorm outside the branches, always updated).
    The statistics after each subnet are kept on the module for :func:`_one_by_one_then`."""
    groups = gates.groups
    if not bn.track_running_stats:
        parts = [F.batch_norm(part, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
                 for part in _grouped(x, groups).unbind(0)]
        return parts[0] if groups == 1 else torch.cat(parts)
    assert bn.momentum is not None  # static_step_refusal
    parts, stats = [], []
    for g, part in enumerate(_grouped(x, groups).unbind(0)):
        if unit is None:
            parts.append(F.batch_norm(part, bn.running_mean, bn.running_var, bn.weight, bn.bias, True,
                                      bn.momentum, bn.eps))
            bn.num_batches_tracked.add_(1)
        else:
            mean, var = bn.running_mean.clone(), bn.running_var.clone()
            parts.append(F.batch_norm(part, mean, var, bn.weight, bn.bias, True, bn.momentum, bn.eps))
            assert gates.rows is not None
            held = gates.rows[g, unit] > 0
            # where, not a blend: a subnet without the branch leaves the statistics bit for bit
            bn.running_mean.copy_(torch.where(held, mean, bn.running_mean))
            bn.running_var.copy_(torch.where(held, var, bn.running_var))
            bn.num_batches_tracked.add_(held.to(bn.num_batches_tracked.dtype))
        stats.append((bn.running_mean.clone(), bn.running_var.clone()))
    bn._irep_group_stats = stats  # type: ignore[attr-defined]
    return parts[0] if groups == 1 else torch.cat(parts)


def _zero_output(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """ops.bn_zero_output with given running statistics."""
    value = -mean / (var + bn.eps).sqrt()
    if bn.weight is not None:
        value = value * bn.weight + bn.bias
    return value.detach()


def _one_by_one_then(branch: OneByOneThen, gates: _Gates, x: torch.Tensor) -> torch.Tensor:
    """OneByOneThen's training forward, each subnet padded with BN(0) of the statistics its own
    forward would have left in ``bn1`` (Diverse Branch Block's BNAndPad, per subnet; the pad is
    OneByOneThen's border term, one per subnet)."""
    y = branch.bn1(branch.conv1(x))
    groups = gates.groups
    stats = getattr(branch.bn1, "_irep_group_stats", None)
    if stats is None:  # bn1 without running statistics: it pads with BN(0) of nothing tracked
        stats = [(branch.bn1.running_mean, branch.bn1.running_var)] * groups
    fill = torch.stack([_zero_output(branch.bn1, mean, var) for mean, var in stats])
    z = branch.zero_padded(y)
    z = (_grouped(z, groups) + branch.border(y, fill).unsqueeze(1)).reshape(z.shape)
    return branch.bn2(z)


def _block(block: IrepConv, gates: _Gates, units: Sequence[Tuple[int, str, int]], x: torch.Tensor) -> torch.Tensor:
    """Eq. 6-7 with every held branch gated: ``units`` = (unit, op, index of op in block.ops)."""
    out = block.conv(x)
    if not units:
        return out
    assert gates.rows is not None
    scales = block.branch_scales().to(out.dtype)
    groups = gates.groups
    grouped = _grouped(out, groups)
    for unit, name, i in units:
        coef = (scales[i] * gates.rows[:, unit].to(out.dtype)).reshape(groups, 1, 1, 1, 1)
        grouped = torch.addcmul(grouped, coef, _grouped(block.branches[name](x), groups))
    return grouped.reshape(out.shape)


class StaticSearchStep:
    """One DES training step (Eq. 3-5) of ``supernet`` whose kernels do not depend on the codes.

    ``gates(codes)`` turns the step's B codes into a B x U 0/1 float tensor on the SuperNet's device
    (U: every branch the SuperNet holds, block by block in op order); ``step(x, y, gates)`` runs the
    forward of the B subnets, the averaged loss, backward and a step of ``optimizers`` (the weights'
    SGD and alpha/beta's Adam, as :func:`steps.optimizer_step` does them, gradient scaler and
    clipping included) and the ``scheduler``, then restores what no code of the step held. It
    returns (loss, logits of the last subnet), as the eager step's ``loss_of`` does. The forward runs
    under ``amp``'s autocast (without its weight-cast cache, which must not outlive a CUDA graph's
    capture); ``schedule_step`` replaces ``scheduler.step()`` (a device-side schedule, graphs.py).
    """

    def __init__(self, supernet: SuperNet, optimizers: Sequence[torch.optim.Optimizer], scheduler: Any,
                 criterion: nn.Module, batched: bool = True, scaler: Any = None, grad_clip: float = 0.0,
                 schedule_step: Optional[Callable[[], None]] = None, amp: str = "none") -> None:
        reason = static_step_refusal(supernet)
        if reason is not None:
            raise ValueError("the static search step does not apply: " + reason)
        self.supernet, self.optimizers, self.scheduler = supernet, list(optimizers), scheduler
        self.criterion, self.batched, self.scaler, self.grad_clip = criterion, batched, scaler, grad_clip
        self.schedule_step, self.amp = schedule_step, amp
        self._gates = _Gates()
        self._units: List[Tuple[IrepConv, str]] = []
        self._block_units: List[List[Tuple[int, str, int]]] = []
        for block in supernet.blocks:
            index = {op: i for i, op in enumerate(block.ops)}
            mine = []
            for name in sorted(block.branches, key=index.__getitem__):
                mine.append((len(self._units), name, index[name]))
                self._units.append((block, name))
            self._block_units.append(mine)
        self._rows: Dict[ArchCode, List[float]] = {}
        self._unit_of_bn: Dict[int, int] = {}
        for unit, (block, name) in enumerate(self._units):
            for m in block.branches[name].modules():
                if isinstance(m, _BatchNorm):
                    self._unit_of_bn[id(m)] = unit
        ensure_optimizer_state(self.optimizers)
        self._guard_units = self._guarded_tensors()

    @property
    def units(self) -> List[Tuple[IrepConv, str]]:
        """(block, op) of every gate column."""
        return list(self._units)

    def gates(self, codes: Sequence[ArchCode]) -> torch.Tensor:
        rows = [self._row(code) for code in codes]
        dev = next(self.supernet.model.parameters()).device
        table = torch.tensor(rows, dtype=torch.float32).reshape(len(codes), len(self._units))
        if dev.type == "cuda":  # from pinned memory the copy need not wait for the GPU's queued steps
            return table.pin_memory().to(dev, non_blocking=True)
        return table.to(dev)

    def _row(self, code: ArchCode) -> List[float]:
        row = self._rows.get(code)
        if row is None:
            plan = [set(ops) for _, ops in plan_arch(self.supernet.model, code)]
            row = [1.0 if name in plan[block] else 0.0
                   for block, units in enumerate(self._block_units) for _, name, _ in units]
            self._rows[code] = row
            if len(self._rows) > ROW_CACHE:
                self._rows.pop(next(iter(self._rows)))
        return row

    # -- the step -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, gates: torch.Tensor) -> List[torch.Tensor]:
        """The logits of each subnet (gate row), in order."""
        model = self.supernet.model
        with self._patched():
            if self.batched:
                self._gates.rows = gates
                subnets = gates.shape[0]
                logits = model(x.repeat((subnets,) + (1,) * (x.dim() - 1)))
                return list(_grouped(logits, subnets).unbind(0))
            outs = []
            for g in range(gates.shape[0]):
                self._gates.rows = gates[g:g + 1]
                outs.append(model(x))
            return outs

    def step(self, x: torch.Tensor, y: torch.Tensor, gates: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        with autocast(self.amp, x.device, cache=False):
            outputs = self.forward(x, gates)
            loss = averaged_loss([o.float() for o in outputs], y, self.criterion)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        held = gates.amax(0) > 0
        saved = [[t.clone() for t in tensors] for _, tensors in self._guard_units]
        optimizer_step(loss, self.optimizers, _Schedule(self.scheduler, self.schedule_step), self.scaler,
                       self.grad_clip)
        with torch.no_grad():
            for (unit, tensors), old in zip(self._guard_units, saved):
                keep = self._held_of(held, unit)
                for t, before in zip(tensors, old):
                    # Adam's step count lives on the host unless the optimizer is capturable or fused
                    t.copy_(torch.where(keep.to(t.device), t, before))
        return loss, outputs[-1]

    # -- helpers --------------------------------------------------------------------------------
    def _held_of(self, held: torch.Tensor, unit: Any) -> torch.Tensor:
        """Whether a step's codes held ``unit``: a gate column, or (alpha/beta) any of a block's,
        whose indices live on the device (a list index would be copied from the host: no such copy
        may happen inside a CUDA graph's capture)."""
        if isinstance(unit, int):
            return held[unit]
        return held.index_select(0, unit).any()

    def _guarded_tensors(self) -> List[Tuple[Any, List[torch.Tensor]]]:
        """(gate column, or a block's columns on the device; tensors) per branch and per block's
        alpha/beta: what a step must leave alone when no code of the step holds it."""
        state = {}
        for opt in self.optimizers:
            for p, s in opt.state.items():
                state[id(p)] = [v for v in s.values() if isinstance(v, torch.Tensor)]
        def with_state(params: Any) -> List[torch.Tensor]:
            return [t for p in params for t in [p.data] + state.get(id(p), [])]

        guarded: List[Tuple[Any, List[torch.Tensor]]] = [
            (unit, with_state(block.branches[name].parameters())) for unit, (block, name) in enumerate(self._units)]
        for block, units in zip(self.supernet.blocks, self._block_units):
            columns = torch.tensor([u for u, _, _ in units], dtype=torch.long, device=block.alpha.device)
            guarded.append((columns, with_state((block.alpha, block.beta))))
        return guarded

    @contextlib.contextmanager
    def _patched(self) -> Iterator[None]:
        """Each block, OneByOneThen branch and BatchNorm of the SuperNet runs its gated forward."""
        patched: List[nn.Module] = []
        try:
            for block, units in zip(self.supernet.blocks, self._block_units):
                block.forward = _bind(_block, block, self._gates, units)  # type: ignore[method-assign]
                patched.append(block)
            for m in self.supernet.model.modules():
                if isinstance(m, OneByOneThen):
                    m.forward = _bind(_one_by_one_then, m, self._gates)  # type: ignore[method-assign]
                    patched.append(m)
                elif isinstance(m, _BatchNorm):
                    m.forward = _bind(_batch_norm, m, self._gates, self._unit_of_bn.get(id(m)))  # type: ignore[method-assign]
                    patched.append(m)
            yield
        finally:
            for m in patched:
                del m.forward
                if hasattr(m, "_irep_group_stats"):
                    del m._irep_group_stats
            self._gates.rows = None


def _bind(fn: Callable[..., torch.Tensor], *args: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return fn(*args, x)
    return forward


class _Schedule:
    """The scheduler stepped as optimizer_step steps it, or the caller's own step (a device-side
    schedule inside a captured step)."""

    def __init__(self, scheduler: Any, step: Optional[Callable[[], None]]) -> None:
        self.scheduler, self._step = scheduler, step

    def step(self) -> None:
        if self._step is not None:
            self._step()
        else:
            self.scheduler.step()


def ensure_optimizer_state(optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Create, as zeros, the state a first step of each optimizer would create for every parameter
    that has none: SGD's momentum buffer (exact when dampening is 0: the first step's buffer is the
    gradient, and momentum * 0 + gradient is that), Adam's moments and step count. A state that
    exists before any step lets a step restore a parameter's state without creating or deleting
    entries, which a captured step cannot do."""
    for opt in optimizers:
        for group in opt.param_groups:
            if isinstance(opt, torch.optim.SGD):
                if group["momentum"] and group["dampening"]:
                    raise ValueError("SGD with dampening: a zero momentum buffer is not its first step")
                if group["momentum"]:
                    zero_momentum(opt, group)
            elif isinstance(opt, torch.optim.Adam):
                on_device = group.get("capturable") or group.get("fused")
                # the dtype and place torch's own first step gives the count
                dtype = torch.float32 if group.get("fused") or torch.get_default_dtype() != torch.float64 \
                    else torch.float64
                for p in group["params"]:
                    state = opt.state[p]
                    if state:
                        continue
                    state["step"] = torch.zeros((), dtype=dtype, device=p.device if on_device else "cpu")
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if group.get("amsgrad"):
                        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            else:
                raise ValueError("no up-front state for {}".format(type(opt).__name__))


def graphed_step(supernet: SuperNet, w_opt: torch.optim.Optimizer, a_opt: torch.optim.Optimizer, scheduler: Any,
                 criterion: nn.Module, dev: torch.device, batched: bool, capture: bool, scaler: Any = None,
                 amp: str = "none") -> Tuple[StepGraph, DeviceSchedule, StaticSearchStep]:
    """The static step as the search runs it: the optimizers switched to fused kernels with the
    cosine schedule on the device (graphs.make_capturable, so after any load of their state), in a
    StepGraph that captures it where ``capture``. The graph is called with (x, y, gates) and returns
    (loss, right predictions of the last subnet), as run_graph_epoch reads them."""
    schedule = make_capturable([w_opt, a_opt], scheduler, dev)
    stepper = StaticSearchStep(supernet, [w_opt, a_opt], scheduler, criterion, batched=batched, scaler=scaler,
                               schedule_step=schedule.step, amp=amp)

    def step(x: torch.Tensor, y: torch.Tensor, gates: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        loss, logits = stepper.step(x, y, gates)
        return loss.detach(), correct_count(logits, y)

    return StepGraph(step, dev, enabled=capture), schedule, stepper
