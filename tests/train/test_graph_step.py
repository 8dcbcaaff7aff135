"""The captured training step (irep_deploy/graphs.py) on CPU: the step a StepGraph wraps, run eagerly
(fused SGD/Adam, the cosine schedule on the device), computes what the eager loop (steps.run_epoch)
computes; its checkpoints are the eager loop's; capture refusals and `--cuda-graph` errors.
The capture and replay themselves need CUDA: tests/gpu/test_graph_cuda.py."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from irep_deploy import ArchCode
from irep_deploy.block import set_drop_path
from irep_deploy.cli import main
from irep_deploy.data import load_data, set_epoch, train_loader
from irep_deploy.errors import UsageError
from irep_deploy.graphs import (DeviceSchedule, StepGraph, capture_refusal, make_capturable, make_train_step,
                                resolve_cuda_graph, run_graph_epoch)
from irep_deploy.models import build_model
from irep_deploy.runtime import Dist
from irep_deploy.steps import run_epoch
from irep_deploy.train import TrainConfig, train

pytest.importorskip("sklearn")  # digits

BACKBONE = "resnet18_cifar"
CPU = torch.device("cpu")
STEPS = 20
# float64 networks: fused and unfused SGD round differently (and the fused kernel reads a float32 lr);
# on this tiny network float32 differences of 1e-7 grow by x5 a step in some initialisations (the
# branch order, and so the init, follows string hashing), so only a float64 comparison stays tight.
DTYPE = torch.float64


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", None)


def _setup(arch, lr=0.1, nesterov=True, t_max=3 * STEPS, eta_min=0.0):
    torch.manual_seed(0)
    model = build_model(BACKBONE, arch=arch, num_classes=10, width=0.125, in_channels=1, input_size=8).to(DTYPE)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=eta_min)
    return model, opt, sched


def _recording_loss(model, criterion, losses):
    def loss_of(x, y):
        out = model(x)
        loss = criterion(out.float(), y)
        losses.append(loss.item())
        return loss, out
    return loss_of


def _batches(digits, epoch, count=STEPS):
    loader = train_loader(digits.train, 64, seed=3)
    set_epoch(loader, 3, epoch)
    return [(x.to(DTYPE), y) for _, (x, y) in zip(range(count), loader)]


def _close(a, b, rel=2e-5):
    """Tensors equal within rounding drift relative to each tensor's scale (see DTYPE)."""
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]) and a[k].is_floating_point():
            scale = a[k].abs().max().clamp_min(1e-3)
            assert ((a[k] - b[k]).abs().max() / scale).item() <= rel, k
        else:
            assert torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k], k


