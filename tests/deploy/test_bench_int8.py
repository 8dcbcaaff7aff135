"""bench with INT8: a QDQ ONNX is timed by onnxruntime and labelled onnx-int8; --int8 adds fused-int8
(the fused model quantized by onnxruntime on real Fashion-MNIST images) to a checkpoint's run."""
from __future__ import annotations

import json

import onnx
import pytest

from irep_deploy.bench.latency import bench
from irep_deploy.engines import int8 as int8_tools

from .conftest import cli, leftovers, one_line_error

QUICK = dict(warmup_ms=0, duration_s=0, min_iters=3, rounds=2)


def test_qdq_onnx_is_timed_and_labelled_int8(fmnist, fmnist_qdq):
    report = bench(fmnist_qdq, device="cpu", batches=[1, 4], **QUICK)
    assert [(r.variant, r.backend, r.batch) for r in report.results] == [
        ("onnx-int8", "ort:CPU", 1), ("onnx-int8", "ort:CPU", 4)]
    assert all(r.host.median > 0 for r in report.results)
    plain = bench(fmnist["onnx"], device="cpu", **QUICK)
    assert [r.variant for r in plain.results] == ["onnx"]


def test_compare_with_int8(fmnist, tmp_path, capsys):
    out = tmp_path / "b.json"
    rc, text, err = cli(capsys, "bench", fmnist["deploy"], "--device", "cpu", "--backend", "torch,ort", "--compare",
                        "--int8", "--calib", "fashion-mnist", "--calib-size", "64", "--warmup", "0", "--duration",
                        "0", "--iterations", "2", "--rounds", "2", "--json", out)
    assert rc == 0, err
    data = json.loads(out.read_text())
    rows = {(r["variant"], r["backend"]) for r in data["results"]}
    assert ("fused-int8", "ort:CPU") in rows and ("fused-int8", "torch") not in rows  # QDQ runs on onnxruntime
    assert {("multi-branch", "torch"), ("fused", "ort:CPU"), ("plain", "ort:CPU")} <= rows
    ort_ratio = [q for q in data["ratios"] if q["backend"] == "ort:CPU"][0]
    assert ort_ratio["int8_over_fused"] > 0 and len(ort_ratio["int8_over_fused_rounds"]) == 2
    assert "fused-int8/fused" in text and data["config"]["int8"] and data["config"]["calib"] == "fashion-mnist"
    assert any("64 fashion-mnist training images" in w for w in data["warnings"])


def test_int8_on_a_deploy_checkpoint_without_compare(fmnist):
    report = bench(fmnist["deploy"], device="cpu", backends=["ort"], int8=True, calib="fashion-mnist",
                   calib_size=32, **QUICK)
    assert [r.variant for r in report.results] == ["fused", "fused-int8"]


@pytest.mark.parametrize("argv, msg, code", [
    (["{deploy}", "--int8"], "--int8 needs --calib DATASET", 2),
    (["{deploy}", "--calib", "fashion-mnist"], "--calib applies to --int8", 2),
    (["{deploy}", "--int8", "--calib", "fashion-mnist", "--backend", "torch"], "add ort to --backend", 2),
    (["{qdq}", "--int8", "--calib", "fashion-mnist"], "a QDQ ONNX is labelled onnx-int8", 1),
    (["{other}", "--int8", "--calib", "fashion-mnist"], "calibration data of the wrong shape", 1),
])
def test_bench_int8_errors(fmnist, fmnist_qdq, ckpts, tmp_path, capsys, argv, msg, code):
    names = {"deploy": str(fmnist["deploy"]), "qdq": str(fmnist_qdq), "other": str(ckpts["deploy"])}
    argv = [a.format(**names) for a in argv] + ["--device", "cpu", "--json", str(tmp_path / "b.json")]
    rc, _, err = cli(capsys, "bench", *argv)
    assert rc == code and msg in one_line_error(err)
    assert leftovers(tmp_path, ["b.json"]) == []


def test_fused_int8_is_really_quantized(fmnist):
    """What bench times as fused-int8 is the QDQ graph quantize_qdq makes (not the float one)."""
    images = int8_tools.calibration_images("fashion-mnist", (1, 28, 28), 32)
    data = int8_tools.quantize_qdq(fmnist["onnx"].read_bytes(), images)
    ops = {n.op_type for n in onnx.load_from_string(data).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops


def test_fp32_and_int8_onnx_in_one_interleaved_run(fmnist, fmnist_qdq, tmp_path):
    """The demo's INT8 bench: both files' jobs in every round, and the ratio onnx-int8/onnx per batch."""
    from irep_deploy.bench.latency import bench_onnx_files, format_table

    out = tmp_path / "pair.json"
    report = bench_onnx_files([("onnx", fmnist["onnx"]), ("onnx-int8", fmnist_qdq)], batches=[1, 4],
                              json_out=out, **QUICK)
    assert [(r.variant, r.batch) for r in report.results] == [("onnx", 1), ("onnx", 4), ("onnx-int8", 1),
                                                              ("onnx-int8", 4)]
    assert all(r.backend == "ort:CPU" and len(r.round_medians) == 2 for r in report.results)
    assert [q["batch"] for q in report.ratios] == [1, 4]
    by = {(r.variant, r.batch): r.host.median for r in report.results}
    for q in report.ratios:
        assert q["onnx_int8_over_onnx"] == pytest.approx(by[("onnx-int8", q["batch"])] / by[("onnx", q["batch"])])
        assert len(q["onnx_int8_over_onnx_rounds"]) == 2
    assert "onnx-int8/onnx" in format_table(report)
    assert json.loads(out.read_text())["config"]["files"] == {"onnx": str(fmnist["onnx"]),
                                                              "onnx-int8": str(fmnist_qdq)}


def test_bench_onnx_files_refuses_a_checkpoint(fmnist, tmp_path):
    from irep_deploy.bench.latency import bench_onnx_files
    from irep_deploy.errors import IrepError

    with pytest.raises(IrepError, match="not an ONNX file"):
        bench_onnx_files([("onnx", fmnist["deploy"])], json_out=tmp_path / "b.json")
    assert not (tmp_path / "b.json").exists()
