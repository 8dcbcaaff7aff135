"""Whole-step CUDA graphs (irep_deploy/graphs.py, `train --cuda-graph`) on a real GPU: a replayed step
equals the same step run eagerly (fp32, bf16, fp16 with the scaler), the captured path equals the
eager loop (steps.run_epoch) in float64, replays read nothing on the host, and `train` end to end.
Real data (digits). Skipped without CUDA (tests/conftest.py); `make test-gpu` runs them.
Written without a GPU at hand: none of these has run yet (docs/training.md, "CUDA graphs")."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn as nn

from irep_deploy import ArchCode
from irep_deploy.block import keep_mask, set_drop_path
from irep_deploy.cli import main
from irep_deploy.data import load_data, set_epoch, train_loader
from irep_deploy.graphs import StepGraph, make_capturable, make_train_step, run_graph_epoch
from irep_deploy.models import build_model
from irep_deploy.precision import exact_fp32
from irep_deploy.runtime import Dist, make_scaler
from irep_deploy.steps import run_epoch

# tests/conftest.py marks every test under tests/gpu `cuda` and skips it, with the reason, without CUDA.
pytest.importorskip("sklearn")  # digits

BACKBONE = "resnet18_cifar"
STEPS = 30


@contextlib.contextmanager
def _deterministic_cudnn():
    """The same kernels in the eager and the captured run (cuDNN's default backward is not deterministic)."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        with exact_fp32():
            yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def _batches(dev, dtype=torch.float32, count=STEPS):
    data = load_data("digits", None)
    loader = train_loader(data.train, 32, seed=3)  # 1437 examples: 44 batches of 32
    set_epoch(loader, 3, 0)
    return [(x.to(dev, dtype), y.to(dev)) for _, (x, y) in zip(range(count), loader)]


def _setup(dev, dtype=torch.float32, branches=True, drop=0.0):
    torch.manual_seed(0)
    model = build_model(BACKBONE, arch=ArchCode.full(BACKBONE) if branches else None, num_classes=10, width=0.125,
                        in_channels=1, input_size=8).to(dev, dtype)
    set_drop_path(model, drop)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2 * STEPS)
    return model, opt, sched


def _loss_fn(model):
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)

    def loss_of(x, y):
        out = model(x)
        return criterion(out.float(), y), out
    return loss_of


def _run(dev, amp, capture, batches):
    model, opt, sched = _setup(dev)
    scaler = make_scaler(amp, dev)
    schedule = make_capturable([opt], sched, dev)
    graph = StepGraph(make_train_step(_loss_fn(model), [opt], schedule, dev, scaler, amp, grad_clip=2.0), dev,
                      enabled=capture)
    torch.manual_seed(1)
    losses = []
    for x, y in batches:
        loss, _ = graph(x, y)
        losses.append(loss.clone())  # a static output: the next replay overwrites it
    assert graph.captured == capture
    schedule.sync_to_scheduler()
    return torch.stack(losses).tolist(), model, sched, scaler


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_a_replayed_step_equals_the_same_step_run_eagerly(cuda, amp):
    batches = _batches(cuda)
    with _deterministic_cudnn():
        eager_losses, eager_model, eager_sched, eager_scaler = _run(cuda, amp, False, batches)
        graph_losses, graph_model, graph_sched, graph_scaler = _run(cuda, amp, True, batches)
    rel = 1e-5 if amp == "none" else 1e-3
    assert all(math.isfinite(v) for v in graph_losses) or amp == "fp16"  # fp16: the scaler skips inf steps
    assert graph_losses == pytest.approx(eager_losses, rel=rel, nan_ok=True)
    for (k, a), b in zip(graph_model.state_dict().items(), eager_model.state_dict().values()):
        if a.is_floating_point():
            assert torch.allclose(a, b, rtol=rel, atol=rel * b.abs().max().item() + 1e-12), k
    assert graph_sched.state_dict() == eager_sched.state_dict()
    if amp == "fp16":
        assert graph_scaler.get_scale() == eager_scaler.get_scale()