@pytest.mark.parametrize("branches", ["plain", pytest.param("every-branch", marks=pytest.mark.slow)])
def test_the_graph_step_run_eagerly_computes_what_run_epoch_computes(digits, branches):
    arch = ArchCode.full(BACKBONE) if branches == "every-branch" else None
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    batches = _batches(digits, 0)
    # A learning rate float32 holds exactly, kept constant (eta_min = lr): the device schedule's lr is a
    # float32 tensor, and a cosine value rounded to float32 (1e-8 relative) grew to a 4 % loss difference
    # within 12 steps in one CI run, while the float64 rounding of fused vs unfused SGD stays far below
    # the tolerance. The cosine itself is tested on its own below.
    eager_model, eager_opt, eager_sched = _setup(arch, lr=0.0625, eta_min=0.0625)
    graph_model, graph_opt, graph_sched = _setup(arch, lr=0.0625, eta_min=0.0625)
    drop = 0.2 if arch is not None else 0.0  # drop-path draws the same masks in the same order both ways
    set_drop_path(eager_model, drop)
    set_drop_path(graph_model, drop)
    eager_losses, graph_losses = [], []

    torch.manual_seed(11)
    eager = run_epoch(eager_model, batches, _recording_loss(eager_model, criterion, eager_losses), [eager_opt],
                      eager_sched, CPU, Dist(), grad_clip=1.0)
    schedule = make_capturable([graph_opt], graph_sched, CPU)
    step = make_train_step(_recording_loss(graph_model, criterion, graph_losses), [graph_opt], schedule, CPU,
                           grad_clip=1.0)
    graph = StepGraph(step, CPU)
    assert not graph.enabled  # CPU: the step runs eagerly, the same code the capture records
    torch.manual_seed(11)
    totals = run_graph_epoch(graph, batches, schedule, CPU, Dist(), graph_model)

    assert len(graph_losses) == len(eager_losses) == STEPS
    assert graph_losses == pytest.approx(eager_losses, rel=1e-5)
    assert (totals.examples, totals.diverged) == (eager.examples, None)
    assert totals.loss == pytest.approx(eager.loss, rel=1e-5)
    assert totals.top1 == pytest.approx(eager.top1, abs=100.0 / eager.examples + 1e-9)  # one prediction at most
    _close(graph_model.state_dict(), eager_model.state_dict())
    graph_state, eager_state = schedule.state_dict(graph_opt), eager_opt.state_dict()
    assert graph_state["param_groups"][0].keys() == eager_state["param_groups"][0].keys()
    for ours, theirs in zip(graph_state["param_groups"], eager_state["param_groups"]):
        lr, their_lr = ours.pop("lr"), theirs.pop("lr")
        assert isinstance(lr, float) and lr == pytest.approx(their_lr, rel=1e-12)
        assert ours == theirs  # fused/foreach flags as the eager optimizer has them
    _close({k: v["momentum_buffer"] for k, v in graph_state["state"].items()},
           {k: v["momentum_buffer"] for k, v in eager_state["state"].items()})
    sched_state, eager_sched_state = graph_sched.state_dict(), eager_sched.state_dict()
    assert sched_state.pop("_last_lr") == pytest.approx(eager_sched_state.pop("_last_lr"), rel=1e-12)
    assert sched_state == eager_sched_state  # last_epoch, _step_count: as many steps as the eager loop's


def test_the_device_cosine_is_cosine_annealing_over_a_full_schedule():
    for base, eta_min, t_max in ((0.1, 0.0, 97), (0.05, 1e-3, 40)):
        p = nn.Parameter(torch.zeros(3))
        eager_opt = torch.optim.SGD([p], lr=base)
        eager = torch.optim.lr_scheduler.CosineAnnealingLR(eager_opt, T_max=t_max, eta_min=eta_min)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(torch.optim.SGD([p], lr=base), T_max=t_max,
                                                           eta_min=eta_min)
        schedule = make_capturable([sched.optimizer], sched, CPU)
        assert sched.optimizer.param_groups[0]["lr"].dtype == torch.float32
        for count in range(1, t_max + 1):
            eager_opt.step()
            eager.step()
            schedule.step()
            expected = eager.get_last_lr()[0]
            assert sched.optimizer.param_groups[0]["lr"].item() == pytest.approx(expected, rel=1e-6, abs=1e-9)
            assert schedule.lr_at(count)[0] == pytest.approx(expected, rel=1e-12, abs=1e-15)
        schedule.sync_to_scheduler()
        assert (sched.last_epoch, sched._step_count) == (eager.last_epoch, eager._step_count) == (t_max, t_max + 1)
        assert sched.get_last_lr()[0] == pytest.approx(eta_min, abs=1e-15)


