"""The training and search CUDA path on a real GPU (issue 15): an fp16 + channels-last epoch, a
deterministic resume, a search round, torchrun with NCCL, population evaluation on the device.
Real data (digits). Skipped without CUDA (tests/conftest.py); `make test-gpu` runs them."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from irep_deploy import ArchCode, load_checkpoint
from irep_deploy.cli import main

# tests/conftest.py marks every test under tests/gpu `cuda` and skips it, with the reason, without CUDA.
pytest.importorskip("sklearn")  # digits

BACKBONE = "resnet18_cifar"
CODE = ArchCode.random(BACKBONE, ratio=0.25, seed=1)


def _config(**kw):
    from irep_deploy.train import TrainConfig
    base = dict(backbone=BACKBONE, arch=CODE.dumps(), dataset="digits", width=0.125, epochs=1, batch_size=64,
                seed=5)
    base.update(kw)
    return TrainConfig(**base)


def test_one_fp16_channels_last_epoch_passes_the_fp32_fused_check(tmp_path):
    from irep_deploy.runs import read_run_state
    from irep_deploy.train import TrainConfig, train

    before = torch.backends.cudnn.allow_tf32
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Detected call of `lr_scheduler.step()`")
        report = train(tmp_path / "fp16", _config(amp="fp16"), progress=False, device="cuda", channels_last=True)
    assert torch.backends.cudnn.allow_tf32 == before  # training's setting is the user's again
    assert math.isfinite(report.history[0]["train_loss"])
    assert report.fused_rel_error < 1e-4 and report.disagreements == 0  # true FP32, not TF32
    assert read_run_state(tmp_path / "fp16", "train", TrainConfig)[0]["scaler"] is not None


def test_deterministic_resume_is_bit_identical_on_cuda(tmp_path):
    from irep_deploy.train import train

    cfg = _config(epochs=2, deterministic=True)
    train(tmp_path / "full", cfg, progress=False, device="cuda")

    class Stop(Exception):
        pass

    def stop(epoch, record):
        raise Stop()

    with pytest.raises(Stop):
        train(tmp_path / "resumed", cfg, progress=False, device="cuda", on_epoch_end=stop)
    train(tmp_path / "resumed", resume=True, progress=False, device="cuda")
    a = load_checkpoint(tmp_path / "full" / "ckpt.pt").state_dict
    b = load_checkpoint(tmp_path / "resumed" / "ckpt.pt").state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_search_round_on_cuda(tmp_path, capsys):
    run = tmp_path / "search"
    rc = main(["search", "--run-dir", str(run), "--dataset", "digits", "--backbone", BACKBONE, "--width", "0.125",
               "--population", "6", "--subnets", "2", "--warmup-epochs", "0", "--rounds", "1", "--round-epochs", "1",
               "--batch-size", "64", "--limit", "640", "--device", "cuda", "--amp", "fp16", "--channels-last",
               "--workers", "2", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    pop = json.loads((run / "population.json").read_text())
    assert len(pop["codes"]) == 6 and all(0 < c["fitness"] <= 100 for c in pop["codes"])


def test_torchrun_one_process_with_nccl(tmp_path):
    arch = tmp_path / "arch.bin"
    CODE.save(arch)
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m",
            "irep_deploy", "train", "--arch", str(arch), "--dataset", "digits", "--width", "0.125", "--epochs", "1",
            "--batch-size", "64", "--limit", "256", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ok = subprocess.run(base + ["-o", str(tmp_path / "run"), "--device", "cuda"], env=env, capture_output=True,
                        text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["fused_rel_error"] < 1e-4
    if torch.cuda.device_count() > 1:  # LOCAL_RANK 0 decides; cuda:1 conflicts: one line, no NCCL traceback
        bad = subprocess.run(base + ["-o", str(tmp_path / "bad"), "--device", "cuda:1"], env=env,
                             capture_output=True, text=True, timeout=600)
        assert bad.returncode != 0 and "conflicts with LOCAL_RANK=0" in bad.stderr
        assert "Traceback" not in bad.stderr.split("conflicts with")[0][-500:]


def test_population_evaluation_on_the_gpu_matches_the_per_code_path(tmp_path):
    from irep_deploy.data import eval_loader
    from irep_deploy.reparam import fuse_model
    from irep_deploy.search.des import _Search, make_config
    from irep_deploy.evaluation import evaluate_models
    from irep_deploy.runtime import Dist, deterministic_mode

    dev = torch.device("cuda")
    config = make_config(None, backbone=BACKBONE, dataset="digits", width=0.125, population=6, subnets=2,
                         warmup_epochs=0, rounds=1, round_epochs=1, batch_size=64, limit=640, eval_batch_size=50, seed=3)
    with deterministic_mode(True):
        job = _Search(tmp_path, config, dev, Dist(), None, progress=False)
        job.train_epoch()
        fitness = job.evaluate_population()
        assert job._val_cache is not None and all(x.is_cuda for x, _ in job._val_cache)  # kept on the device
        reference = []
        for code in job.population:
            (res,), _, _ = evaluate_models([fuse_model(job.supernet.model, arch=code)],
                                           eval_loader(job.data.val, 50), dev)
            reference.append(res.top1)
    assert fitness == reference
