"""Every equivalence check with a float32 tolerance runs with TF32 off (issue 15, item 2).

On Ampere and newer GPUs cuDNN and CUDA matmuls round float32 to TF32 by default, which breaks the
1e-5/1e-4 tolerances. The flags are plain settings on any machine, so the checks are observed from
inside the networks' forward passes (a global forward hook) with TF32 switched on beforehand.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

import numpy as np
import pytest
import torch

from irep_deploy.engines import onnx as onnx_engine
from irep_deploy.engines import tensorrt as trt_engine
from irep_deploy.errors import VerificationError
from irep_deploy.pipeline import fuse

Flags = Tuple[bool, bool]


def _flags() -> Flags:
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


@contextlib.contextmanager
def tf32_on_and_observed() -> Iterator[List[Flags]]:
    """TF32 on (as on a fresh CUDA process for cuDNN), and the flags every module's forward saw."""
    seen: List[Flags] = []
    saved = _flags()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(_flags()))
    try:
        yield seen
    finally:
        handle.remove()
        assert _flags() == (True, True), "the check did not restore the caller's TF32 setting"
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_fuse_check_runs_in_true_fp32(ckpts, tmp_path):
    with tf32_on_and_observed() as seen:
        fuse(ckpts["multi"], ckpts["arch"], out=tmp_path / "d.pt")
    assert seen and set(seen) == {(False, False)}


def test_export_fuse_check_runs_in_true_fp32(ckpts):
    with tf32_on_and_observed() as seen:
        onnx_engine.load_deploy_model(ckpts["multi"])
    assert seen and set(seen) == {(False, False)}


def test_onnxruntime_vs_torch_check_runs_in_true_fp32(ckpts):
    model, _, _ = onnx_engine.load_deploy_model(ckpts["deploy"])
    data = onnx_engine.export_module(model, (1, 3, 32, 32)).SerializeToString()
    with tf32_on_and_observed() as seen:
        onnx_engine.verify(model, data, (1, 3, 32, 32), [1, 2], tolerance=1e-4)
    assert seen and set(seen) == {(False, False)}


class _EngineStandIn:
    """NOT TensorRT: answers like an FP32 engine (onnxruntime's output) and records the torch flags it
    ran under; TrtRunner itself needs TensorRT and a GPU (tests/deploy/test_trt_gpu.py)."""

    def __init__(self, onnx_path: str, meta: trt_engine.EngineMeta) -> None:
        from irep_deploy.engines import ort as ort_helpers
        self.meta, self.seen = meta, []
        self._session = ort_helpers.make_session(onnx_path)
        self._run = ort_helpers.run

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(_flags())
        return torch.from_numpy(np.asarray(self._run(self._session, x.numpy())))


def test_tensorrt_verify_runs_in_true_fp32(fused_onnx):
    meta = trt_engine.EngineMeta("10.3.0", "gpu", "9.0", "fp32", "input", "logits", [1, 3, 32, 32],
                                 [2, 3, 32, 32], [4, 3, 32, 32], "00")
    runner = _EngineStandIn(str(fused_onnx), meta)
    with tf32_on_and_observed():
        stats = trt_engine.verify_engine(runner, fused_onnx, 2, tolerance=1e-3, min_cosine=0.999)
    assert runner.seen == [(False, False)] and stats["rel_error"] < 1e-5


class _Fp16StandIn(_EngineStandIn):
    """NOT TensorRT: onnxruntime's FP32 output rounded to float16, as an FP16 engine returns it."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return super().__call__(x).half()


def test_tensorrt_fp16_verify_checks_cosine(fused_onnx):
    meta = trt_engine.EngineMeta("10.3.0", "gpu", "9.0", "fp16", "input", "logits", [1, 3, 32, 32],
                                 [2, 3, 32, 32], [4, 3, 32, 32], "00")
    stats = trt_engine.verify_engine(_Fp16StandIn(str(fused_onnx), meta), fused_onnx, 2)  # default: TRT_FP16
    assert 0.999 < stats["cosine"] < 1 and stats["max_abs_error"] > 0  # float16 rounding, well inside 0.999
    with pytest.raises(VerificationError, match=r"^FP16 engine output differs from onnxruntime: cosine 0\.9"):
        trt_engine.verify_engine(_Fp16StandIn(str(fused_onnx), meta), fused_onnx, 2, min_cosine=1.0)
