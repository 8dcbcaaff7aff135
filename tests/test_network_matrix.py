"""The network matrix (issue 22): every entry of ``tests/networks.py`` ends as its table says, "exact"
(start equality, non-zero branches, fused == multi-branch at 1e-5 relative in FP32, the fused ONNX
with the plain original's ops) or "refused" (an IrepError naming the module and the reason).

Networks heavier than a few seconds on one core are marked ``slow``. timm and Ultralytics are
optional extras: their entries skip without them. The benchmark ``benchmarks/bench_networks.py``
records the same checks' numbers.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from networks import ENTRIES, BY_NAME, Entry, check_network, skip_kind

ROOT = Path(__file__).resolve().parents[1]


def _param(entry: Entry):
    marks = [pytest.mark.slow] if entry.slow else []
    return pytest.param(entry, id=entry.name, marks=marks)


def test_the_matrix_covers_four_sources_and_25_networks():
    assert len(ENTRIES) >= 25 and len(BY_NAME) == len(ENTRIES)
    assert {e.source for e in ENTRIES} == {"torchvision", "timm", "ultralytics", "custom"}
    assert all(e.expected in ("exact", "refused") for e in ENTRIES)
    assert all(e.refusal for e in ENTRIES if e.expected == "refused")


@pytest.mark.parametrize("entry", [_param(e) for e in ENTRIES])
def test_network(entry, one_thread):
    if entry.requires:
        pytest.importorskip(entry.requires)
    result = check_network(entry)
    assert result.passed, "{}\n{}".format(result.line(), result.message)
    if entry.expected == "exact":
        assert result.blocks > 0 and result.branches > 0
        assert result.onnx_fused.get("Conv", 0) == result.onnx_original.get("Conv", 0) > 0


def test_skip_kinds_name_irepify_reasons():
    reasons = {"kernel 1x1, not 3x3": "not 3x3", "dilation (2, 2), not 1": "dilation", "padding (0, 0), not 1": "padding",
               "padding mode 'reflect': the branches pad with zeros": "padding mode",
               "called 2 times in the forward": "called more than once", "not matched by include": "include/exclude",
               "the model cannot be traced by torch.fx (TraceError: x), so the BN after it is unknown": "untraceable"}
    assert {r: skip_kind(r) for r in reasons} == reasons


def test_a_wrong_fusion_is_caught(monkeypatch):
    """The check can fail: a fuse_model that drops one block's branches is reported, not passed."""
    import networks
    from irep_deploy import IrepConv, fuse_model

    def drop_branches(net):
        block = next(m for m in net.modules() if isinstance(m, IrepConv) and m.active)
        block.active = ()
        return fuse_model(net)

    monkeypatch.setattr(networks, "fuse_model", drop_branches)
    result = check_network(BY_NAME["resnet18"])
    assert result.status == "failed" and any("fused differs from multi-branch" in f for f in result.failures)


@pytest.mark.slow
def test_benchmark_records_the_matrix_at_smoke_scale(tmp_path):
    out = tmp_path / "networks"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_networks.py"), "--smoke", "--out", str(out)],
                          cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["code"]["commit"] and isinstance(result["code"]["dirty"], bool)
    rows = {r["name"]: r for r in result["networks"]}
    assert set(rows) == set(result["settings"]["networks"]) and rows
    md = out.with_suffix(".md").read_text()
    for name, row in rows.items():
        assert "| {} |".format(name) in md
        if row["status"] == "exact":
            assert row["fused_error"] <= 1e-5 and row["blocks"] <= row["eligible"]
            assert len(row["seconds"]["irepify + fuse_model"]) == result["settings"]["rounds"]
    assert torch.__version__ in md
