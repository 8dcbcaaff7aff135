"""The main job end to end (quick settings on sklearn digits): every step's output and the report."""
from __future__ import annotations

import json

import pytest

from irep_deploy import load_checkpoint
from irep_deploy.cli import main
from irep_deploy.demo import DemoSettings, run_demo
from irep_deploy.engines.onnx import FUSED_OP_TYPES, op_types


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    lines = []
    summary = run_demo(out, DemoSettings.quick(), progress=False, say=lines.append)
    return out, summary, "\n".join(lines)


def test_every_step_leaves_its_output(demo):
    out, summary, log = demo
    for path in ("search/arch.bin", "search/population.json", "train/ckpt.pt", "deploy.pt", "model.onnx",
                 "bench.json", "report.md", "report.json"):
        assert (out / path).is_file(), path
    assert [s["name"] for s in summary["steps"]] == ["search", "train", "fuse", "export", "build-trt", "bench",
                                                     "figures"]
    assert "[1/7] search" in log and "[7/7] figures" in log
    for name in ("arch_code.png", "alpha_beta.png", "asym_minus_dil.png", "fitness.png", "accuracy_latency.png"):
        assert (out / "figures" / name).stat().st_size > 1000, name
    points = json.loads((out / "points.json").read_text())["points"]
    assert {p["group"] for p in points} == {"multi-branch", "fused"}
    assert load_checkpoint(out / "deploy.pt").kind == "deploy"
    assert set(op_types(out / "model.onnx")) <= FUSED_OP_TYPES


def test_report_numbers_agree_with_the_files(demo):
    out, summary, _ = demo
    report = json.loads((out / "report.json").read_text())
    acc = report["accuracy"]
    assert acc["multi_branch_top1"] == acc["fused_top1"] and acc["disagreements"] == 0
    assert report["fuse"]["rel_error"] < 1e-5
    variants = {(r["variant"], r["backend"]) for r in report["latency"]["results"]}
    assert {("multi-branch", "torch"), ("fused", "torch"), ("plain", "torch")} <= variants
    assert any(v[1].startswith("ort") for v in variants)
    trt = [s for s in report["steps"] if s["name"] == "build-trt"][0]
    assert trt["status"] in ("done", "skipped") and (trt["status"] == "done" or trt["note"].startswith("skipped:"))
    md = (out / "report.md").read_text()
    assert "{:.2f}".format(acc["fused_top1"]) in md and "## Latency" in md


def test_demo_refuses_to_overwrite_an_earlier_run(demo, capsys):
    out, _, _ = demo
    assert main(["demo", "--quick", "--out", str(out), "--quiet"]) == 1
    assert "holds an earlier demo" in capsys.readouterr().err