def test_a_resume_after_an_epoch_continues_as_the_uninterrupted_run(digits):
    """Save after epoch 1 as train does (DeviceSchedule.state_dict, scheduler.state_dict), load into a
    fresh plain optimizer and scheduler, switch again: epoch 2 ends where the uninterrupted run does."""
    criterion = nn.CrossEntropyLoss()
    epochs = [_batches(digits, 0, 8), _batches(digits, 1, 8)]

    def run(model, opt, sched, which):
        schedule = make_capturable([opt], sched, CPU)
        graph = StepGraph(make_train_step(_recording_loss(model, criterion, []), [opt], schedule, CPU), CPU)
        for epoch in which:
            run_graph_epoch(graph, epochs[epoch], schedule, CPU, Dist(), model)
        return schedule

    model, opt, sched = _setup(None, t_max=16)
    run(model, opt, sched, [0, 1])

    first, first_opt, first_sched = _setup(None, t_max=16)
    schedule = run(first, first_opt, first_sched, [0])
    saved = {"model": {k: v.clone() for k, v in first.state_dict().items()},
             "optimizer": schedule.state_dict(first_opt), "scheduler": first_sched.state_dict()}
    assert saved["scheduler"]["last_epoch"] == 8 and not torch.is_tensor(saved["optimizer"]["param_groups"][0]["lr"])
    resumed, resumed_opt, resumed_sched = _setup(None, t_max=16)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["optimizer"])
    resumed_sched.load_state_dict(saved["scheduler"])
    run(resumed, resumed_opt, resumed_sched, [1])

    assert resumed_sched.state_dict() == sched.state_dict()
    _close(resumed.state_dict(), model.state_dict(), rel=1e-6)


def test_adam_and_sgd_switched_together_step_as_the_unfused_ones(digits):
    """The search's pair: SGD on the weights (cosine), Adam on other parameters (constant lr)."""
    criterion = nn.CrossEntropyLoss()
    batches = _batches(digits, 0, 10)

    def setup():
        torch.manual_seed(0)
        model = build_model(BACKBONE, arch=ArchCode.full(BACKBONE), num_classes=10, width=0.125, in_channels=1,
                            input_size=8).to(DTYPE)
        arch = [p for n, p in model.named_parameters() if n.endswith(("alpha", "beta"))]
        weights = [p for n, p in model.named_parameters() if not n.endswith(("alpha", "beta"))]
        assert arch and weights
        w_opt = torch.optim.SGD(weights, lr=0.1, momentum=0.9, weight_decay=5e-4)
        a_opt = torch.optim.Adam(arch, lr=1e-2, betas=(0.5, 0.999))
        return model, w_opt, a_opt, torch.optim.lr_scheduler.CosineAnnealingLR(w_opt, T_max=10)

    eager_model, w1, a1, s1 = setup()
    run_epoch(eager_model, batches, _recording_loss(eager_model, criterion, []), [w1, a1], s1, CPU, Dist())
    model, w2, a2, s2 = setup()
    schedule = make_capturable([w2, a2], s2, CPU)
    assert a2.param_groups[0]["fused"] and not a2.param_groups[0]["capturable"]  # capturable is CUDA-only
    graph = StepGraph(make_train_step(_recording_loss(model, criterion, []), [w2, a2], schedule, CPU), CPU)
    run_graph_epoch(graph, batches, schedule, CPU, Dist(), model)
    _close(model.state_dict(), eager_model.state_dict())
    saved, eager_saved = schedule.state_dict(a2), a1.state_dict()
    assert saved["param_groups"] == eager_saved["param_groups"]
    for k, v in saved["state"].items():
        assert v["step"].device.type == "cpu" and v["step"].item() == eager_saved["state"][k]["step"].item() == 10
        _close({"m": v["exp_avg"], "v": v["exp_avg_sq"]},
               {"m": eager_saved["state"][k]["exp_avg"], "v": eager_saved["state"][k]["exp_avg_sq"]})


def test_a_step_graph_refuses_a_changed_input_shape_and_no_warm_up():
    calls = []
    graph = StepGraph(lambda x, y: calls.append(x.shape) or (x.sum(),), CPU)
    graph(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"one shape and dtype: got float32\[3, 3\], int64\[3\], first "
                                         r"float32\[4, 3\], int64\[4\]"):
        graph(torch.zeros(3, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="one shape and dtype"):
        graph(torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, dtype=torch.long))
    assert calls == [torch.Size([4, 3])]
    with pytest.raises(ValueError, match="at least 1 warm-up step"):
        StepGraph(lambda x: (x,), torch.device("cuda"), warmup=0)
    with pytest.raises(TypeError, match="CosineAnnealingLR"):
        p = nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=0.1)
        make_capturable([opt], torch.optim.lr_scheduler.StepLR(opt, 3), CPU)


