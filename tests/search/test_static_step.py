"""The static search step computes what today's eager step computes (issue 23, item 2).

Two copies of the same search (same seed, so the same SuperNet, optimizers and schedule) take the
same batches of real data (sklearn digits, Fashion-MNIST) and the same codes: one by the eager step
the search has always used (SuperNet.forward + averaged_loss + steps.optimizer_step), one by
StaticSearchStep, sequential and batched. After every step the losses, every parameter, every
BatchNorm statistic and the optimizers' state agree to float rounding; a branch no code of a step
holds is left bit for bit (no weight decay, momentum or moment decay).
"""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from irep_deploy import ArchCode
from irep_deploy.block import set_drop_path
from irep_deploy.runtime import Dist
from irep_deploy.search.des import _Search, make_config
from irep_deploy.search.static_step import StaticSearchStep, ensure_optimizer_state, static_step_refusal
from irep_deploy.search.supernet import averaged_loss
from irep_deploy.steps import optimizer_step
from static_step_checks import assert_states_close, code_sets, state_tensors, unheld_moved

STEPS = 12


def _job(tmp_path, name, **overrides):
    settings = dict(backbone="resnet18_cifar", dataset="digits", width=0.125, population=8, subnets=3,
                    warmup_epochs=1, rounds=1, round_epochs=1, batch_size=32, limit=600, seed=5)
    settings.update(overrides)
    return _Search(tmp_path / name, make_config(None, **settings), torch.device("cpu"), Dist(), None, progress=False)


def _eager_step(job, x, y, codes):
    outputs = job.supernet(x, codes)
    loss = averaged_loss([o.float() for o in outputs], y, job.criterion)
    for opt in (job.w_opt, job.a_opt):
        opt.zero_grad(set_to_none=True)
    optimizer_step(loss, [job.w_opt, job.a_opt], job.sched)
    return loss, outputs[-1]


@pytest.mark.parametrize("batched", [False, True], ids=["sequential", "batched"])
def test_static_step_equals_the_eager_step_over_many_steps(tmp_path, batched):
    """In float64, so that what differs is the algorithm, not the order of float32 sums (a batched
    convolution sums in another order than B small ones)."""
    torch.set_num_threads(1)
    eager, static = _job(tmp_path, "eager"), _job(tmp_path, "static")
    for job in (eager, static):
        job.supernet.model.double()
    stepper = StaticSearchStep(static.supernet, [static.w_opt, static.a_opt], static.sched, static.criterion,
                               batched=batched)
    torch.manual_seed(0)
    batches = itertools.islice(iter(eager.loader), STEPS)
    codes = code_sets(eager, random.Random(1))
    checked = 0
    for step, ((x, y), chosen) in enumerate(zip(batches, codes)):
        before = {k: v.clone() for k, v in state_tensors(static).items()}
        x = x.double()
        loss_e, logits_e = _eager_step(eager, x, y, chosen)
        loss_s, logits_s = stepper.step(x, y, stepper.gates(chosen))
        assert torch.allclose(loss_e, loss_s, rtol=1e-10, atol=1e-12), (step, float(loss_e), float(loss_s))
        assert torch.allclose(logits_e, logits_s, rtol=1e-9, atol=1e-10)
        after = state_tensors(static)
        assert_states_close(state_tensors(eager), after, "step {}".format(step + 1), rtol=1e-8, atol=1e-10)
        count, moved = unheld_moved(static, chosen, before, after)
        assert not moved, "step {}: {} moved although no code held them".format(step + 1, moved)
        checked += count
    assert checked > 0
    assert static.sched.last_epoch == eager.sched.last_epoch == STEPS


def _plan(job, code):
    from irep_deploy.binding import plan_arch
    return [ops for _, ops in plan_arch(job.supernet.model, code)]


