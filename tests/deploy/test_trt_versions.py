"""TensorRT version branching against stand-in modules (see trt_standins.py: these are not TensorRT)."""
from __future__ import annotations

import pytest
import torch

from irep_deploy.engines import tensorrt as trt_engine
from irep_deploy.engines.tensorrt import (DEPRECATED_USE, BuildOptions, EngineMeta, TrtRunner, build_serialized,
                                          execute, io_names)
from irep_deploy.errors import IrepError

from . import trt_standins
from .trt_standins import StreamStandIn, args_of, called, recorded, used

VERSIONS = ["8.5.2.2", "10.3.0", "10.12.0", "11.0.0"]
SHAPES = dict(min_shape=(1, 3, 32, 32), opt_shape=(4, 3, 32, 32), max_shape=(32, 3, 32, 32))


def _build(version, **kw):
    trt, log = trt_standins.make(version, dla_cores=kw.pop("dla_cores", 0))
    result = build_serialized(trt, b"onnx", "input", BuildOptions(**dict(SHAPES, **kw)))
    return trt, log, result


def deprecated_used(trt, log):
    """Deprecated API (by the version's own marks) the code used; never the 8.x API that 10 removed."""
    assert not used(log) & trt_standins.LEGACY_8
    return used(log) & trt_standins.deprecated(trt)


@pytest.mark.parametrize("version, flags", [("8.5.2.2", 1), ("10.3.0", 0), ("11.0.0", 0)])
def test_explicit_batch_only_before_10(version, flags):
    _, log, result = _build(version)
    assert args_of(log, "Builder.create_network") == [(flags,)]
    assert result.plan == b"plan" and result.timing_cache == b"cache"


@pytest.mark.parametrize("version", VERSIONS)
def test_fp32_uses_pool_limit_profile_cache_and_no_deprecated_api(version):
    trt, log, result = _build(version, workspace_mb=256, timing_cache=trt_standins.CACHE)
    names = called(log)
    assert deprecated_used(trt, log) == set()
    assert args_of(log, "IBuilderConfig.set_memory_pool_limit") == [(trt.MemoryPoolType.WORKSPACE, 256 << 20)]
    assert args_of(log, "IOptimizationProfile.set_shape") == [("input",) + tuple(SHAPES.values())]
    assert args_of(log, "IBuilderConfig.create_timing_cache") == [(trt_standins.CACHE,)]
    assert "timing_cache:discarded" not in result.calls
    assert args_of(log, "IBuilderConfig.clear_flag") == [(trt.BuilderFlag.TF32,)]
    assert "Builder.build_serialized_network" in names and not result.strongly_typed


@pytest.mark.parametrize("version", VERSIONS)
def test_a_refused_timing_cache_is_replaced_by_an_empty_one(version):
    """set_timing_cache answers False for a cache from another GPU or TensorRT version: the build
    goes on with an empty cache, and the cache written back is the new one."""
    _, log, result = _build(version, timing_cache=b"cache of another GPU")
    assert args_of(log, "IBuilderConfig.create_timing_cache") == [(b"cache of another GPU",), (b"",)]
    assert [a[1] for a in args_of(log, "IBuilderConfig.set_timing_cache")] == [False, False]
    assert "timing_cache:discarded" in result.calls and result.timing_cache == trt_standins.CACHE


def test_an_engine_tensorrt_cannot_deserialize_is_a_one_line_error():
    trt, _ = trt_standins.make("10.3.0")
    meta = EngineMeta("10.3.0", "GPU", "8.0", "fp32", "input", "logits", [1, 3, 32, 32], [1, 3, 32, 32],
                      [1, 3, 32, 32], "ab" * 32)
    with pytest.raises(IrepError, match="m.engine: TensorRT cannot deserialize it") as info:
        TrtRunner.__new__(TrtRunner)._load(trt, b"not a plan", meta, "m.engine")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("version, path", [("8.5.2.2", "flag"), ("10.3.0", "flag"), ("10.12.0", "flag"),
                                           ("11.0.0", "graph")])