def test_the_captured_step_equals_the_eager_loop_in_float64(cuda):
    """Against today's loop (unfused SGD, scheduler.step()); float64, since on this tiny network
    float32 rounding differences between fused and unfused SGD grow fast (tests/train/test_graph_step.py)."""
    batches = _batches(cuda, torch.float64)
    with _deterministic_cudnn():
        eager_model, eager_opt, eager_sched = _setup(cuda, torch.float64)
        eager = run_epoch(eager_model, batches, _loss_fn(eager_model), [eager_opt], eager_sched, cuda, Dist(),
                          grad_clip=2.0)
        model, opt, sched = _setup(cuda, torch.float64)
        schedule = make_capturable([opt], sched, cuda)
        graph = StepGraph(make_train_step(_loss_fn(model), [opt], schedule, cuda, grad_clip=2.0), cuda)
        totals = run_graph_epoch(graph, batches, schedule, cuda, Dist(), model)
    assert graph.captured
    assert totals.loss == pytest.approx(eager.loss, rel=1e-5)
    for (k, a), b in zip(model.state_dict().items(), eager_model.state_dict().values()):
        if a.is_floating_point():
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item() + 1e-12), k
    assert sched.last_epoch == eager_sched.last_epoch == STEPS
    assert sched.get_last_lr()[0] == pytest.approx(eager_sched.get_last_lr()[0], rel=1e-12)


@pytest.mark.parametrize("amp", ["none", "fp16"])
def test_replays_read_nothing_on_the_host(cuda, amp):
    batches = _batches(cuda, count=12)
    model, opt, sched = _setup(cuda, drop=0.1)
    schedule = make_capturable([opt], sched, cuda)
    graph = StepGraph(make_train_step(_loss_fn(model), [opt], schedule, cuda, make_scaler(amp, cuda), amp,
                                      grad_clip=2.0), cuda)
    for x, y in batches[:4]:  # warm-up (3) and the capture
        graph(x, y)
    assert graph.captured
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync raises
    try:
        for x, y in batches[4:]:
            graph(x, y)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    schedule.sync_to_scheduler()
    assert sched.last_epoch == len(batches)


def test_drop_path_masks_are_new_at_each_replay_and_follow_the_seed(cuda):
    """Philox under capture: each replay draws from the generator's current seed and offset."""
    x = torch.ones(256, 4, device=cuda)
    graph = StepGraph(lambda t: (keep_mask(t, 0.5),), cuda, warmup=1)

    def masks(seed):
        torch.manual_seed(seed)
        return [graph(x)[0].clone() for _ in range(4)]

    graph(x)
    graph(x)  # warm-up, capture
    first, again, other = masks(7), masks(7), masks(8)
    assert graph.captured
    assert not torch.equal(first[0], first[1])  # not one mask frozen into the graph
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # the epoch's seed decides the masks
    assert not torch.equal(first[0], other[0])
    assert all(0.3 < m.eq(0).float().mean().item() < 0.7 for m in first)


def test_train_captures_by_default_and_resumes(tmp_path, capsys):
    from irep_deploy.runs import read_run_state
    from irep_deploy.train import TrainConfig, train

    config = TrainConfig(backbone=BACKBONE, arch=ArchCode.random(BACKBONE, ratio=0.5, seed=1).dumps(),
                         dataset="digits", width=0.125, epochs=2, batch_size=64, seed=5, drop_path=0.1,
                         grad_clip=5.0, label_smoothing=0.1)
    full = train(tmp_path / "full", config, progress=False, device="cuda")  # auto: captured
    assert all(math.isfinite(r["train_loss"]) for r in full.history)
    assert all(r.get("cuda_graph") is True for r in full.history)
    assert full.fused_rel_error < 1e-4 and full.disagreements == 0  # the fused check stays true FP32

    class Stop(Exception):
        pass

    def stop(epoch, record):
        raise Stop()

    with pytest.raises(Stop):
        train(tmp_path / "resumed", config, progress=False, device="cuda", on_epoch_end=stop, cuda_graph="on")
    state = read_run_state(tmp_path / "resumed", "train", TrainConfig)[0]
    group = state["optimizer"]["param_groups"][0]
    assert isinstance(group["lr"], float) and not group.get("fused")  # saved as the eager loop saves
    resumed = train(tmp_path / "resumed", resume=True, progress=False, device="cuda", cuda_graph="off")
    assert "cuda_graph" not in resumed.history[-1] and resumed.history[0].get("cuda_graph") is True
    assert resumed.resumed_from_epoch == 1 and resumed.fused_rel_error < 1e-4
    a = read_run_state(tmp_path / "full", "train", TrainConfig)[0]["scheduler"]
    b = read_run_state(tmp_path / "resumed", "train", TrainConfig)[0]["scheduler"]
    assert a["last_epoch"] == b["last_epoch"] and a["_last_lr"] == pytest.approx(b["_last_lr"], abs=1e-15)

    capsys.readouterr()
    rc = main(["train", "-o", str(tmp_path / "det"), "--backbone", BACKBONE, "--dataset", "digits", "--width",
               "0.125", "--epochs", "1", "--device", "cuda", "--deterministic", "--cuda-graph", "on"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--deterministic" in err