def test_batched_step_on_fashion_mnist_at_28_px(tmp_path):
    """The full-size input of the paper's search on Fashion-MNIST, channels_last, B = 5, float32.

    Float32 rounding grows fast here (lr 0.1, batches of 16), so the yardstick is the eager step's
    own: the static step may differ from the eager step no more than the eager step in channels_last
    differs from itself in the contiguous layout (float64 above holds the algorithm to 1e-8)."""
    torch.set_num_threads(1)
    settings = dict(dataset="fashion-mnist", subnets=5, limit=200, batch_size=16)
    eager = _job(tmp_path, "eager", channels_last=True, **settings)
    layout = _job(tmp_path, "layout", channels_last=False, **settings)
    static = _job(tmp_path, "static", channels_last=True, **settings)
    stepper = StaticSearchStep(static.supernet, [static.w_opt, static.a_opt], static.sched, static.criterion)
    torch.manual_seed(0)
    rng = random.Random(2)
    for x, y in itertools.islice(iter(eager.loader), 2):
        chosen = [eager.population[rng.randrange(len(eager.population))] for _ in range(5)]
        nhwc = x.contiguous(memory_format=torch.channels_last)
        loss_e, _ = _eager_step(eager, nhwc, y, chosen)
        loss_l, _ = _eager_step(layout, x, y, chosen)
        loss_s, _ = stepper.step(nhwc, y, stepper.gates(chosen))
        assert abs(float(loss_s.detach() - loss_e.detach())) <= max(abs(float(loss_l.detach() - loss_e.detach())), 1e-6)

    def model(job):
        return {k: v.double() for k, v in state_tensors(job).items() if k.startswith("model.") and v.is_floating_point()}

    def gap(a, b):
        return max(float((a[k] - b[k]).abs().max()) for k in a)

    ours, yardstick = gap(model(static), model(eager)), gap(model(layout), model(eager))
    assert 0 < yardstick and ours <= yardstick, (ours, yardstick)


def test_gates_follow_the_codes(tmp_path):
    job = _job(tmp_path, "gates")
    stepper = StaticSearchStep(job.supernet, [job.w_opt, job.a_opt], job.sched, job.criterion)
    codes = [job.template, ArchCode.empty(job.template.backbone, job.template.ops), job.population[0]]
    gates = stepper.gates(codes)
    assert gates.shape == (3, len(stepper.units)) and gates.dtype == torch.float32
    assert gates[0].eq(1).all() and gates[1].eq(0).all()
    assert int(gates[2].sum()) == job.population[0].count()
    plan = _plan(job, job.population[0])
    index = {id(b): i for i, b in enumerate(job.supernet.blocks)}
    for column, (block, op) in enumerate(stepper.units):
        assert bool(gates[2, column]) == (op in plan[index[id(block)]])


def test_up_front_state_is_what_a_first_step_creates():
    """A zero momentum buffer and zero Adam moments give the first step the lazily created state gives."""
    torch.manual_seed(0)
    w = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(2)]
    grads = [torch.randn(5, 3) for _ in range(2)]
    for make in (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True),
                 lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.5, 0.999), weight_decay=1e-3)):
        lazy_params = [torch.nn.Parameter(p.detach().clone()) for p in w]
        eager_params = [torch.nn.Parameter(p.detach().clone()) for p in w]
        lazy, ready = make(lazy_params), make(eager_params)
        ensure_optimizer_state([ready])
        for _ in range(3):
            for ps in (lazy_params, eager_params):
                for p, g in zip(ps, grads):
                    p.grad = g.clone()
            lazy.step()
            ready.step()
        for a, b in zip(lazy_params, eager_params):
            assert torch.equal(a, b)


