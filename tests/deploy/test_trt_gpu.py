"""Real TensorRT build and run: only where TensorRT and a CUDA GPU are present."""
from __future__ import annotations

import pytest
import torch

tensorrt = pytest.importorskip("tensorrt", reason="TensorRT is not installed here")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU: TensorRT engines cannot be built or run", allow_module_level=True)

from irep_deploy.compare import TRT_FP16, compare  # noqa: E402
from irep_deploy.engines import ort as ort_helpers  # noqa: E402
from irep_deploy.engines.tensorrt import EngineMismatchError, TrtRunner, build_engine, read_meta, write_meta  # noqa: E402


@pytest.mark.parametrize("fp16", [False, True])
def test_build_verify_run_dynamic_batch(fused_onnx, tmp_path, fp16):
    engine = tmp_path / "m.engine"
    report = build_engine(fused_onnx, engine, fp16=fp16, max_batch=8, timing_cache=tmp_path / "cache",
                          verify=True)
    assert report.meta.precision == ("fp16" if fp16 else "fp32") and (tmp_path / "cache").is_file()
    runner = TrtRunner(engine)
    session = ort_helpers.make_session(str(fused_onnx))
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32)
        got = runner(x).float().cpu().numpy()
        ref = ort_helpers.run(session, x.numpy())
        assert compare(ref, got, TRT_FP16).passed


def test_runner_refuses_other_version(fused_onnx, tmp_path):
    engine = tmp_path / "m.engine"
    build_engine(fused_onnx, engine, max_batch=2)
    meta = read_meta(engine)
    meta.tensorrt_version = "8.5.2.2" if not tensorrt.__version__.startswith("8.5.2.2") else "10.0.0"
    write_meta(engine, meta)
    with pytest.raises(EngineMismatchError, match="rebuild"):
        TrtRunner(engine)


def test_int8_from_qdq_verified_on_real_images(fmnist_qdq, tmp_path):
    report = build_engine(fmnist_qdq, tmp_path / "q.engine", int8=True, max_batch=32, verify=True,
                          calib="fashion-mnist")
    assert report.meta.precision == "int8" and report.meta.calibration["method"] == "qdq"
    assert report.verify["top1_agreement"] >= 0.95


def test_int8_calibrated_with_cache_reuse(fmnist, tmp_path):
    cache = tmp_path / "calib.cache"
    first = build_engine(fmnist["onnx"], tmp_path / "a.engine", int8=True, calib="fashion-mnist", calib_size=256,
                         calib_cache=cache, verify=True)
    assert cache.is_file() and not first.meta.calibration["from_cache"] and first.meta.calibration["images"] == 256
    second = build_engine(fmnist["onnx"], tmp_path / "b.engine", int8=True, calib_cache=cache)
    assert second.meta.calibration["from_cache"]
    assert second.meta.calibration["cache_sha256"] == first.meta.calibration["cache_sha256"]
