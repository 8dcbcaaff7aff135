"""`bench` on the GPU: torch eager and CUDA graphs with CUDA-event times, the default backends of a GPU
machine (torch, cudagraph, ort) on one checkpoint, and onnxruntime's CUDA provider (CUDA suite)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from irep_deploy import ArchCode, build_model, fuse_model, save_checkpoint
from irep_deploy.bench.latency import Variant, bench, build_jobs
from irep_deploy.engines import ort as ort_helpers

FAST = dict(warmup_ms=0, duration_s=0, min_iters=4, rounds=2)


@pytest.fixture
def multi(tmp_path) -> Path:
    code = ArchCode.random("resnet18_cifar", ratio=2 / 3, seed=3)
    path = tmp_path / "multi.pt"
    save_checkpoint(path, build_model("resnet18_cifar", arch=code, width=0.125, num_classes=10).eval())
    return path


def test_default_backends_on_a_gpu_compare_without_crashing(multi):
    """Issue 15 item 1: torch ran the shared module on the GPU, then ort exported it with a CPU input."""
    report = bench(multi, device="gpu", compare=True, batches=[1, 2], **FAST)
    backends = {r.backend.split(":")[0] for r in report.results}
    assert backends == {"torch", "cudagraph", "ort"}
    for r in report.results:
        # CUDA events time the GPU work of torch and CUDA graphs; onnxruntime is timed on the host only
        assert (r.gpu is not None) == (not r.backend.startswith("ort")), r
        assert len(r.round_medians) == 2
    assert {(q["backend"].split(":")[0], q["batch"]) for q in report.ratios} == {
        (b, n) for b in backends for n in (1, 2)}


def test_torch_job_runs_a_gpu_copy_and_leaves_the_module_on_the_cpu(cuda):
    module = fuse_model(build_model("resnet18_cifar", width=0.125, num_classes=10).eval())
    before = [(p.device, p.data_ptr()) for p in module.parameters()]
    jobs, _ = build_jobs([Variant("fused", module)], ["torch", "cudagraph", "ort"], [1],
                         {"in_channels": 3, "input_size": 32}, None, cuda, ["CPUExecutionProvider"])
    assert [(p.device, p.data_ptr()) for p in module.parameters()] == before
    assert jobs[0].runner[0]().is_cuda and jobs[0].runner[2]  # eager on the GPU, timed with CUDA events


@pytest.mark.skipif("CUDAExecutionProvider" not in ort_helpers.available_providers(),
                    reason="onnxruntime has no CUDA provider here (onnxruntime-gpu is not installed)")
def test_ort_cuda_provider_reports_what_runs(multi, tmp_path):
    from irep_deploy.engines.onnx import export
    onnx = tmp_path / "m.onnx"
    export(multi, onnx)  # fused under its own code, checked, written
    report = bench(onnx, device="gpu", providers=["cuda"], **FAST)
    (result,) = report.results
    running = ort_helpers.make_session(str(onnx), providers=["cuda"]).get_providers()
    fell_back = "CUDAExecutionProvider" not in running
    assert result.backend == ("ort:CPU" if fell_back else "ort:CUDA")
    assert any("runs on CPUExecutionProvider" in w for w in report.warnings) == fell_back
    assert any("host<->device copies" in w for w in report.warnings) == (not fell_back)
    assert not fell_back, "onnxruntime's CUDA provider failed to load on this GPU machine: " + ", ".join(running)