def test_refusals(tmp_path):
    job = _job(tmp_path, "refuse")
    assert static_step_refusal(job.supernet) is None
    set_drop_path(job.supernet.model, 0.1)
    assert "drop-path" in static_step_refusal(job.supernet)
    with pytest.raises(ValueError, match="drop-path"):
        StaticSearchStep(job.supernet, [job.w_opt, job.a_opt], job.sched, job.criterion)
    set_drop_path(job.supernet.model, 0.0)
    bn = next(m for m in job.supernet.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.momentum = None
    assert "momentum=None" in static_step_refusal(job.supernet)


def test_the_modules_are_as_before_after_a_step(tmp_path):
    """The gated forwards live only inside the step: afterwards the SuperNet runs (and fuses) as ever."""
    job = _job(tmp_path, "after")
    stepper = StaticSearchStep(job.supernet, [job.w_opt, job.a_opt], job.sched, job.criterion)
    x, y = next(iter(job.loader))
    stepper.step(x, y, stepper.gates(job.population[:3]))
    assert all("forward" not in vars(m) for m in job.supernet.model.modules())
    job.supernet.model.eval()
    code = job.population[0]
    with torch.no_grad():
        out = job.supernet(x, [code])[0]
        fused = job.fused(code)(x)
    assert torch.allclose(out, fused, rtol=1e-4, atol=1e-4)


# -- the search driving it ------------------------------------------------------------------------------
def _model_state(job):
    return {k: v.double() for k, v in job.supernet.model.state_dict().items() if v.is_floating_point()}


@pytest.mark.parametrize("layout", ["sequential", "batched"])
def test_a_search_epoch_with_the_static_step_trains_as_the_eager_epoch(tmp_path, layout):
    """The search's own epoch (codes drawn per batch, device schedule, fused optimizers) on real
    digits: three steps, equal to the eager epoch to float32 rounding; its saved optimizer state is
    the eager step's format (float lr, unfused), so either step resumes it."""
    torch.set_num_threads(1)
    settings = dict(limit=120, batch_size=32)  # 108 training examples: 3 steps
    eager = _job(tmp_path, "eager", **settings)
    static = _Search(tmp_path / "static", make_config(None, **dict(_SETTINGS, **settings)), torch.device("cpu"),
                     Dist(), None, progress=False, search_step=layout, cuda_graph="auto")
    assert static.static == layout and not static.capture  # auto on the CPU: no capture
    for job in (eager, static):  # float64, so that what differs is the algorithm, not float32 rounding
        job.supernet.model.double()
        split = job.loader.dataset
        split.transform = _Double(split.transform)
    a, b = eager.train_epoch(), static.train_epoch()
    assert a.train_loss == pytest.approx(b.train_loss, rel=1e-10)
    assert a.lr == pytest.approx(b.lr, rel=1e-9) and static.sched.last_epoch == eager.sched.last_epoch == 3
    ours, theirs = _model_state(static), _model_state(eager)
    for key in theirs:  # the device schedule's lr is a float32 tensor: a relative 1e-8 per step
        assert torch.allclose(ours[key], theirs[key], rtol=1e-6, atol=1e-7), (key, float((ours[key] - theirs[key]).abs().max()))
    saved = static.state()
    for part in ("w_opt", "a_opt"):
        group = saved[part]["param_groups"][0]
        assert isinstance(group["lr"], float) and not group.get("fused")
    resumed = _job(tmp_path, "resumed", **settings)
    resumed.restore(saved)  # the eager step continues a static run
    resumed.train_epoch()


class _Double:
    """A split's transform, then float64."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, x):
        return self.transform(x).double()


_SETTINGS = dict(backbone="resnet18_cifar", dataset="digits", width=0.125, population=8, subnets=3,
                 warmup_epochs=1, rounds=1, round_epochs=1, batch_size=32, limit=600, seed=5)


def test_step_plans_and_refusals(tmp_path):
    from irep_deploy.errors import UsageError
    from irep_deploy.search.des import plan_step
    job = _job(tmp_path, "plan")
    cpu = torch.device("cpu")
    plan = lambda step, graph, dist=Dist(): plan_step(step, graph, job.supernet, cpu, dist, job.config)  # noqa: E731
    assert plan("auto", "auto") == (None, False)  # the CPU default is today's eager step
    assert plan("batched", "off") == ("batched", False)
    assert plan("sequential", "auto") == ("sequential", False)
    with pytest.raises(UsageError, match="CUDA graphs need a CUDA device"):
        plan("batched", "on")
    with pytest.raises(UsageError, match="DDP"):
        plan("batched", "off", Dist(rank=0, world_size=2))
    assert plan("auto", "off", Dist(rank=0, world_size=2)) == (None, False)
    set_drop_path(job.supernet.model, 0.2)
    with pytest.raises(UsageError, match="drop-path"):
        plan("sequential", "off")


def test_cli_refuses_a_capture_it_cannot_make(tmp_path):
    from tests.conftest import run_cli
    code, out, err = run_cli(tmp_path, "search", "--preset", "cpu", "--dataset", "digits", "--search-step", "batched",
                             "--cuda-graph", "on", "--device", "cpu", "-o", tmp_path / "run")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "CUDA graphs need a CUDA device" in err, err
    assert not (tmp_path / "run").exists()
