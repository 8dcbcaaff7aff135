"""benchmarks/gpu_speed.py: its CPU smoke mode runs every section's code path at tiny size and its
record says which sections ran and which were skipped and why; without CUDA the real run refuses in one
line (the GPU numbers themselves need a GPU: benchmarks/results/gpu_speed_*.md)."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_speed.py"


def run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # this checkout's package, not another installed tree
    return subprocess.run([sys.executable, str(SCRIPT)] + list(args), cwd=str(ROOT), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=600, env=env)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the script would run for real")
def test_without_cuda_it_refuses_in_one_line(tmp_path):
    proc = run("--out", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "gpu_speed: no CUDA GPU visible to torch (torch.cuda.is_available() is False); nothing measured"]
    assert list(tmp_path.iterdir()) == []


def test_a_bad_budget_is_one_line(tmp_path):
    proc = run("--device", "cpu", "--smoke", "--budget-s", "0", "--out", str(tmp_path))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "--budget-s" in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cpu_smoke_runs_every_section(tmp_path):
    # digits (sklearn's, real data) stands in for Fashion-MNIST, which a CI machine may not hold
    proc = run("--device", "cpu", "--smoke", "--epoch-dataset", "digits", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_speed_cpu.json").read_text())
    text = (tmp_path / "gpu_speed_cpu.md").read_text()
    assert all(status.startswith("ran") for status in result["status"].values()), result["status"]

    a = result["step_table"]
    assert a["settings"] == ["eager fp32", "eager bf16+cl"] and a["skipped_settings"]
    rows = {(r["network"], r["setting"]): r for r in a["rows"]}
    assert set(rows) == {(n, s) for n in ("plain", "every branch", "random 2/3") for s in a["settings"]}
    for r in a["rows"]:
        assert r["median_ms"] == pytest.approx(statistics.median(r["rounds_ms"]))
        assert len(r["rounds_ms"]) == result["sizes"]["rounds"]
        same = rows[("plain", r["setting"])]
        assert r["vs_plain_same"]["median"] == pytest.approx(statistics.median(
            [x / y for x, y in zip(r["rounds_ms"], same["rounds_ms"])]))
    plain_best = min(a["settings"], key=lambda s: rows[("plain", s)]["median_ms"])
    assert a["plain_fastest"] == plain_best
    assert rows[("plain", plain_best)]["vs_plain_fastest"]["median"] == 1.0
    assert rows[("random 2/3", "eager fp32")]["branches"] < rows[("every branch", "eager fp32")]["branches"]
    assert a["targets"][0]["judged"]["target"] == "<= 5.0" and set(a["aa"]) == set(a["settings"])

    b = result["search_step"]
    steps = [r["step"] for r in b["rows"]]
    assert steps[0] == "search eager (today)" and "plain @ eager fp32" in steps
    assert b["rows"][0]["judged"]["target"] == "<= 4.0"
    five = [5 * t for t in next(r for r in b["rows"] if r["step"] == "plain @ " + b["plain_fastest"])["rounds_ms"]]
    assert b["rows"][0]["vs_five_plain"]["median"] == pytest.approx(statistics.median(
        [x / y for x, y in zip(b["rows"][0]["rounds_ms"], five)]))
    # the static step, both layouts, fp32 and bf16, runs eagerly on the CPU and is judged like today's step;
    # its captured variants are skipped, saying why
    static = {"search static {} eager {}".format(layout, kind) for layout in ("sequential", "batched")
              for kind in ("fp32", "bf16+cl")}
    assert static <= set(steps)
    for r in b["rows"]:
        if r["step"] in static:
            assert r["judged"]["target"] == "<= 4.0" and r["vs_today"]["median"] > 0
    assert sum("captured" in n and "CUDA graphs need CUDA" in n for n in b["notes"]) == 4

    c = result["epochs"]
    assert [r["run"] for r in c["rows"]][0] == "plain" and len(c["rows"]) == 4
    assert "eager step, DataLoader" in c["rows"][2]["run"] and "--device-data auto" in c["rows"][1]["run"]
    assert c["rows"][1]["vs_plain"] == pytest.approx(c["rows"][1]["seconds"] / c["rows"][0]["seconds"])
    assert c["target"]["verdict"].startswith("not judged")

    d = result["torchvision"]
    assert {(r["network"], r["setting"]) for r in d["rows"]} == {("plain", "eager bf16+cl"),
                                                                 ("every branch", "eager bf16+cl")}
    assert "aten::" in result["profile"]["table"] and result["profile"]["mode"] == "eager fp32"
    for title in result["status"]:
        assert "| {} | ran".format(title) in text
    assert "## (a) Step table" in text and "A/A" in text
