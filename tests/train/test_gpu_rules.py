"""Rules of the CUDA path that can be checked on CPU: the arithmetic of the final check, the
deterministic mode, the device of each torchrun rank, the fp16 scaler's skipped steps, and the
non-finite-loss stop kept on the device (issue 15, items 2, 5, 6, 10, 11)."""
from __future__ import annotations

import dataclasses
import math
import os
import warnings

import pytest
import torch
import torch.nn as nn

from irep_deploy import ArchCode
from irep_deploy.cli import main
from irep_deploy.errors import IrepError
from irep_deploy.runs import read_run_state
from irep_deploy.train import TrainConfig, train

pytest.importorskip("sklearn")  # digits

BACKBONE = "resnet18_cifar"
CODE = ArchCode.random(BACKBONE, ratio=0.25, seed=1)
SMALL = TrainConfig(backbone=BACKBONE, arch=CODE.dumps(), dataset="digits", width=0.125, epochs=1,
                    batch_size=64, limit=256, seed=5)


class Flags:
    """What the backend flags were at every forward of a top-level irep model (a global forward hook)."""

    def __init__(self) -> None:
        self.seen = []

    def __enter__(self) -> "Flags":
        def hook(module, inputs, output):
            if hasattr(module, "irep_config"):
                self.seen.append({
                    "training": module.training,
                    "cudnn_tf32": torch.backends.cudnn.allow_tf32,
                    "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
                    "cudnn_deterministic": torch.backends.cudnn.deterministic,
                    "cudnn_benchmark": torch.backends.cudnn.benchmark,
                    "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
                    "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
                    "cublas_workspace": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                })
        self.handle = nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


