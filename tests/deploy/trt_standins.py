"""Stand-in `tensorrt` modules for TensorRT 8.5, 10.x and 11.x. NOT TensorRT.

Each exposes only the attributes (of the API surface irep-deploy could touch) that the named
version has, per NVIDIA's migration guides (8.x -> 10.x and 10.x -> 11.x "Removed Python APIs"):
calling something a version removed raises AttributeError, which fails the test. Calls are logged
so that tests can also check deprecated-but-present APIs are not used. This tests our version
branching only; it is no claim that TensorRT ran.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Dict, List, Tuple

import torch

COMMON_BUILDER_FLAGS = ["FP16", "INT8", "DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "TF32",
                        "SPARSE_WEIGHTS", "SAFETY_SCOPE", "OBEY_PRECISION_CONSTRAINTS",
                        "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO", "REJECT_EMPTY_ALGORITHMS"]
# 8.5 API that 10.x removed (8.x -> 10.x migration guide)
REMOVED_IN_10 = {"Builder.build_engine", "Builder.max_batch_size", "IBuilderConfig.max_workspace_size",
                 "ICudaEngine.num_bindings", "ICudaEngine.get_binding_name", "ICudaEngine.binding_is_input",
                 "ICudaEngine.get_binding_shape", "IExecutionContext.execute_async_v2",
                 "IExecutionContext.execute_async", "IExecutionContext.set_binding_shape",
                 "BuilderFlag.STRICT_TYPES", "NetworkDefinitionCreationFlag.EXPLICIT_PRECISION"}
# deprecated in 8.5 already, present: must not be called by us
DEPRECATED_85 = REMOVED_IN_10


class _Obj:
    """An object with exactly the given members; every call is logged as 'Type.member'."""

    def __init__(self, kind: str, log: List[Tuple[str, tuple]], members: Dict[str, Any]) -> None:
        object.__setattr__(self, "_kind", kind)
        object.__setattr__(self, "_log", log)
        object.__setattr__(self, "_members", dict(members))

    def __getattr__(self, name: str) -> Any:
        members = object.__getattribute__(self, "_members")
        if name not in members:
            raise AttributeError("{} has no attribute {!r} in this TensorRT version".format(self._kind, name))
        value = members[name]
        if callable(value) and not isinstance(value, (type, _Obj)):
            def logged(*args: Any, **kwargs: Any) -> Any:
                self._log.append(("{}.{}".format(self._kind, name), args))
                return value(*args, **kwargs)
            return logged
        self._log.append(("{}.{}".format(self._kind, name), ()))
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._members:
            raise AttributeError("{} has no settable attribute {!r} in this TensorRT version".format(self._kind, name))
        self._log.append(("{}.{}=".format(self._kind, name), (value,)))
        self._members[name] = value


def _enum(names: List[str]) -> SimpleNamespace:
    return SimpleNamespace(**{n: i for i, n in enumerate(names)})


def make(version: str, dla_cores: int = 0, out_shape: Tuple[int, ...] = (2, 10),
         max_batch: int = 32) -> Tuple[Any, List]:
    """(stand-in tensorrt module, call log) for version '8.5.2.2', '10.3.0' or '11.0.0'.

    ``set_input_shape`` answers False (as TensorRT does) for a batch above the profile's ``max_batch``."""
    major = int(version.split(".")[0])
    log: List[Tuple[str, tuple]] = []
    flags = list(COMMON_BUILDER_FLAGS) + (["STRICT_TYPES"] if major < 10 else [])
    if major >= 11:  # weak typing removed (10.x -> 11.x guide)
        flags = [f for f in flags if f not in ("FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS",
                                               "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO")]
    if major < 10:
        net_flags = ["EXPLICIT_BATCH", "EXPLICIT_PRECISION"]
    elif major == 10:  # EXPLICIT_BATCH present but deprecated and ignored
        net_flags = ["EXPLICIT_BATCH", "STRONGLY_TYPED"]
    else:  # 11.x: removed; strong typing is always on
        net_flags = ["STRONGLY_TYPED"]
    data_type = _enum(["FLOAT", "HALF", "INT8", "INT32", "BOOL"])
    io_mode = _enum(["NONE", "INPUT", "OUTPUT"])
    state: Dict[str, Any] = {"shapes": {}}

    def network(flag_value: int) -> _Obj:
        return _Obj("INetworkDefinition", log, {"flags": flag_value, "num_inputs": 1})

    def parser(net: Any, logger: Any) -> _Obj:
        return _Obj("OnnxParser", log, {"parse": lambda data: True, "num_errors": 0,
                                        "get_error": lambda i: "error"})

    def timing_cache() -> _Obj:
        return _Obj("ITimingCache", log, {"serialize": lambda: b"cache"})

    def config() -> _Obj:
        members: Dict[str, Any] = {
            "set_memory_pool_limit": lambda pool, size: None, "set_flag": lambda f: None,
            "clear_flag": lambda f: None, "add_optimization_profile": lambda p: 0,
            "create_timing_cache": lambda data: timing_cache(), "set_timing_cache": lambda c, ignore: True,
            "get_timing_cache": lambda: timing_cache(), "default_device_type": 0, "DLA_core": -1}
        if major < 10:
            members["max_workspace_size"] = 0
        if major < 11:  # implicit quantization: deprecated in 10.1, removed in 11 (10.x -> 11.x guide)
            members.update(int8_calibrator=None, set_calibration_profile=lambda profile: None)
        return _Obj("IBuilderConfig", log, members)

    def build(net: Any, cfg: Any) -> bytes:
        """Drive a calibrator the way TensorRT does: offer its cache first; without one, ask for
        batches until None, then hand it a calibration table."""
        calibrator = cfg._members.get("int8_calibrator")
        if calibrator is not None:
            cached = calibrator.read_calibration_cache()
            if not cached:
                names = ["input"]
                while True:
                    pointers = calibrator.get_batch(names)
                    if pointers is None:
                        break
                    state.setdefault("calib_pointers", []).append(list(pointers))
                calibrator.write_calibration_cache(b"TRT-8501-EntropyCalibration2 table")
            state["calib_cache_read"] = cached
        return b"plan"

    def builder(logger: Any) -> _Obj:
        members: Dict[str, Any] = {
            "create_network": network, "create_builder_config": config,
            "create_optimization_profile": lambda: _Obj("IOptimizationProfile", log, {
                "set_shape": lambda name, lo, opt, hi: None}),
            "build_serialized_network": build, "num_DLA_cores": dla_cores,
            "platform_has_tf32": True}
        if major < 11:
            members["platform_has_fast_fp16"] = True
        if major < 10:
            members.update(build_engine=lambda net, cfg: None, max_batch_size=1)
        return _Obj("Builder", log, members)

    def context() -> _Obj:
        members: Dict[str, Any] = {
            "set_input_shape": lambda name, shape: shape[0] <= max_batch and (
                state["shapes"].__setitem__(name, shape) or True),
            "get_tensor_shape": lambda name: (state["shapes"]["input"][0],) + out_shape[1:],
            "set_tensor_address": lambda name, ptr: True,
            "execute_async_v3": lambda stream: True}
        if major < 10:
            members.update(execute_async_v2=lambda bindings, stream: True, set_binding_shape=lambda i, s: True)
        return _Obj("IExecutionContext", log, members)

    def engine() -> _Obj:
        names = ["input", "logits"]
        members: Dict[str, Any] = {
            "num_io_tensors": 2, "get_tensor_name": lambda i: names[i],
            "get_tensor_mode": lambda n: io_mode.INPUT if n == "input" else io_mode.OUTPUT,
            "get_tensor_dtype": lambda n: data_type.FLOAT, "create_execution_context": context}
        if major < 10:
            members.update(num_bindings=2, get_binding_name=lambda i: names[i],
                           binding_is_input=lambda i: i == 0)
        return _Obj("ICudaEngine", log, members)

    module = SimpleNamespace(
        __version__=version,
        Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None}),
        Builder=builder, OnnxParser=parser,
        Runtime=lambda logger: _Obj("Runtime", log, {"deserialize_cuda_engine": lambda data: engine()}),
        NetworkDefinitionCreationFlag=_enum(net_flags), BuilderFlag=_enum(flags),
        MemoryPoolType=_enum(["WORKSPACE", "DLA_MANAGED_SRAM", "DLA_LOCAL_DRAM", "DLA_GLOBAL_DRAM"]),
        DeviceType=_enum(["GPU", "DLA"]), DataType=data_type, TensorIOMode=io_mode, state=state)
    if major < 11:
        module.IInt8EntropyCalibrator2 = type("IInt8EntropyCalibrator2", (), {"__init__": lambda self: None})
    return module, log


def called(log: List[Tuple[str, tuple]]) -> List[str]:
    return [name for name, _ in log]


def args_of(log: List[Tuple[str, tuple]], name: str) -> List[tuple]:
    return [args for n, args in log if n == name]



class StreamStandIn:
    """NOT a CUDA stream: the handle TensorRT gets (``cuda_stream``), for CPU tests."""
    cuda_stream = 7


class RecordedTensor(torch.Tensor):
    """A CPU tensor standing in for a CUDA buffer that logs ``record_stream`` (CPU tensors have none)."""
    recorded: List[Any]

    def record_stream(self, stream: Any) -> None:  # type: ignore[override]
        self.recorded.append(stream)


def recorded(tensor: "torch.Tensor") -> RecordedTensor:
    out = tensor.as_subclass(RecordedTensor)
    out.recorded = []
    return out
