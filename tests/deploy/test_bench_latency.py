"""`irep-deploy bench` on CPU with real torch and onnxruntime (short runs; no timed assertions)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from irep_deploy import load_checkpoint
from irep_deploy.bench import devices
from irep_deploy.bench.latency import (Job, Result, Stats, Variant, _resolve_backends, bench, build_jobs, format_table,
                                       ratios, run_rounds, session_runner)
from irep_deploy.engines import ort as ort_helpers
from irep_deploy.engines.onnx import export_module
from irep_deploy.engines.tensorrt import EngineMeta, write_meta
from irep_deploy.errors import IrepError

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
    # the default backends of the machine: on a GPU also cudagraph, with CUDA-event (GPU) times
    gpu = torch.cuda.is_available()
    backends = ("torch", "cudagraph", "ort") if gpu else ("torch", "ort")
    got = {(r["variant"], r["backend"].split(":")[0], r["batch"]) for r in data["results"]}
    assert got == {(v, b, n) for v in ("multi-branch", "fused", "plain") for b in backends for n in (1, 2)}
    for r in data["results"]:
        assert r["host"]["iterations"] >= 3
        assert (r["gpu"] is not None) == (gpu and not r["backend"].startswith("ort")), r
    assert {(q["backend"].split(":")[0], q["batch"]) for q in data["ratios"]} == {
        (b, n) for b in backends for n in (1, 2)}
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
    # the note depends on what this machine is: none on an H100, where nothing was forced
    assert ("--device h100 was asked for" in out) == (devices.detect().kind != "h100"), out


def test_gpu_profile_takes_any_cuda_gpu(fused_onnx, capsys):
    rc, out, err = cli(capsys, "bench", fused_onnx, "--device", "gpu", "--force", *FAST)
    assert rc == 0, err
    assert ("--device gpu was asked for" in out) == (not torch.cuda.is_available()), out


def _not_here(profile: str) -> bool:
    return devices.detect().kind != profile


def _ort_has(provider: str) -> bool:
    return provider in ort_helpers.available_providers()


@pytest.mark.parametrize("argv, expect, code", [
    pytest.param(["{onnx}", "--device", "xavier"], "--device xavier was asked for", 4,
                 marks=pytest.mark.skipif(not _not_here("xavier"), reason="this machine is a Xavier")),
    (["{onnx}", "--compare"], "--compare needs a checkpoint", 1),
    (["{onnx}", "--backend", "torch"], "cannot run", 1),
    (["{deploy}", "--backend", "trt"], "build-trt", 1),
    (["{deploy}", "--backend", "cudagraph", "--device", "cpu"], "needs a CUDA GPU", 2),
    (["{deploy}", "--backend", "warp"], "unknown backend", 2),
    (["{deploy}", "--arch", "{arch}"], "already fused", 1),
    (["{dir}/nothing.pt"], "no such file", 1),
    (["{junk}"], "not a readable checkpoint", 1),
    pytest.param(["{onnx}", "--providers", "cuda"], "not available", 4,
                 marks=pytest.mark.skipif(_ort_has("CUDAExecutionProvider"), reason="onnxruntime has CUDA here")),
    (["{supernet}"], "SuperNet", 1),
])
def test_bench_errors_are_one_line_and_write_nothing(ckpts, fused_onnx, tmp_path, capsys, argv, expect, code):
    names = dict({k: str(v) for k, v in ckpts.items()}, onnx=str(fused_onnx))
    rc, out, err = cli(capsys, "bench", *[a.format(**names) for a in argv], "--json", tmp_path / "r.json", *FAST)
    assert rc == code  # 2: a flag (or flag combination) unusable as given; 4: not available on this machine
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
    # the sidecar build-trt writes beside every engine, so bench gets past it to TensorRT itself
    write_meta(engine, EngineMeta("10.3.0", "Orin", "8.7", "fp16", "input", "logits", [1, 3, 32, 32],
                                  [1, 3, 32, 32], [8, 3, 32, 32], "ab" * 32, "m.onnx"))
    rc, _, err = cli(capsys, "bench", engine, *FAST)
    assert rc == 4 and "TensorRT is not installed" in one_line_error(err)  # 4: not available on this machine


def test_torch_jobs_leave_the_shared_module_where_it_is(ckpts):
    """The torch job runs its own copy on the device (meta stands in for CUDA here: any device other than
    the module's), so the ort job after it still exports the CPU module (issue 15, item 1)."""
    assert _resolve_backends(None, "checkpoint", cuda=True) == ["torch", "cudagraph", "ort"]
    module = load_checkpoint(ckpts["deploy"]).build().eval()
    before = [(p.device, p.data_ptr()) for p in module.parameters()]
    jobs, _ = build_jobs([Variant("fused", module)], ["torch", "ort"], [1], {"in_channels": 3, "input_size": 32},
                         None, torch.device("meta"), ["CPUExecutionProvider"])
    assert [(p.device, p.data_ptr()) for p in module.parameters()] == before
    assert [(j.variant, j.backend) for j in jobs] == [("fused", "torch"), ("fused", "ort:CPU")]
    assert jobs[0].runner[0]().device.type == "meta"  # the torch job really runs on the other device


def test_backend_failure_while_preparing_is_one_line():
    class WrongWidth(nn.Module):  # a real network that cannot take the bench input (4-D into a 5-wide Linear)
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(5, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    with pytest.raises(IrepError) as info:
        build_jobs([Variant("fused", WrongWidth().eval())], ["ort"], [1], {"in_channels": 3, "input_size": 4},
                   None, torch.device("cpu"), ["CPUExecutionProvider"], source="m.pt")
    assert str(info.value).startswith("m.pt: ort failed at batch 1: ") and "\n" not in str(info.value)


@pytest.mark.skipif(_ort_has("CUDAExecutionProvider"), reason="onnxruntime has the CUDA provider here")
def test_ort_label_and_warning_say_what_really_runs(ckpts):
    """onnxruntime given the CUDA provider where it cannot load it runs on the CPU (a real fallback, with a
    UserWarning at most): the result must say ort:CPU and warn, not claim ort:CUDA (issue 15, item 8)."""
    import onnxruntime

    module = load_checkpoint(ckpts["deploy"]).build().eval()
    data = export_module(module, (1, 3, 32, 32)).SerializeToString()
    with pytest.warns(UserWarning):
        session = onnxruntime.InferenceSession(data, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    (step, _, events), label, warned = session_runner(session, (2, 3, 32, 32), ["CUDAExecutionProvider"], "m.onnx")
    assert label == "ort:CPU" and not events
    assert len(warned) == 1 and "asked for CUDAExecutionProvider but runs on CPUExecutionProvider" in warned[0]
    assert step()[0].shape == (2, 10)


def test_ort_on_the_cpu_provider_has_no_warning(ckpts):
    module = load_checkpoint(ckpts["deploy"]).build().eval()
    session = ort_helpers.make_session(export_module(module, (1, 3, 32, 32)).SerializeToString())
    _, label, warned = session_runner(session, (1, 3, 32, 32), ["CPUExecutionProvider"], "m.onnx")
    assert (label, warned) == ("ort:CPU", [])


def test_torch_device_names_map_to_bench_profiles(ckpts):
    """`demo --device cuda` hands its torch device to bench, which takes profiles (issue 15, item 3)."""
    assert [devices.bench_profile(d) for d in ("cuda", "cuda:1", "cpu", "auto", "h100")] == [
        "gpu", "gpu", "cpu", "auto", "h100"]
    with pytest.raises(IrepError, match="unknown device 'tpu'"):
        devices.bench_profile("tpu")
    cpu = devices.DeviceInfo("cpu", "some CPU", False)
    with pytest.raises(devices.DeviceMismatchError, match="--device gpu was asked for"):
        devices.resolve("gpu", info=cpu)
    h100 = devices.DeviceInfo("h100", "NVIDIA H100 80GB HBM3", True)
    assert devices.resolve("gpu", info=h100) is h100
    # through bench itself: on this machine "cuda" means its GPU, or a refusal where there is none
    if torch.cuda.is_available():
        report = bench(ckpts["deploy"], device="cuda", backends=["torch"], warmup_ms=0, duration_s=0, min_iters=2)
        assert report.results[0].gpu is not None
    else:
        with pytest.raises(devices.DeviceMismatchError, match="--device gpu was asked for"):
            bench(ckpts["deploy"], device="cuda", backends=["torch"], warmup_ms=0, duration_s=0, min_iters=2)


def test_onnxruntime_failure_while_timing_is_one_line(ckpts):
    """onnxruntime's errors are not RuntimeErrors: a fixed-batch model fed another batch must still end
    in one line naming model, backend and batch."""
    module = load_checkpoint(ckpts["deploy"]).build().eval()
    data = export_module(module, (1, 3, 32, 32), dynamic_batch=False).SerializeToString()
    runner, label, _ = session_runner(ort_helpers.make_session(data), (2, 3, 32, 32), ["CPUExecutionProvider"], "m")
    with pytest.raises(IrepError) as info:
        run_rounds([Job("onnx", label, 2, runner)], rounds=1, warmup_ms=0, duration_s=0, min_iters=1,
                   source="m.onnx")
    assert str(info.value).startswith("m.onnx: ort:CPU failed at batch 2: ") and "\n" not in str(info.value)


@pytest.mark.parametrize("argv, expect", [
    (["{onnx}", "--input-size", "4096"], "--input-size 4096"),  # a fixed 32 x 32 input: not silently ignored
    (["{onnx}", "--input-size", "16"], "fixed input of 32 x 32"),
    (["{deploy}", "--batch", "4096", "--input-size", "2048"], "--batch 4096 --input-size 2048"),
    (["{deploy}", "--batch", "1,512", "--input-size", "1024"], "more than the limit"),
])
def test_bench_refuses_what_the_input_cannot_be_exit_2(ckpts, fused_onnx, tmp_path, capsys, argv, expect):
    names = dict({k: str(v) for k, v in ckpts.items()}, onnx=str(fused_onnx))
    rc, out, err = cli(capsys, "bench", *[a.format(**names) for a in argv], "--json", tmp_path / "r.json", *FAST)
    assert rc == 2, err
    line = one_line_error(err)
    assert expect in line, line
    assert leftovers(tmp_path, ["r.json"]) == []


def test_bench_of_a_fixed_batch_onnx_names_the_batch_flag(fused_onnx, tmp_path, capsys):
    import onnx

    model = onnx.load(str(fused_onnx))
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    dim.ClearField("dim_param")
    dim.dim_value = 2
    onnx.save(model, str(tmp_path / "fixed.onnx"))
    rc, out, err = cli(capsys, "bench", tmp_path / "fixed.onnx", "--batch", "4", *FAST)
    assert rc == 2 and "--batch 4" in one_line_error(err) and "fixed batch of 2" in err
    rc, out, err = cli(capsys, "bench", tmp_path / "fixed.onnx", "--batch", "2", "--input-size", "32", *FAST)
    assert rc == 0, err


def test_the_memory_limit_can_be_set_and_is_checked(ckpts, tmp_path, capsys, monkeypatch):
    from irep_deploy.resources import MEMORY_LIMIT_ENV, estimate_bytes, memory_limit

    monkeypatch.setenv(MEMORY_LIMIT_ENV, "64K")
    assert memory_limit() == 64 << 10 and memory_limit(check=True) == 64 << 10
    rc, out, err = cli(capsys, "bench", ckpts["deploy"], *FAST)
    assert rc == 1 and str(ckpts["deploy"]) in one_line_error(err) and MEMORY_LIMIT_ENV in err
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "lots")
    rc, out, err = cli(capsys, "bench", ckpts["deploy"], *FAST)
    assert rc == 2 and MEMORY_LIMIT_ENV in one_line_error(err)
    monkeypatch.delenv(MEMORY_LIMIT_ENV)
    from irep_deploy import build_model

    net = build_model("resnet18_cifar", width=0.125, num_classes=10).eval()
    small = estimate_bytes((1, 3, 32, 32), net)
    # the estimate grows with the batch and the area, and errs high: at least the input and the stem's output
    assert estimate_bytes((4, 3, 32, 32), net) == 4 * small
    assert estimate_bytes((1, 3, 64, 64), net) >= 4 * small - 4 * 3 * 64 * 64
    assert small >= 4 * (3 * 32 * 32 + 8 * 32 * 32)


def test_the_memory_probe_leaves_the_model_as_it_was():
    from irep_deploy import build_model
    from irep_deploy.resources import estimate_bytes

    net = build_model("resnet18_cifar", width=0.125, num_classes=10).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    estimate_bytes((2, 3, 32, 32), net)
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