@pytest.fixture
def tf32_on():
    """The user's fast setting (cuDNN's default; matmul TF32 switched on too), restored after."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_final_fused_check_runs_in_true_fp32_and_training_keeps_tf32(tmp_path, tf32_on):
    with Flags() as flags:
        train(tmp_path / "run", SMALL, progress=False, device="cpu")
    training = [f for f in flags.seen if f["training"]]
    checking = [f for f in flags.seen if not f["training"]]  # no val split: every eval forward is the final check
    assert training and checking
    assert all(f["cudnn_tf32"] and f["matmul_tf32"] for f in training)
    assert not any(f["cudnn_tf32"] or f["matmul_tf32"] for f in checking)
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32  # restored


def test_deterministic_sets_the_flags_is_saved_and_restored_on_resume(tmp_path, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    cfg = dataclasses.replace(SMALL, epochs=2, deterministic=True)
    run = tmp_path / "det"

    class Stop(Exception):
        pass

    def stop(epoch, record):
        raise Stop()

    with Flags() as flags, pytest.raises(Stop):
        train(run, cfg, progress=False, device="cpu", on_epoch_end=stop)
    assert read_run_state(run, "train", TrainConfig)[0]["config"]["deterministic"] is True
    # the flags are the caller's again after the run, whatever ended it
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before
    with Flags() as resumed:
        train(run, resume=True, progress=False, device="cpu")
    for seen in (flags.seen, resumed.seen):
        assert seen and all(f["cudnn_deterministic"] and not f["cudnn_benchmark"] and f["deterministic_algorithms"]
                            and f["warn_only"] and f["cublas_workspace"] == ":4096:8" for f in seen)
    # without it nothing is switched on
    with Flags() as plain:
        train(tmp_path / "plain", SMALL, progress=False, device="cpu")
    assert not any(f["deterministic_algorithms"] for f in plain.seen)


def test_cli_deterministic_is_a_setting_of_the_run(tmp_path, capsys):
    arch = tmp_path / "arch.bin"
    CODE.save(arch)
    run = tmp_path / "cli"
    assert main(["train", "-o", str(run), "--arch", str(arch), "--dataset", "digits", "--width", "0.125",
                 "--epochs", "1", "--batch-size", "64", "--limit", "128", "--no-progress", "--device", "cpu",
                 "--deterministic"]) == 0
    assert read_run_state(run, "train", TrainConfig)[0]["config"]["deterministic"] is True
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--deterministic"]) == 2  # usage: a setting given with --resume
    assert "drop --deterministic" in capsys.readouterr().err


def test_under_torchrun_the_local_rank_decides_the_gpu(monkeypatch):
    from irep_deploy.runtime import cuda_index, resolve_device

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert cuda_index(torch.device("cuda")) == 0 and cuda_index(torch.device("cuda:2")) == 2
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cuda_index(torch.device("cuda")) == 1 and cuda_index(torch.device("cuda:1")) == 1
    with pytest.raises(IrepError, match=r"--device cuda:0 conflicts with LOCAL_RANK=1 under torchrun"):
        cuda_index(torch.device("cuda:0"))
    # resolve_device refuses the conflict before it looks for CUDA (here: none), so no NCCL traceback
    with pytest.raises(IrepError, match="conflicts with LOCAL_RANK=1"):
        resolve_device("cuda:0")


def test_cli_conflicting_gpu_index_under_torchrun_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    arch = tmp_path / "arch.bin"
    CODE.save(arch)
    rc = main(["train", "-o", str(tmp_path / "run"), "--arch", str(arch), "--dataset", "digits",
               "--device", "cuda:0"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "LOCAL_RANK=1" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def _cpu_scaler(**kwargs):
    if not (hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler")):
        pytest.skip("torch.amp.GradScaler (torch >= 2.3) is needed for a gradient scaler on CPU")
    return torch.amp.GradScaler("cpu", **kwargs)


def _loss_and_logits(model, x, y):
    out = model(x)
    return nn.functional.cross_entropy(out, y), out


def test_a_step_the_fp16_scaler_skips_keeps_the_schedule_without_a_warning(tmp_path):
    """The fp16 path on CPU: a gradient scaler whose first steps overflow (as they do while the scale
    settles) skips optimizer.step(); the scheduler must still follow the iteration count, silently."""
    from irep_deploy.data import load_data, train_loader
    from irep_deploy.models import build_model
    from irep_deploy.runtime import Dist
    from irep_deploy.steps import run_epoch

    scaler = _cpu_scaler(init_scale=2.0 ** 127)  # loss x 2^127 overflows float32: the first step is skipped
    data = load_data("digits", limit=256)
    loader = train_loader(data.train, 64, seed=0)
    torch.manual_seed(0)
    model = build_model(BACKBONE, arch=CODE, num_classes=10, width=0.125, in_channels=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    steps = len(loader)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=2 * steps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the old code's "lr_scheduler.step() before optimizer.step()" fails here
        totals = run_epoch(model, loader, lambda x, y: _loss_and_logits(model, x, y), [optimizer], scheduler,
                           torch.device("cpu"), Dist(), scaler)
    assert totals.diverged is None and totals.examples == steps * 64
    assert scaler.get_scale() < 2.0 ** 127  # at least one step was skipped
    assert scheduler.last_epoch == steps
    assert scheduler.get_last_lr()[0] == pytest.approx(0.1 * (1 + math.cos(math.pi * steps / (2 * steps))) / 2)


def _nan_rank(rank: int, world: int, port: int, every: int, out) -> None:
    import torch.distributed as tdist
    from irep_deploy.runtime import Dist
    from irep_deploy.steps import StepMonitor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        monitor = StepMonitor(torch.device("cpu"), Dist(rank, world), every=every)
        logits, target = torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)
        stopped = None
        for step in range(3 * every):
            loss = torch.tensor(float("nan") if (rank == 1 and step >= 3) else 1.0)
            bad = monitor.update(step, loss, logits, target)
            if bad is not None:
                stopped = (step, bad[0], math.isnan(bad[1]))
                break
        out.put((rank, stopped))
    finally:
        tdist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch built without gloo")
def test_a_non_finite_loss_on_one_rank_stops_every_rank_after_the_same_step():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_nan_rank, args=(r, 2, port, 5, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    # rank 1's loss goes bad at step index 3; both ranks learn it at the end of that interval (step index 4)
    # and both name step index 3
    assert results == {0: (4, 3, True), 1: (4, 3, True)}
