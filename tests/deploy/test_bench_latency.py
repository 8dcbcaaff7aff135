"""`irep-deploy bench` on CPU with real torch and onnxruntime (short runs; no timed assertions)."""
from __future__ import annotations

import json

import pytest

from irep_deploy.bench.latency import Result, Stats, bench, format_table, ratios

from .conftest import cli, leftovers, one_line_error

FAST = ["--warmup", "0", "--duration", "0", "--iterations", "3"]


def test_stats_are_order_statistics():
    s = Stats.of([4.0, 1.0, 3.0, 2.0, 10.0])
    assert (s.iterations, s.min, s.median, s.mean) == (5, 1.0, 3.0, 4.0)
    assert s.min <= s.median <= s.p90 <= s.p95 <= s.p99 <= 10.0
    assert s.cv == pytest.approx(s.std / s.mean)
    with pytest.raises(ValueError):
        Stats.of([])


def test_ratios_pair_variants_of_one_backend_and_batch():
    st = lambda m: Stats.of([m, m])  # noqa: E731
    rs = [Result("fused", "ort:CPU", 1, st(2.0), None, 1.0), Result("plain", "ort:CPU", 1, st(1.0), None, 1.0),
          Result("multi-branch", "ort:CPU", 1, st(8.0), None, 1.0), Result("plain", "torch", 1, st(1.0), None, 1.0)]
    (row,) = ratios(rs)
    assert row["fused_over_plain"] == 2.0 and row["multi_branch_over_fused"] == 4.0


def test_compare_on_multi_branch_checkpoint_writes_json(ckpts, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc, text, err = cli(capsys, "bench", ckpts["multi"], "--compare", "--batch", "1,2", "--rounds", "2",
                        "--json", out, *FAST)
    assert rc == 0, err
    data = json.loads(out.read_text())
    got = {(r["variant"], r["backend"].split(":")[0], r["batch"]) for r in data["results"]}
    assert got == {(v, b, n) for v in ("multi-branch", "fused", "plain") for b in ("torch", "ort") for n in (1, 2)}
    assert all(r["host"]["iterations"] >= 3 and r["gpu"] is None for r in data["results"])
    assert {(q["backend"].split(":")[0], q["batch"]) for q in data["ratios"]} == {
        (b, n) for b in ("torch", "ort") for n in (1, 2)}
    env = data["environment"]
    assert env["onnxruntime"] and env["torch"] and "gpu" in env and "tensorrt" in env
    assert "fused/plain" in text and "multi-branch/fused" in text


def test_bench_onnx_file_and_deploy_checkpoint(ckpts, fused_onnx):
    report = bench(fused_onnx, device="cpu", batches=[1, 3], warmup_ms=0, duration_s=0, min_iters=2)
    assert [(r.variant, r.backend, r.batch) for r in report.results] == [
        ("onnx", "ort:CPU", 1), ("onnx", "ort:CPU", 3)]
    report = bench(ckpts["deploy"], device="cpu", backends=["torch"], warmup_ms=0, duration_s=0, min_iters=2,
                   input_size=24)
    assert [(r.variant, r.backend) for r in report.results] == [("fused", "torch")]
    assert "fused" in format_table(report)


def test_force_runs_on_the_wrong_device_and_says_so(fused_onnx, capsys):
    rc, out, err = cli(capsys, "bench", fused_onnx, "--device", "h100", "--force", *FAST)
    assert rc == 0, err
    assert "--device h100 was asked for" in out


@pytest.mark.parametrize("argv, expect", [
    (["{onnx}", "--device", "xavier"], "--device xavier was asked for"),
    (["{onnx}", "--compare"], "--compare needs a checkpoint"),
    (["{onnx}", "--backend", "torch"], "cannot run"),
    (["{deploy}", "--backend", "trt"], "build-trt"),
    (["{deploy}", "--backend", "cudagraph", "--device", "cpu"], "needs a CUDA GPU"),
    (["{deploy}", "--backend", "warp"], "unknown backend"),
    (["{deploy}", "--arch", "{arch}"], "already fused"),
    (["{dir}/nothing.pt"], "no such file"),
    (["{junk}"], "not a readable checkpoint"),
    (["{onnx}", "--providers", "cuda"], "not available"),
    (["{supernet}"], "SuperNet"),
])
def test_bench_errors_are_one_line_and_write_nothing(ckpts, fused_onnx, tmp_path, capsys, argv, expect):
    names = dict({k: str(v) for k, v in ckpts.items()}, onnx=str(fused_onnx))
    rc, out, err = cli(capsys, "bench", *[a.format(**names) for a in argv], "--json", tmp_path / "r.json", *FAST)
    assert rc == 1
    line = one_line_error(err)
    assert expect in line, line
    assert leftovers(tmp_path, ["r.json"]) == []


def test_bench_engine_without_tensorrt(tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"\0" * 16)
    rc, _, err = cli(capsys, "bench", engine, *FAST)
    assert rc == 1 and "m.engine" in one_line_error(err)
