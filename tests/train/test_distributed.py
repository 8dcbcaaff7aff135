"""`irep-deploy train` under torchrun: 2 gloo processes on CPU, files written once by rank 0."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch.distributed

from irep_deploy import ArchCode, load_checkpoint
from irep_deploy.data import load_data

pytest.importorskip("sklearn")  # the digits data of every test here ships with scikit-learn

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                 reason="torch built without gloo")]


def test_torchrun_two_gloo_processes(tmp_path):
    arch = tmp_path / "arch.bin"
    code = ArchCode.random("resnet18_cifar", ratio=0.25, seed=2)
    code.save(arch)
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "irep_deploy", "train", "-o", str(run), "--arch", str(arch), "--dataset", "digits",
           "--width", "0.125", "--epochs", "2", "--batch-size", "64", "--device", "cpu", "--val-fraction", "0.1"]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # only rank 0 prints
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in log] == ["epoch", "epoch", "final"]  # written once, not once per rank
    data = load_data("digits", val_fraction=0.1)
    # The global batch of 64 is split 32 + 32: an epoch sees as many examples as one process would.
    assert log[0]["examples"] == (len(data.train) // 64) * 64
    final = log[-1]
    assert final["test_examples"] == len(data.test)  # sharded evaluation counts every example once
    assert final["disagreements"] == 0 and final["fused_rel_error"] < 1e-4
    assert "val_top1" in log[0]
    # Every rank evaluated rank 0's model (BatchNorm statistics included), the one ckpt.pt holds: the
    # sharded val and test results are those of that checkpoint evaluated in one process.
    from irep_deploy.precision import exact_fp32
    from irep_deploy.evaluation import evaluate
    val = evaluate(run / "ckpt.pt", split="val", val_fraction=0.1, device="cpu")
    assert val.loss == pytest.approx(log[-2]["val_loss"], rel=1e-6) and val.top1 == log[-2]["val_top1"]
    with exact_fp32():
        test = evaluate(run / "ckpt.pt", device="cpu")
    assert test.top1 == final["test_top1"] and test.top5 == final["test_top5"]
    ck = load_checkpoint(run / "ckpt.pt")
    assert ck.arch == code and not any(k.startswith("module.") for k in ck.state_dict)
    leftovers = [p.name for p in run.iterdir() if p.name.startswith(".")]
    assert not leftovers
