"""benchmarks/bench_gpu.py: its CPU smoke mode runs the same code paths as the GPU record, and without
CUDA the real run refuses in one line (the GPU numbers themselves need a GPU: benchmarks/results/gpu_*.md);
benchmarks/gpu_train_probe.py refuses the same way, and its report is built from what it measured."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT)] + list(args), cwd=str(ROOT), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the script would run for real")
def test_without_cuda_it_refuses_in_one_line(tmp_path):
    proc = run("--out", str(tmp_path / "gpu"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "bench_gpu: no CUDA GPU visible to torch (torch.cuda.is_available() is False); nothing measured"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cpu_smoke_runs_every_section(tmp_path):
    out = tmp_path / "gpu_smoke"
    proc = run("--device", "cpu", "--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.with_suffix(".json").read_text())
    suite = result["suite"]
    assert suite["returncode"] == 0 and ("skipped" in suite["summary"] or "passed" in suite["summary"])
    rows = result["table1"]["rows"]
    assert [r["population"] for r in rows] == result["sizes"]["populations"]
    times = result["table1"]["per_code_s"]
    for r in rows:
        p = r["population"]
        assert r["fused_s"] == pytest.approx(sum(times["fused"][:p]))
        assert r["speedup"] == pytest.approx(sum(times["multi-branch"][:p]) / r["fused_s"])
    assert [(b["backbone"], b["input_size"]) for b in result["latency"]] == [
        tuple(layout) for layout in result["sizes"]["layouts"]]
    for block in result["latency"]:
        assert {r["variant"] for r in block["results"]} == {"multi-branch", "fused", "plain"}
        assert "fused_over_plain_spread" in block["ratios"][0]
    text = out.with_suffix(".md").read_text()
    assert "## Table 1" in text and "3.93" in text and suite["summary"] in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the script would run for real")
def test_train_probe_without_cuda_refuses_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_train_probe.py"), "--out",
                           str(tmp_path / "probe")], cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=600)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["gpu_train_probe: no CUDA GPU visible to torch; nothing measured"]
    assert list(tmp_path.iterdir()) == []


def test_train_probe_report_follows_its_measurements():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_train_probe as probe
    finally:
        sys.path.pop(0)
    recorded = json.loads((ROOT / "benchmarks" / "results" / "gpu_train_nvidia_h100_80gb_hbm3.json").read_text())
    md = probe.markdown(recorded)
    steps = recorded["step_ms"]
    ratio = steps["full benchmark=False bf16=False"] / steps["plain benchmark=False bf16=False"]
    assert "| benchmark=False bf16=False | {:.1f} | {:.1f} | {:.1f}x |".format(
        steps["plain benchmark=False bf16=False"], steps["full benchmark=False bf16=False"], ratio) in md
    rows = [l for l in md.splitlines() if l.startswith("| 64x28x28 | ")]
    assert len(rows) == len([n for n in probe.REGISTRY if n != "identity"])
    assert md == (ROOT / "benchmarks" / "results" / "gpu_train_nvidia_h100_80gb_hbm3.md").read_text()
