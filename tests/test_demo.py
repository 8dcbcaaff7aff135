"""The main job end to end (quick settings on sklearn digits): every step's output and the report."""
from __future__ import annotations

import json

import pytest

from irep_deploy import load_checkpoint
from irep_deploy.cli import main
from irep_deploy.demo import DemoSettings, run_demo
from irep_deploy.data import load_data
from irep_deploy.engines.onnx import FUSED_OP_TYPES, load_onnx, op_types
from irep_deploy.engines.onnx_eval import evaluate_onnx
from irep_deploy.engines.quantize import META_PREFIX

pytestmark = pytest.mark.slow  # the whole demo runs once for the module (over a minute on 2 cores)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    lines = []
    summary = run_demo(out, DemoSettings.quick(), progress=False, say=lines.append)
    return out, summary, "\n".join(lines)


def test_every_step_leaves_its_output(demo):
    out, summary, log = demo
    for path in ("search/arch.bin", "search/population.json", "train/ckpt.pt", "baseline/ckpt.pt", "deploy.pt",
                 "model.onnx",
                 "model.int8.onnx", "bench.json", "bench_int8.json", "report.md", "report.json"):
        assert (out / path).is_file(), path
    assert [s["name"] for s in summary["steps"]] == ["search", "train", "baseline", "fuse", "export", "quantize",
                                                     "eval-int8", "bench-int8", "build-trt", "bench", "figures"]
    assert "[1/11] search" in log and "[6/11] quantize" in log and "[11/11] figures" in log
    for name in ("arch_code.png", "alpha_beta.png", "asym_minus_dil.png", "fitness.png", "accuracy_latency.png"):
        assert (out / "figures" / name).stat().st_size > 1000, name
    points = json.loads((out / "points.json").read_text())["points"]
    assert {p["group"] for p in points} == {"multi-branch", "fused", "plain"}
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


def test_report_sets_the_searched_code_beside_the_baseline(demo):
    """The plain backbone is trained with the searched code's recipe and seed; the report's numbers
    are those of the two run directories and of the bench step."""
    out, summary, _ = demo
    ours = json.loads((out / "train" / "config.json").read_text())
    base = json.loads((out / "baseline" / "config.json").read_text())
    assert base.pop("arch") is None and ours.pop("arch") is not None and base == ours
    rows = {r["model"]: r for r in summary["baseline"]["rows"]}
    assert rows["plain backbone (baseline)"]["test_top1"] == json.loads(
        (out / "baseline" / "metrics.json").read_text())["fused_test_top1"]
    assert rows["searched code, fused"]["test_top1"] == summary["accuracy"]["fused_top1"]
    bench = {(r["variant"], r["backend"], r["batch"]): r["median_ms"] for r in summary["latency"]["results"]}
    assert rows["plain backbone (baseline)"]["latency_ms"] == bench["plain", "torch", 1]
    assert rows["searched code, fused"]["latency_ms"] == bench["fused", "torch", 1]
    assert rows["plain backbone (baseline)"]["train_seconds"] > 0
    md = (out / "report.md").read_text()
    assert md.index("## What the branches bought") < md.index("## Search")
    assert "| plain backbone (baseline) | {:.2f} |".format(rows["plain backbone (baseline)"]["test_top1"]) in md


def test_demo_refuses_to_overwrite_an_earlier_run(demo, capsys):
    out, _, _ = demo
    assert main(["demo", "--quick", "--out", str(out), "--quiet"]) == 1
    assert "holds an earlier demo" in capsys.readouterr().err


def test_int8_step_is_consistent_with_its_files(demo):
    """The INT8 model is a QDQ copy of the exported one; the reported scores and differing predictions
    are recomputed here from the two files on the same test images."""
    out, summary, log = demo
    import numpy as np
    import onnxruntime as ort

    int8 = summary["int8"]
    assert all(s["status"] == "done" for s in summary["steps"] if s["name"] in ("quantize", "eval-int8", "bench-int8"))
    ops = op_types(out / "model.int8.onnx")
    assert ops.get("QuantizeLinear", 0) > 0 and ops.get("DequantizeLinear", 0) > 0
    assert ops == int8["quantize"]["op_types"]
    meta = {p.key[len(META_PREFIX):]: p.value for p in load_onnx(out / "model.int8.onnx").metadata_props
            if p.key.startswith(META_PREFIX)}
    assert meta["calib_dataset"] == "digits" and meta["calib_size"] == "512" and meta["method"] == "minmax"

    settings = DemoSettings.quick()
    ev = int8["eval"]
    alone = evaluate_onnx(out / "model.int8.onnx", "digits", limit=settings.train_limit)
    assert (alone.top1, alone.top5, alone.examples) == (ev["int8_top1"], ev["int8_top5"], ev["examples"])
    fp32 = evaluate_onnx(out / "model.onnx", "digits", limit=settings.train_limit)
    assert fp32.top1 == ev["fp32_top1"]
    # the same test images the fused torch network was scored on: at most a near-tie apart
    assert abs(fp32.top1 - summary["accuracy"]["fused_top1"]) * ev["examples"] / 100 <= 1 + 1e-6

    data = load_data("digits", augment=False, limit=settings.train_limit, parts=("test",), in_channels=1)
    x = np.stack([data.test[i][0].numpy() for i in range(len(data.test))]).astype(np.float32)
    preds = []
    for name in ("model.onnx", "model.int8.onnx"):
        session = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        preds.append(session.run(None, {session.get_inputs()[0].name: x})[0].argmax(1))
    assert int((preds[0] != preds[1]).sum()) == ev["differ"]
    # each differing prediction moves the hit count by at most one
    assert abs(ev["int8_top1"] - ev["fp32_top1"]) * ev["examples"] / 100 <= ev["differ"] + 1e-6

    bench = json.loads((out / "bench_int8.json").read_text())
    rows = {(r["variant"], r["batch"]) for r in bench["results"]}
    assert rows == {(v, b) for v in ("onnx", "onnx-int8") for b in settings.bench_batches}
    assert all(r["backend"] == "ort:CPU" for r in bench["results"])
    assert all(q["onnx_int8_over_onnx"] > 0 for q in bench["ratios"])
    assert len(bench["ratios"]) == len(settings.bench_batches)
    md = (out / "report.md").read_text()
    assert "## INT8 (onnxruntime, CPU)" in md
    assert "| INT8 ONNX | {:.2f} |".format(ev["int8_top1"]) in md and "differ between FP32 and INT8: {}.".format(
        ev["differ"]) in md
    assert "onnx-int8/onnx" in md and "onnx-int8/onnx" in log
