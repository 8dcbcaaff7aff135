"""Stand-in `tensorrt` modules for TensorRT 8.5 through 11.x. NOT TensorRT.

``make(version)`` exposes only the attributes (of the API surface irep-deploy could touch) that the
real bindings of that version have, with the real enum values: test_trt_conformance.py checks every
name, value and deprecation mark here against the surfaces recorded from the real bindings
(tests/deploy/trt_api/, tools/record_trt_api.py). Calling something a version lacks raises
AttributeError, which fails the test. Calls, property writes and the enum members passed to them are
logged, so that tests can check which APIs, deprecated ones included, the code uses. Behaviour that
needs no GPU follows the real bindings: the calibrator base refuses a subclass that skips its
``__init__``; ``set_timing_cache`` answers False for a cache this stand-in did not write (as TensorRT
does for one from another GPU or version); ``deserialize_cuda_engine`` answers None for a plan it did
not build. This tests our version branching only; it is no claim that TensorRT ran.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Set, Tuple

import torch

Version = Tuple[int, int]
PLAN = b"plan"
CACHE = b"cache"

# 10.x order and values (8.x has STRICT_TYPES at 4 and the rest one higher; 11.x keeps the values of
# what it kept)
BUILDER_FLAGS_10 = ["FP16", "INT8", "DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "TF32",
                    "SPARSE_WEIGHTS", "SAFETY_SCOPE", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS",
                    "DIRECT_IO", "REJECT_EMPTY_ALGORITHMS"]
REMOVED_IN_11 = {"FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS",
                 "REJECT_EMPTY_ALGORITHMS"}  # weak typing and the algorithm selector (10.x -> 11.x guide)
# 8.x API that 10.x removed, offered by the 8.x stand-in only: the code must not use it on 8.x either
LEGACY_8 = {"Builder.build_engine", "Builder.max_batch_size", "IBuilderConfig.max_workspace_size",
            "ICudaEngine.num_bindings", "ICudaEngine.get_binding_name", "ICudaEngine.binding_is_input",
            "IExecutionContext.execute_async_v2", "IExecutionContext.execute_async",
            "IExecutionContext.set_binding_shape", "BuilderFlag.STRICT_TYPES",
            "NetworkDefinitionCreationFlag.EXPLICIT_PRECISION"}
# the first version whose docstrings mark each name deprecated (what the stand-ins offer of it)
DEPRECATED_SINCE: Dict[str, Version] = {
    "Builder.max_batch_size": (8, 5), "IBuilderConfig.max_workspace_size": (8, 5),
    "IExecutionContext.execute_async": (8, 5), "BuilderFlag.STRICT_TYPES": (8, 5),
    "NetworkDefinitionCreationFlag.EXPLICIT_PRECISION": (8, 5),
    "NetworkDefinitionCreationFlag.EXPLICIT_BATCH": (10, 0),
    "IInt8EntropyCalibrator2": (10, 1), "IBuilderConfig.int8_calibrator": (10, 1),
    "IBuilderConfig.set_calibration_profile": (10, 1),
    "BuilderFlag.DIRECT_IO": (10, 7), "BuilderFlag.REJECT_EMPTY_ALGORITHMS": (10, 8),
    "BuilderFlag.FP16": (10, 12), "BuilderFlag.INT8": (10, 12), "BuilderFlag.OBEY_PRECISION_CONSTRAINTS": (10, 12),
    "BuilderFlag.PREFER_PRECISION_CONSTRAINTS": (10, 12), "BuilderFlag.SAFETY_SCOPE": (10, 16),
    "NetworkDefinitionCreationFlag.STRONGLY_TYPED": (11, 0),
}


def parse_version(version: str) -> Version:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


class _Member(int):
    """An enum member: compares and shifts as its value, and knows its qualified name for the log."""
    qualname: str

    def __new__(cls, value: int, qualname: str) -> "_Member":
        member = int.__new__(cls, value)
        member.qualname = qualname
        return member

    def __repr__(self) -> str:
        return self.qualname


class _Enum:
    def __init__(self, name: str, members: Dict[str, int]) -> None:
        self.__members__ = {k: _Member(v, "{}.{}".format(name, k)) for k, v in members.items()}
        self.__name__ = name

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["__members__"][name]
        except KeyError:
            raise AttributeError("{} has no member {!r} in this TensorRT version".format(self.__name__, name)) from None


def _enum_names(args: tuple) -> List[str]:
    return [a.qualname for a in args if isinstance(a, _Member)]


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


def _calibrator_base(log: List[Tuple[str, tuple]]) -> type:
    """IInt8EntropyCalibrator2 as pybind11 makes it: a subclass must call the base ``__init__``."""
    class _Checked(type):
        def __call__(cls, *args: Any, **kwargs: Any) -> Any:
            obj = super().__call__(*args, **kwargs)
            if not obj.__dict__.get("_base_initialised"):
                raise TypeError("tensorrt.tensorrt.IInt8EntropyCalibrator2.__init__() must be called when "
                                "overriding __init__")
            return obj

    def init(self: Any) -> None:
        self._base_initialised = True
        log.append(("IInt8EntropyCalibrator2", ()))

    return _Checked("IInt8EntropyCalibrator2", (), {"__init__": init})


def builder_flags(v: Version) -> Dict[str, int]:
    if v[0] < 10:
        names = BUILDER_FLAGS_10[:4] + ["STRICT_TYPES"] + BUILDER_FLAGS_10[4:]
        return {n: i for i, n in enumerate(names)}
    return {n: i for i, n in enumerate(BUILDER_FLAGS_10) if v[0] < 11 or n not in REMOVED_IN_11}


def make(version: str, dla_cores: int = 0, out_shape: Tuple[int, ...] = (2, 10),
         max_batch: int = 32) -> Tuple[Any, List]:
    """(stand-in tensorrt module, call log) for a version such as '8.5.2.2', '10.3.0' or '11.0.0'.

    ``set_input_shape`` answers False (as TensorRT does) for a batch above the profile's ``max_batch``."""
    v = parse_version(version)
    major = v[0]
    log: List[Tuple[str, tuple]] = []
    if major < 10:
        net_flags = {"EXPLICIT_BATCH": 0, "EXPLICIT_PRECISION": 1}
    elif major == 10:  # EXPLICIT_BATCH present but deprecated and ignored
        net_flags = {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}
    else:  # 11.x: EXPLICIT_BATCH removed; STRONGLY_TYPED deprecated (strong typing is always on), now bit 0
        net_flags = {"STRONGLY_TYPED": 0}
    dtypes = {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4}
    if major >= 10:
        dtypes.update(BF16=7, INT64=8)
    data_type = _Enum("DataType", dtypes)
    io_mode = _Enum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})
    network_flag = _Enum("NetworkDefinitionCreationFlag", net_flags)
    state: Dict[str, Any] = {"shapes": {}}

    def network(flag_value: int) -> _Obj:
        for name, member in network_flag.__members__.items():
            if flag_value & (1 << member):
                log.append(("NetworkDefinitionCreationFlag." + name, ()))
        members: Dict[str, Any] = {"num_inputs": 1}
        if major >= 10:  # 8.x has no flags property
            members["flags"] = flag_value
        return _Obj("INetworkDefinition", log, members)

    def parser(net: Any, logger: Any) -> _Obj:
        return _Obj("OnnxParser", log, {"parse": lambda data: True, "num_errors": 0,
                                        "get_error": lambda i: "error"})

    def timing_cache(data: bytes = CACHE) -> _Obj:
        return _Obj("ITimingCache", log, {"serialize": lambda: CACHE, "data": bytes(data)})

    def config() -> _Obj:
        members: Dict[str, Any] = {
            "set_memory_pool_limit": lambda pool, size: None, "set_flag": lambda f: None,
            "clear_flag": lambda f: None, "add_optimization_profile": lambda p: 0,
            "create_timing_cache": timing_cache,
            # a cache from another GPU or TensorRT version is refused unless ignore_mismatch
            "set_timing_cache": lambda c, ignore: ignore or c._members["data"] in (b"", CACHE),
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
        return PLAN

    def builder(logger: Any) -> _Obj:
        members: Dict[str, Any] = {
            "create_network": network, "create_builder_config": config,
            "create_optimization_profile": lambda: _Obj("IOptimizationProfile", log, {
                "set_shape": lambda name, lo, opt, hi: None}),
            "build_serialized_network": build, "num_DLA_cores": dla_cores}
        if major < 11:  # both removed in 11.0
            members.update(platform_has_fast_fp16=True, platform_has_tf32=True)
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
            members.update(execute_async_v2=lambda bindings, stream: True, set_binding_shape=lambda i, s: True,
                           execute_async=lambda batch, bindings, stream: True)
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

    pools = {"WORKSPACE": 0, "DLA_MANAGED_SRAM": 1, "DLA_LOCAL_DRAM": 2, "DLA_GLOBAL_DRAM": 3}
    module = SimpleNamespace(
        __version__=version,
        Logger=type("Logger", (), {"WARNING": _Member(2, "Logger.WARNING"), "__init__": lambda self, level=2: None}),
        Builder=builder, OnnxParser=parser,
        Runtime=lambda logger: _Obj("Runtime", log, {
            "deserialize_cuda_engine": lambda data: engine() if bytes(data) == PLAN else None}),
        NetworkDefinitionCreationFlag=network_flag, BuilderFlag=_Enum("BuilderFlag", builder_flags(v)),
        MemoryPoolType=_Enum("MemoryPoolType", pools), DeviceType=_Enum("DeviceType", {"GPU": 0, "DLA": 1}),
        DataType=data_type, TensorIOMode=io_mode, state=state)
    if major < 11:
        module.IInt8EntropyCalibrator2 = _calibrator_base(log)
    return module, log


def objects(trt: Any) -> Dict[str, Any]:
    """One of each stand-in object, by its TensorRT class name (what the module's factories make)."""
    builder = trt.Builder(trt.Logger())
    config = builder.create_builder_config()
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(PLAN)
    return {"Builder": builder, "IBuilderConfig": config, "INetworkDefinition": builder.create_network(0),
            "OnnxParser": trt.OnnxParser(None, None), "IOptimizationProfile": builder.create_optimization_profile(),
            "ITimingCache": config.create_timing_cache(b""), "Runtime": trt.Runtime(trt.Logger()),
            "ICudaEngine": engine, "IExecutionContext": engine.create_execution_context()}


def provided(trt: Any) -> Dict[str, Optional[int]]:
    """Every name the stand-in offers, qualified ('Builder.create_network', 'BuilderFlag.FP16'), with
    the value of enum members (None for the rest). Stand-in internals ('ITimingCache.data') excluded.
    The objects are made on a fresh stand-in of the same version: ``trt``'s log stays as it was."""
    trt = make(trt.__version__)[0]
    names: Dict[str, Optional[int]] = {}
    for name, value in vars(trt).items():
        if name == "state":
            continue
        names[name] = None
        if isinstance(value, _Enum):
            names.update({m.qualname: int(m) for m in value.__members__.values()})
    names["Logger.WARNING"] = None
    for kind, obj in objects(trt).items():
        names.update({"{}.{}".format(kind, m): None for m in obj._members if (kind, m) != ("ITimingCache", "data")})
    return names


def deprecated(trt: Any) -> Set[str]:
    """What this stand-in marks deprecated: the names it offers whose mark the version carries."""
    v = parse_version(trt.__version__)
    return {n for n, since in DEPRECATED_SINCE.items() if since <= v and n in provided(trt)}


def used(log: List[Tuple[str, tuple]]) -> Set[str]:
    """Names the code called, wrote, passed (enum members) or subclassed, by the log."""
    out: Set[str] = set()
    for name, args in log:
        out.add(name.rstrip("="))
        out.update(_enum_names(args))
    return out


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
