"""train --baseline: the plain backbone trained with the searched code's recipe and seed, and the two
compared (test top-1, training time, torch latency) in baseline.json (issue 14, item 5). Real data: digits."""
from __future__ import annotations

import json

import pytest
import torch

from irep_deploy import ArchCode, load_checkpoint
from irep_deploy.baseline import BASELINE_FILE, train_with_baseline
from irep_deploy.cli import main
from irep_deploy.models import searchable_layers

pytest.importorskip("sklearn")  # digits

CODE = ArchCode.random("resnet18_cifar", ratio=0.5, seed=2)
ARGS = ["--dataset", "digits", "--width", "0.125", "--epochs", "1", "--batch-size", "64", "--limit", "256",
        "--seed", "7", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("baseline") / "run"
    arch = run.parent / "arch.bin"
    CODE.save(arch)
    torch.set_num_threads(1)
    return run, main(["train", "-o", str(run), "--arch", str(arch), "--baseline"] + ARGS)


def test_baseline_uses_the_same_recipe_and_seed_without_branches(run):
    run, rc = run
    assert rc == 0
    ours = json.loads((run / "config.json").read_text())
    base = json.loads((run / "baseline" / "config.json").read_text())
    assert base.pop("arch") is None and ours.pop("arch") == CODE.dumps()
    assert base == ours  # everything else: backbone, epochs, lr, data, limit, seed
    assert ArchCode.load(run / "baseline" / "arch.bin").count() == 0
    assert ArchCode.load(run / "arch.bin") == CODE
    blocks = [block for _, block in searchable_layers(load_checkpoint(run / "baseline" / "ckpt.pt").build())]
    assert blocks and not any(block.active for block in blocks)  # only the backbone's own 3x3 convs


def test_comparison_agrees_with_both_runs(run, capsys):
    run, _ = run
    report = json.loads((run / BASELINE_FILE).read_text())
    ours = json.loads((run / "metrics.json").read_text())
    base = json.loads((run / "baseline" / "metrics.json").read_text())
    rows = {r["model"]: r for r in report["rows"]}
    assert rows["searched code, fused"]["test_top1"] == ours["fused_test_top1"]
    assert rows["plain backbone (baseline)"]["test_top1"] == base["fused_test_top1"]
    assert report["top1_gain"] == pytest.approx(ours["fused_test_top1"] - base["fused_test_top1"])
    assert report["seed"] == 7 and report["test_examples"] == ours["test_examples"]
    seconds = [rows[m]["train_seconds"] for m in ("searched code, multi-branch", "plain backbone (baseline)")]
    assert all(s > 0 for s in seconds) and report["train_cost"] == pytest.approx(seconds[0] / seconds[1])
    assert all(r["latency_ms"] > 0 for r in report["rows"])  # multi-branch, fused, plain from one bench run


def test_resume_finishes_both_runs_and_no_code_is_refused(run, tmp_path, capsys):
    run, _ = run
    again = train_with_baseline(run, resume=True, device="cpu", progress=False, bench_duration_s=0.02,
                                bench_rounds=1)
    base = json.loads((run / "baseline" / "metrics.json").read_text())
    assert again.rows[-1].test_top1 == base["fused_test_top1"]
    capsys.readouterr()
    plain = tmp_path / "plain"
    assert main(["train", "-o", str(plain), "--model", "resnet18_cifar", "--baseline"] + ARGS) == 1
    err = capsys.readouterr().err
    assert "give --arch" in err and len(err.strip().splitlines()) == 1 and not plain.exists()