def test_capture_refusals_and_the_modes():
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    assert "CUDA device (this run is on cpu)" in capture_refusal(CPU, Dist())
    assert "DDP" in capture_refusal(cuda, Dist(rank=0, world_size=2))
    assert "--deterministic" in capture_refusal(cuda, Dist(), deterministic=True)
    assert capture_refusal(cuda, Dist()) is None
    assert resolve_cuda_graph("auto", None) and not resolve_cuda_graph("auto", "no GPU")
    assert not resolve_cuda_graph("off", None)
    assert resolve_cuda_graph("on", None)
    with pytest.raises(UsageError, match="^--cuda-graph on: no GPU$"):
        resolve_cuda_graph("on", "no GPU")
    with pytest.raises(UsageError, match="choose from auto, on, off"):
        resolve_cuda_graph("sometimes", None)


def test_cuda_graph_on_is_a_one_line_usage_error_on_cpu(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "-o", str(out), "--backbone", BACKBONE, "--dataset", "digits", "--width", "0.125",
               "--epochs", "1", "--device", "cpu", "--cuda-graph", "on"])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert err.count("\n") == 1 and "--cuda-graph on: CUDA graphs need a CUDA device" in err
    with pytest.raises(UsageError):
        train(tmp_path / "lib", TrainConfig(backbone=BACKBONE, dataset="digits", width=0.125, epochs=1),
              device="cpu", progress=False, cuda_graph="on")
    assert not (tmp_path / "lib").exists()
    report = train(tmp_path / "auto", TrainConfig(backbone=BACKBONE, dataset="digits", width=0.125, epochs=1,
                                                  limit=256, batch_size=64), device="cpu", progress=True)
    assert "cuda_graph" not in report.history[0]  # auto on CPU: eager, and no word about it
    assert "CUDA graph" not in capsys.readouterr().err


def test_the_capturable_schedule_starts_where_a_loaded_scheduler_stands():
    p = nn.Parameter(torch.zeros(2))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(torch.optim.SGD([p], lr=0.2), T_max=30)
    for _ in range(7):
        sched.optimizer.step()
        sched.step()
    schedule = make_capturable([sched.optimizer], sched, CPU)
    assert isinstance(schedule, DeviceSchedule) and schedule.count.item() == 7
    assert sched.optimizer.param_groups[0]["lr"].item() == pytest.approx(0.1 * (1 + math.cos(math.pi * 7 / 30)),
                                                                          rel=1e-6)


def test_a_first_step_the_scaler_skips_leaves_zero_momentum_not_uninitialised_memory():
    """Fused SGD makes its momentum buffers with empty_like at its first step; a skipped first step
    (found_inf: the fp16 scaler's inf gradients) must not leave that memory to the next step."""
    torch.manual_seed(0)
    p, q = nn.Parameter(torch.randn(1000)), nn.Parameter(torch.randn(1000))
    q.data.copy_(p.data)
    grad = torch.randn(1000)
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=5e-4)
    eager = torch.optim.SGD([q], lr=0.1, momentum=0.9, weight_decay=5e-4)
    schedule = make_capturable([opt], torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10), CPU)
    before = p.detach().clone()
    p.grad = grad.clone()
    opt.found_inf = torch.ones(())  # what GradScaler.step hands a fused optimizer
    opt.step()
    del opt.found_inf
    assert torch.equal(p.detach(), before) and torch.equal(opt.state[p]["momentum_buffer"], torch.zeros(1000))
    p.grad, q.grad = grad.clone(), grad.clone()
    opt.step()
    eager.step()  # the unfused first step: the buffer is the gradient
    assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)
    assert torch.allclose(opt.state[p]["momentum_buffer"], eager.state[q]["momentum_buffer"], rtol=1e-6)
    assert isinstance(schedule, DeviceSchedule)