def test_fp16_flag_where_it_exists_else_fp16_graph(version, path):
    trt, log, result = _build(version, fp16=True)
    assert trt_engine.needs_fp16_graph(trt) == (path == "graph")
    assert result.strongly_typed == (path == "graph")
    flags = args_of(log, "IBuilderConfig.set_flag")
    assert flags == ([(trt.BuilderFlag.FP16,)] if path == "flag" else [])
    # 10.12 deprecates weak typing; the FP16 flag is kept until 11 removes it (DEPRECATED_USE, docs/deploy.md)
    assert deprecated_used(trt, log) == ({"BuilderFlag.FP16"} if version == "10.12.0" else set())
    assert deprecated_used(trt, log) <= set(DEPRECATED_USE)


def test_dla_on_xavier_standin():
    trt, log, _ = _build("8.5.2.2", fp16=True, dla_core=1, dla_cores=2)
    assert ("IBuilderConfig.default_device_type=", (trt.DeviceType.DLA,)) in log
    assert ("IBuilderConfig.DLA_core=", (1,)) in log
    assert (trt.BuilderFlag.GPU_FALLBACK,) in args_of(log, "IBuilderConfig.set_flag")


@pytest.mark.parametrize("kw, msg", [
    (dict(fp16=True, dla_core=0, dla_cores=0), "no DLA"),
    (dict(fp16=True, dla_core=2, dla_cores=2), "cores 0-1"),
    (dict(fp16=False, dla_core=0, dla_cores=2), "needs --fp16"),
])
def test_dla_refusals(kw, msg):
    with pytest.raises(IrepError, match=msg):
        _build("8.5.2.2", **kw)


@pytest.mark.parametrize("version", VERSIONS)
def test_runtime_uses_named_tensors_and_v3_only(version):
    trt, log = trt_standins.make(version)
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(b"plan")
    context = engine.create_execution_context()
    inputs, outputs = io_names(trt, engine)
    assert (inputs, outputs) == (["input"], ["logits"])
    x = recorded(torch.randn(3, 3, 32, 32))  # CPU tensors stand in for CUDA buffers: only addresses are passed
    stream = StreamStandIn()
    out = execute(trt, engine, context, {"input": x}, outputs, stream,
                  lambda s, d: recorded(torch.empty(s, dtype=d)))
    assert out["logits"].shape == (3, 10) and out["logits"].dtype == torch.float32
    assert args_of(log, "IExecutionContext.set_input_shape") == [("input", (3, 3, 32, 32))]
    assert args_of(log, "IExecutionContext.execute_async_v3") == [(stream.cuda_stream,)]
    assert ("IExecutionContext.set_tensor_address", ("input", x.data_ptr())) in log
    assert deprecated_used(trt, log) == set()
    # the engine used both buffers on its stream: the caching allocator must be told (record_stream)
    assert x.recorded == [stream] and out["logits"].recorded == [stream]


@pytest.mark.parametrize("version", VERSIONS)
def test_rejected_input_shape_is_a_one_line_error(version):
    trt, log = trt_standins.make(version, max_batch=4)
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(b"plan")
    with pytest.raises(IrepError) as info:
        execute(trt, engine, engine.create_execution_context(), {"input": recorded(torch.randn(5, 3, 32, 32))},
                ["logits"], StreamStandIn(), lambda s, d: recorded(torch.empty(s, dtype=d)))
    assert "rejects input 'input' of shape 5x3x32x32" in str(info.value) and "\n" not in str(info.value)
    assert "IExecutionContext.execute_async_v3" not in called(log)


def test_standins_really_lack_removed_apis():
    """Guard for the guard: the stand-ins must fail on what each version removed."""
    trt10, _ = trt_standins.make("10.3.0")
    trt11, _ = trt_standins.make("11.0.0")
    with pytest.raises(AttributeError):
        trt10.Builder(None).build_engine
    with pytest.raises(AttributeError):
        trt11.BuilderFlag.FP16
    with pytest.raises(AttributeError):
        trt11.NetworkDefinitionCreationFlag.EXPLICIT_BATCH
    with pytest.raises(AttributeError):
        trt11.Builder(None).platform_has_fast_fp16
    with pytest.raises(AttributeError):
        trt11.Builder(None).platform_has_tf32
    with pytest.raises(AttributeError):
        trt11.BuilderFlag.REJECT_EMPTY_ALGORITHMS
    with pytest.raises(AttributeError):
        trt_standins.make("8.5.2.2")[0].Builder(None).create_network(1).flags
