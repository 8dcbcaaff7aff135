"""Training, resume, fusion agreement and evaluation on real data (scikit-learn digits)."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from irep_deploy import ArchCode, load_checkpoint
from irep_deploy.cli import main
from irep_deploy.data import load_data
from irep_deploy.pipeline import fuse
from irep_deploy.precision import exact_fp32
from irep_deploy.runs import read_run_state
from irep_deploy.train import TrainConfig, TrainingDiverged, evaluate, train

pytest.importorskip("sklearn")  # the digits data of every test here ships with scikit-learn

BACKBONE = "resnet18_cifar"
CODE = ArchCode.random(BACKBONE, ratio=0.25, seed=1)
# Device-aware: the GPU where there is one. Runs whose weights are compared bit for bit are
# deterministic (on CUDA, cuDNN's convolution backward is not otherwise); accuracies are compared on
# the device they were measured on, in true FP32 (the final check's arithmetic), never GPU vs CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = TrainConfig(backbone=BACKBONE, arch=CODE.dumps(), dataset="digits", width=0.125, epochs=2,
                   batch_size=64, seed=5, deterministic=True)


def _state(run):
    return read_run_state(run, "train", TrainConfig)[0]


class Stop(Exception):
    pass


def _stop_after(n):
    def hook(epoch, record):
        if epoch == n:
            raise Stop()
    return hook


def _weights(path):
    return load_checkpoint(path).state_dict


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One uninterrupted 2-epoch run, shared by the tests that only read it."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("runs") / "full"
    report = train(run, TINY, progress=False, device=DEVICE)
    return run, report


def test_run_writes_a_fusable_checkpoint_and_fused_accuracy_agrees(trained, tmp_path):
    run, report = trained
    for name in ("state.pt", "ckpt.pt", "arch.bin", "log.jsonl", "config.json", "metrics.json"):
        assert (run / name).is_file(), name
    assert ArchCode.load(run / "arch.bin") == CODE
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records] == ["epoch", "epoch", "final"]
    assert all(math.isfinite(r["train_loss"]) for r in records[:2])
    # Learned something: digits are 10 balanced classes, chance is 10 %.
    assert report.multi_branch.top1 > 30.0
    assert report.fused.top1 == report.multi_branch.top1 and report.disagreements == 0
    assert report.fused_rel_error < 1e-4
    assert report.multi_branch.examples == report.fused.examples == len(load_data("digits").test)
    ck = load_checkpoint(run / "ckpt.pt")
    assert ck.kind == "multi-branch" and ck.arch == CODE
    assert ck.header["input_size"] == 8  # the resolution trained at (digits), not the backbone's 32
    assert ck.header["extra"]["test_top1"] == report.multi_branch.top1
    deploy = tmp_path / "deploy.pt"
    fuse(run / "ckpt.pt", run / "arch.bin", out=deploy)  # checked at the header's size
    # `eval` on the multi-branch and on the deploy checkpoint: the accuracy train reported, measured
    # on the same device in the same arithmetic.
    for path in (run / "ckpt.pt", deploy):
        with exact_fp32():
            res = evaluate(path, dataset="digits", device=DEVICE)
        assert res.top1 == pytest.approx(report.multi_branch.top1)
        assert res.top5 == pytest.approx(report.multi_branch.top5)


def test_resume_ends_identical_to_an_uninterrupted_run(trained, tmp_path):
    full_run, full = trained
    run = tmp_path / "resumed"
    with pytest.raises(Stop):
        train(run, TINY, progress=False, on_epoch_end=_stop_after(1), device=DEVICE)
    assert _state(run)["epoch"] == 1 and not (run / "ckpt.pt").exists()
    report = train(run, resume=True, progress=False, device=DEVICE)  # deterministic, as saved
    assert report.resumed_from_epoch == 1
    a, b = _weights(full_run / "ckpt.pt"), _weights(run / "ckpt.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert report.multi_branch == full.multi_branch and report.fused == full.fused
    strip = [{k: v for k, v in r.items() if k not in ("seconds", "cpu_seconds")} for r in report.history]
    assert strip == [{k: v for k, v in r.items() if k not in ("seconds", "cpu_seconds")} for r in full.history]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r.get("epoch") for r in log if r["event"] == "epoch"] == [1, 2]


def test_a_different_seed_gives_different_weights(trained, tmp_path):
    """The resume test above could pass trivially if training ignored its randomness."""
    full_run, _ = trained
    other = dataclasses.replace(TINY, seed=6, epochs=1)
    train(tmp_path / "other", other, progress=False, device=DEVICE)
    a, b = _weights(full_run / "ckpt.pt"), _weights(tmp_path / "other" / "ckpt.pt")
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


def test_resume_refuses_other_settings_and_new_runs_refuse_an_existing_run(trained):
    run, _ = trained
    with pytest.raises(Exception, match="epochs differs"):
        train(run, dataclasses.replace(TINY, epochs=3), resume=True, progress=False)
    with pytest.raises(Exception, match="--resume"):
        train(run, TINY, progress=False)


def test_non_finite_loss_stops_and_keeps_the_last_good_state(tmp_path):
    run = tmp_path / "nan"
    cfg = dataclasses.replace(TINY, arch=None, lr=1e30, epochs=2)
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf) at epoch 1 step \d+; stopped"):
        train(run, cfg, progress=False, device=DEVICE)
    state = _state(run)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (run / "ckpt.pt").exists()


def test_cli_train_then_eval(trained, tmp_path, capsys):
    run, report = trained
    with exact_fp32():  # the arithmetic train measured in, on its device
        assert main(["eval", str(run / "ckpt.pt"), "--device", DEVICE]) == 0  # the dataset recorded by train
    out = capsys.readouterr().out
    assert "digits test split" in out and "top-1 {:.2f}%".format(report.multi_branch.top1) in out
    arch = tmp_path / "arch.bin"
    ArchCode.empty(BACKBONE).save(arch)
    rc = main(["train", "-o", str(tmp_path / "cli"), "--arch", str(arch), "--dataset", "digits", "--width",
               "0.125", "--epochs", "1", "--batch-size", "64", "--limit", "128", "--no-progress", "--device", DEVICE])
    assert rc == 0
    out = capsys.readouterr().out
    assert "wrote" in out and (tmp_path / "cli" / "ckpt.pt").is_file()
    assert main(["train", "--resume", str(tmp_path / "cli"), "--epochs", "3"]) == 2  # usage: a setting given with --resume
    assert "drop --epochs" in capsys.readouterr().err


def test_cli_errors_are_one_line_and_leave_nothing(tmp_path, capsys):
    arch = tmp_path / "arch.bin"
    CODE.save(arch)
    out = tmp_path / "run"
    rc = main(["train", "-o", str(out), "--arch", str(arch), "--dataset", "fashion-mnist",
               "--data-root", str(tmp_path / "nowhere"), "--epochs", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and not out.exists()
    assert err.count("\n") == 1 and "nowhere" in err and "Traceback" not in err
    assert main(["eval", str(tmp_path / "missing.pt"), "--dataset", "digits"]) == 1
    assert "missing.pt" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path)]) == 1
    assert "state.pt" in capsys.readouterr().err
    assert main(["train", "-o", str(out), "--backbone", "resnet18_cifar", "--arch", str(arch).replace(
        "arch.bin", "absent.bin"), "--dataset", "digits"]) == 1
    assert "absent.bin" in capsys.readouterr().err and not out.exists()


def test_eval_val_split_needs_its_fraction(trained):
    run, _ = trained
    with pytest.raises(Exception, match="val-fraction"):
        evaluate(run / "ckpt.pt", dataset="digits", split="val")
    res = evaluate(run / "ckpt.pt", dataset="digits", split="val", val_fraction=0.2, limit=100)
    assert res.examples == 100 and 0.0 <= res.top1 <= 100.0


def test_eval_refuses_a_dataset_the_model_cannot_take(trained):
    run, _ = trained
    pytest.importorskip("torchvision")
    with pytest.raises(Exception, match="input channel"):
        evaluate(run / "ckpt.pt", dataset="cifar10", data_root="/nonexistent")


def test_init_from_a_torchvision_state_dict(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    from irep_deploy import build_model
    from irep_deploy.errors import IrepError
    from irep_deploy.reparam import init_from_torchvision

    torch.manual_seed(0)
    tv = torchvision.models.resnet18(weights=None)
    with torch.no_grad():  # non-trivial BN statistics, so that copying them is visible
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    path = tmp_path / "tv.pt"
    torch.save(tv.state_dict(), str(path))
    model = build_model("resnet18", arch=ArchCode.random("resnet18", ratio=0.25, seed=0))
    branch_before = {k: v.clone() for k, v in model.state_dict().items() if ".branches." in k}
    copied = init_from_torchvision(model, path)
    assert copied == len(tv.state_dict())  # every conv, BN and the 1000-class head
    assert torch.equal(model.conv1.conv.weight, tv.conv1.weight)
    assert torch.equal(model.layer2[0].conv1.conv.conv.weight, tv.layer2[0].conv1.weight)
    assert torch.equal(model.layer2[0].conv1.conv.bn.running_var, tv.layer2[0].bn1.running_var)
    assert torch.equal(model.layer3[0].downsample.conv.weight, tv.layer3[0].downsample[0].weight)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in branch_before.items())
    # With no branches the initialised model computes what torchvision's does.
    plain = build_model("resnet18")
    init_from_torchvision(plain, path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(plain.eval()(x), tv.eval()(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(IrepError, match="torchvision layout"):
        init_from_torchvision(build_model("resnet18_cifar", width=0.125), path)


@pytest.mark.slow
def test_resume_after_sigkill_mid_epoch(tmp_path):
    """A real kill (SIGKILL, no cleanup) in the middle of epoch 2, then `train --resume`."""
    import os
    import signal
    import subprocess
    import sys
    import time

    arch = tmp_path / "arch.bin"
    CODE.save(arch)
    run = tmp_path / "killed"
    args = ["--arch", str(arch), "--dataset", "digits", "--width", "0.125", "--epochs", "2", "--batch-size", "64",
            "--seed", "7", "--no-progress", "--deterministic", "--device", DEVICE]
    proc = subprocess.Popen([sys.executable, "-m", "irep_deploy", "train", "-o", str(run)] + args,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    log = run / "log.jsonl"
    try:
        while proc.poll() is None and not (log.exists() and log.read_text().count("\n") >= 1):
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # epoch 1 is saved and logged; epoch 2 has begun
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
    assert _state(run)["epoch"] == 1 and not (run / "ckpt.pt").exists()
    assert main(["train", "--resume", str(run), "--no-progress", "--device", DEVICE]) == 0
    reference = tmp_path / "reference"
    train(reference, TrainConfig(backbone=BACKBONE, arch=CODE.dumps(), dataset="digits", width=0.125, epochs=2,
                                 batch_size=64, seed=7, deterministic=True), progress=False, device=DEVICE)
    a, b = _weights(reference / "ckpt.pt"), _weights(run / "ckpt.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    epochs = [json.loads(line).get("epoch") for line in log.read_text().splitlines()]
    assert epochs == [1, 2, None]  # two epoch records and the final one, none duplicated


def test_bf16_autocast_and_channels_last_on_cpu(tmp_path):
    cfg = dataclasses.replace(TINY, epochs=1, limit=256, amp="bf16")
    report = train(tmp_path / "bf16", cfg, progress=False, channels_last=True, device="cpu")
    assert _state(tmp_path / "bf16")["config"]["amp"] == "bf16"
    assert math.isfinite(report.history[0]["train_loss"])
    assert report.fused_rel_error < 1e-4 and report.disagreements == 0  # evaluation stays float32
    with pytest.raises(Exception, match="fp16 needs a CUDA device"):
        train(tmp_path / "fp16", dataclasses.replace(cfg, amp="fp16"), progress=False, device="cpu")
    assert not (tmp_path / "fp16").exists()
