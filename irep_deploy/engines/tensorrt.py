"""TensorRT engines from ONNX, for TensorRT 8.5 (JetPack 5, Xavier) through 10.x and 11.x.

Only the named-tensor API is used (num_io_tensors, get_tensor_name, set_input_shape,
set_tensor_address, execute_async_v3), which every version from 8.5 on has. Where versions differ
the code asks the module what it has rather than trusting version numbers alone:

- ``EXPLICIT_BATCH``: required on 8.x, ignored (deprecated) on 10.x, removed on 11.x -> set on < 10.
- FP16: ``BuilderFlag.FP16`` on 8.5/10.x; removed on 11.x (strongly typed only) -> the ONNX graph is
  converted to FP16 before parsing.
- FP32: ``BuilderFlag.TF32`` is cleared where it exists, so FP32 means FP32.
- INT8 from a QDQ ONNX (explicit quantization): a strongly typed network (the ``STRONGLY_TYPED``
  creation flag on 10.x; always so on 11.x, where the flag is deprecated and not set), so the graph's
  Q/DQ nodes decide every precision; ``BuilderFlag.INT8`` on 8.5 (and on 10.x with ``--fp16``, whose
  FP16 fallback needs weak typing). INT8 from a float ONNX (implicit quantization, 8.5/10.x only;
  deprecated in 10.1, removed in 11): ``BuilderFlag.INT8`` with an entropy calibrator fed real images,
  and a calibration cache.

The deprecated API still called on some versions is :data:`DEPRECATED_USE` (docs/deploy.md lists it).

Every engine gets a JSON sidecar (``model.engine.json``); :class:`TrtRunner` refuses an engine whose
sidecar names another TensorRT version or GPU, since serialized engines are not portable.
Device buffers are torch CUDA tensors (torch ships in every Jetson image; pycuda does not).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .. import __version__
from .._io import atomic_write, check_writable, clip, quote, read_bounded, regular_input
from ..compare import INT8_REAL, TRT_FP16, TRT_FP32, compare
from ..errors import EngineMismatchError, IrepError, NotAvailableError, UsageError, VerificationError, first_line
from ..precision import exact_fp32
from ..progress import Stages, bar

PathLike = Union[str, "os.PathLike[str]"]
META_FORMAT = "irep-deploy-engine"
META_VERSION = 1


def require_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as exc:
        raise NotAvailableError("TensorRT is not installed here (pip install tensorrt on x86-64 with an NVIDIA GPU; "
                        "on Jetson use a JetPack image, see Dockerfile.jetson)") from exc
    return tensorrt


def require_cuda() -> Tuple[str, str]:
    """(GPU name, compute capability "major.minor") of the current CUDA device, or an IrepError."""
    if not torch.cuda.is_available():
        raise NotAvailableError("no CUDA GPU is visible to torch; TensorRT engines can only be built and run on a GPU")
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), "{}.{}".format(major, minor)


def trt_major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


# -- metadata sidecar --------------------------------------------------------------------------------
@dataclass
class EngineMeta:
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str  # "fp32" | "fp16" | "int8"
    input_name: str
    output_name: str
    min_shape: List[int]
    opt_shape: List[int]
    max_shape: List[int]
    onnx_sha256: str
    onnx_path: str = ""
    strongly_typed: bool = False  # the graph's types decide precisions (FP16 graph on 11, QDQ on 10/11)
    dla_core: Optional[int] = None
    workspace_mb: int = 0
    irep_deploy_version: str = __version__
    created: str = ""
    # INT8 only: method ("qdq" | "entropy2"), images, batch, dataset, cache path and sha256, from_cache
    calibration: Optional[Dict[str, Any]] = None
    format: str = META_FORMAT
    format_version: int = META_VERSION


def meta_path(engine: PathLike) -> Path:
    return Path(str(engine) + ".json")


def meta_json(meta: EngineMeta) -> str:
    return json.dumps(asdict(meta), indent=2, sort_keys=True) + "\n"


def write_meta(engine: PathLike, meta: EngineMeta) -> Path:
    path = meta_path(engine)
    with atomic_write(path, "w") as handle:
        handle.write(meta_json(meta))
    return path


def read_meta(engine: PathLike) -> EngineMeta:
    """The sidecar of ``engine``; a missing, unreadable or incomplete one is an IrepError naming it."""
    path = meta_path(engine)
    if not path.is_file():
        raise IrepError("{}: no metadata file {} next to the engine; rebuild it with `irep-deploy build-trt`".format(
            engine, path.name))
    try:
        raw = json.loads(read_bounded(path, META_MAX_BYTES, "engine metadata").decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise IrepError("{}: not valid JSON ({})".format(path, clip(first_line(exc), 100))) from exc
    if not isinstance(raw, dict) or raw.get("format") != META_FORMAT:
        raise IrepError("{}: not irep-deploy engine metadata".format(path))
    if not _is_int(raw.get("format_version")):
        raise IrepError("{}: metadata format version {} is not an integer".format(path, quote(raw.get("format_version"))))
    if raw["format_version"] > META_VERSION:
        raise IrepError("{}: metadata format version {} is newer than this irep-deploy reads ({})".format(
            path, quote(raw.get("format_version")), META_VERSION))
    known = {f.name for f in fields(EngineMeta)}
    required = ("tensorrt_version", "gpu_name", "compute_capability", "precision", "input_name", "output_name",
                "min_shape", "opt_shape", "max_shape", "onnx_sha256")
    missing = [k for k in required if k not in raw]
    if missing:
        raise IrepError("{}: metadata lacks {!r}".format(path, missing[0]))
    for key, value in raw.items():
        if key in known and not _META_TYPES[key](value):
            raise IrepError("{}: metadata field {!r} is {}, not {}".format(
                path, key, quote(value), _META_TYPE_NAMES[key]))
    return EngineMeta(**{k: v for k, v in raw.items() if k in known})


META_MAX_BYTES = 1 << 20


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_shape(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 4 and all(_is_int(d) and 1 <= d <= 1 << 20 for d in v)


_META_CHECKS = {"str": lambda v: isinstance(v, str), "shape": _is_shape, "bool": lambda v: isinstance(v, bool),
                "int": _is_int, "optional int": lambda v: v is None or _is_int(v),
                "optional object": lambda v: v is None or isinstance(v, dict)}
_META_KIND = dict({f: "str" for f in ("tensorrt_version", "gpu_name", "compute_capability", "precision",
                                      "input_name", "output_name", "onnx_sha256", "onnx_path",
                                      "irep_deploy_version", "created", "format")},
                  min_shape="shape", opt_shape="shape", max_shape="shape", strongly_typed="bool",
                  dla_core="optional int", workspace_mb="int", format_version="int",
                  calibration="optional object")
_META_TYPES = {k: _META_CHECKS[v] for k, v in _META_KIND.items()}
_META_TYPE_NAMES = {k: "a list of 4 positive integers (NCHW)" if v == "shape" else "a " + v for k, v in _META_KIND.items()}


def check_compatible(meta: EngineMeta, engine: PathLike, tensorrt_version: str, gpu_name: str,
                     compute_capability: str) -> None:
    """Refuse an engine from another TensorRT version or GPU, saying how to rebuild it here."""
    here = "TensorRT {} on {} (compute {})".format(tensorrt_version, gpu_name, compute_capability)
    built = "TensorRT {} on {} (compute {})".format(meta.tensorrt_version, meta.gpu_name, meta.compute_capability)
    if meta.tensorrt_version != tensorrt_version or meta.gpu_name != gpu_name or \
            meta.compute_capability != compute_capability:
        flags = {"fp16": " --fp16", "int8": " --int8"}.get(meta.precision, "")
        calib = meta.calibration or {}
        if calib.get("method") == "entropy2":
            flags += " --calib {}".format(calib.get("dataset") or "DATASET")
        rebuild = "irep-deploy build-trt {} -o {}{}".format(meta.onnx_path or "MODEL.onnx", engine, flags)
        raise EngineMismatchError("{}: built with {}, this machine has {}; engines are not portable, rebuild "
                                  "here with `{}`".format(engine, built, here, rebuild))


def sha256_file(path: PathLike) -> str:
    regular_input(path, "a model file")
    digest = hashlib.sha256()
    with open(str(path), "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- building ----------------------------------------------------------------------------------------
@dataclass
class BuildOptions:
    fp16: bool = False
    workspace_mb: int = 1024
    min_shape: Tuple[int, ...] = ()
    opt_shape: Tuple[int, ...] = ()
    max_shape: Tuple[int, ...] = ()
    dla_core: Optional[int] = None
    timing_cache: bytes = b""
    int8: bool = False
    qdq: bool = False          # the ONNX holds Q/DQ nodes (explicit quantization)
    calibrator: Any = None     # implicit quantization: an IInt8EntropyCalibrator2 (entropy_calibrator)


@dataclass
class BuildResult:
    plan: bytes
    timing_cache: bytes
    strongly_typed: bool
    calls: List[str] = field(default_factory=list)  # which version-dependent paths were taken


# TensorRT API called where the version's own docstrings mark it deprecated: name -> (deprecated in,
# removed in, why it is kept). Nothing current does the same on those versions; tests/deploy/
# test_trt_conformance.py checks this against the recorded real marks and against docs/deploy.md.
DEPRECATED_USE: Dict[str, Tuple[str, str, str]] = {
    "IInt8EntropyCalibrator2": ("10.1", "11.0", "implicit INT8 calibration of a float ONNX (--int8 --calib)"),
    "IBuilderConfig.int8_calibrator": ("10.1", "11.0", "implicit INT8 calibration of a float ONNX"),
    "IBuilderConfig.set_calibration_profile": ("10.1", "11.0", "implicit INT8 calibration of a float ONNX"),
    "BuilderFlag.INT8": ("10.12", "11.0", "weak typing: implicit INT8, and QDQ with an FP16 fallback"),
    "BuilderFlag.FP16": ("10.12", "11.0", "weak typing: --fp16 lets TensorRT keep slow or imprecise layers FP32"),
}


def weak_typing(trt: Any) -> bool:
    """True where builder flags choose precisions (8.x, 10.x); 11.x is strongly typed only."""
    return hasattr(trt.BuilderFlag, "FP16")


def network_flags(trt: Any) -> int:
    """EXPLICIT_BATCH where it still means something (TensorRT < 10); 0 elsewhere."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    if flag is not None and trt_major(trt) < 10:
        return 1 << int(flag)
    return 0


def needs_fp16_graph(trt: Any) -> bool:
    """True where FP16 can only come from the graph's own types (no BuilderFlag.FP16: TensorRT 11)."""
    return not weak_typing(trt)


def int8_plan(trt: Any, qdq: bool, fp16: bool) -> str:
    """How this TensorRT builds INT8: "strong" (a QDQ graph in a strongly typed network: 10.x, 11.x),
    "flag" (a QDQ graph with BuilderFlag.INT8: 8.5, or 10.x with --fp16), "calibrate" (a float graph
    with BuilderFlag.INT8 and a calibrator: 8.5, 10.x). Refusals are one-line IrepErrors."""
    strong = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    weak = hasattr(trt.BuilderFlag, "INT8")  # weak typing: gone in 11.x
    if qdq:
        if strong and not (fp16 and weak):
            if fp16:
                raise IrepError("--fp16 with a QDQ ONNX: TensorRT {} builds it strongly typed, where the graph "
                                "alone decides precisions (no FP16 fallback flag); drop --fp16, the layers the "
                                "graph leaves unquantized run in FP32".format(trt.__version__))
            return "strong"
        return "flag"
    if not weak or not hasattr(trt, "IInt8EntropyCalibrator2"):
        raise IrepError("TensorRT {} removed implicit INT8 calibration; quantize the ONNX to QDQ first "
                        "(irep-deploy quantize) and build that with --int8".format(trt.__version__))
    return "calibrate"


def entropy_calibrator(trt: Any, images: np.ndarray, batch: int, cache: bytes = b"",
                       device: Union[str, torch.device, None] = None, progress: bool = False) -> Any:
    """An IInt8EntropyCalibrator2 that feeds ``images`` (N x C x H x W, already preprocessed) to
    TensorRT ``batch`` at a time from torch device buffers, then None; ``cache`` (a previous
    calibration table) is offered first, and the table TensorRT writes lands in ``cache_out``.

    ``device`` defaults to the current CUDA device (TensorRT reads the pointers on the GPU).
    ``progress``: a bar on stderr counting the batches fed (closed after the last one)."""
    from .int8 import batches

    base = trt.IInt8EntropyCalibrator2
    chunks = batches(images, batch)
    where = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())

    class EntropyCalibrator(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)  # pybind11 bases must be initialised explicitly
            self.batch, self.fed, self.cache_in, self.cache_out = batch, 0, bytes(cache), None
            self.current: Optional[torch.Tensor] = None
            self.progress_bar = bar(total=len(chunks), desc="build-trt: calibrating", enabled=progress,
                                    unit="batch")

        def get_batch_size(self) -> int:
            return self.batch

        def get_batch(self, names: Sequence[str], *rest: Any) -> Optional[List[int]]:
            self.progress_bar.update(self.fed - self.progress_bar.n)  # the batches fed so far are run
            if self.fed >= len(chunks):
                self.progress_bar.close()
                return None  # no more batches: calibration ends
            # kept on self: TensorRT reads the memory after get_batch returns
            self.current = torch.from_numpy(chunks[self.fed]).to(where).contiguous()
            if where.type == "cuda":
                torch.cuda.current_stream(where).synchronize()  # TensorRT reads on its own stream
            self.fed += 1
            return [int(self.current.data_ptr())]

        def read_calibration_cache(self, *rest: Any) -> Optional[bytes]:
            return self.cache_in or None  # None: calibrate from the images

        def write_calibration_cache(self, data: Any) -> None:
            self.cache_out = bytes(data)

    return EntropyCalibrator()


def build_serialized(trt: Any, onnx_bytes: bytes, input_name: str, options: BuildOptions,
                     source: str = "<onnx>") -> BuildResult:
    """Parse ``onnx_bytes`` and build a serialized engine; the version branching lives here.

    ``onnx_bytes`` must already be an FP16 graph when ``options.fp16`` and :func:`needs_fp16_graph`
    (not INT8).
    """
    calls: List[str] = []
    plan_int8 = int8_plan(trt, options.qdq, options.fp16) if options.int8 else ""
    if plan_int8 == "calibrate" and options.calibrator is None:
        raise IrepError("{}: a float ONNX needs a calibrator (--calib DATASET) for --int8".format(source))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = network_flags(trt)
    calls.append("create_network({})".format("EXPLICIT_BATCH" if flags else "0"))
    if plan_int8 == "strong":
        if weak_typing(trt):  # 11.x is strongly typed anyway and deprecates the flag
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        calls.append("int8:strongly_typed")
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise IrepError("{}: TensorRT's ONNX parser rejects it: {}".format(
            source, (errors[0].splitlines() or ["unknown error"])[0][:200] if errors else "unknown error"))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_mb) << 20)
    strongly_typed = plan_int8 == "strong"
    if plan_int8 in ("flag", "calibrate"):
        config.set_flag(trt.BuilderFlag.INT8)
        calls.append("int8:flag")
        if options.fp16:  # layers without an INT8 kernel fall back to FP16 instead of FP32
            config.set_flag(trt.BuilderFlag.FP16)
            calls.append("fp16:flag")
    if plan_int8 == "calibrate":
        config.int8_calibrator = options.calibrator
        calls.append("int8:calibrator")
    if plan_int8:
        if hasattr(trt.BuilderFlag, "TF32"):  # the layers left in float are FP32, not TF32
            config.clear_flag(trt.BuilderFlag.TF32)
            calls.append("clear_tf32")
    elif options.fp16:
        if needs_fp16_graph(trt):
            strongly_typed = True
            calls.append("fp16:graph")
        else:
            config.set_flag(trt.BuilderFlag.FP16)
            calls.append("fp16:flag")
    elif hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 is on by default; FP32 should mean FP32
        calls.append("clear_tf32")
    if options.dla_core is not None:
        _use_dla(trt, builder, config, options)
        calls.append("dla:{}".format(options.dla_core))
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, tuple(options.min_shape), tuple(options.opt_shape), tuple(options.max_shape))
    config.add_optimization_profile(profile)
    if plan_int8 == "calibrate":
        # calibration runs the network at one shape: the calibrator's batch
        calib = builder.create_optimization_profile()
        shape = (int(options.calibrator.get_batch_size()),) + tuple(options.opt_shape[1:])
        calib.set_shape(input_name, shape, shape, shape)
        config.set_calibration_profile(calib)
        calls.append("calibration_profile")
    cache = config.create_timing_cache(bytes(options.timing_cache))
    if not config.set_timing_cache(cache, False):  # a cache from another GPU/version is not used
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
        calls.append("timing_cache:discarded")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise IrepError("{}: TensorRT failed to build an engine (see the TensorRT log above)".format(source))
    new_cache = config.get_timing_cache().serialize()
    return BuildResult(bytes(plan), bytes(new_cache), strongly_typed, calls)


def _use_dla(trt: Any, builder: Any, config: Any, options: BuildOptions) -> None:
    cores = getattr(builder, "num_DLA_cores", 0)
    if not cores:
        raise NotAvailableError("--dla-core {}: this GPU has no DLA (only Jetson Xavier/Orin do)".format(options.dla_core))
    if not 0 <= options.dla_core < cores:
        raise NotAvailableError("--dla-core {}: this board has DLA cores 0-{}".format(options.dla_core, cores - 1))
    if not (options.fp16 or options.int8):
        raise UsageError("--dla-core needs --fp16 or --int8: DLA runs FP16 and INT8 only")
    config.default_device_type = trt.DeviceType.DLA
    config.DLA_core = int(options.dla_core)
    config.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # layers DLA cannot run stay on the GPU


@dataclass
class BuildReport:
    out: str
    meta_out: str
    meta: EngineMeta
    timing_cache: Optional[str]
    calls: List[str]
    verify: Optional[Dict[str, float]] = None


def default_engine_path(onnx_path: PathLike) -> Path:
    return Path(onnx_path).with_suffix(".engine")


def build_engine(onnx_path: PathLike, out: Optional[PathLike] = None, fp16: bool = False,
                 workspace_mb: int = 1024, min_batch: Optional[int] = None, opt_batch: Optional[int] = None,
                 max_batch: Optional[int] = None, timing_cache: Optional[PathLike] = None, dla_core: Optional[int] = None,
                 verify: bool = False, tolerance: float = TRT_FP32.max_rel_error, min_cosine: Optional[float] = None,
                 seed: int = 0, int8: bool = False, calib: Optional[str] = None, data_root: Optional[str] = None,
                 calib_size: int = 512, calib_cache: Optional[PathLike] = None,
                 min_agreement: float = INT8_REAL.min_agreement, verify_images: int = 256,
                 progress: bool = True) -> BuildReport:
    """Build ``out`` (+ ``out.json`` metadata) from an ONNX file; see the module docstring.

    ``verify`` compares the engine with onnxruntime (CPU) before anything is written: FP32 by relative
    error against ``tolerance`` and FP16 by cosine similarity (``min_cosine``, default 0.999) on a
    random batch; INT8 on ``verify_images`` real test images of ``calib`` by cosine similarity
    (default 0.99) and top-1 agreement (``min_agreement``) with onnxruntime running the same ONNX
    (the defaults are :mod:`irep_deploy.compare`'s TRT_FP32, TRT_FP16 and INT8_REAL).

    ``int8``: a QDQ ONNX is built as it is quantized; a float ONNX is calibrated on ``calib_size``
    real training images of the dataset ``calib`` (TensorRT 8.5/10.x), with ``calib_cache`` read
    when present and written after the build. ``progress``: bars on stderr for the calibration batches
    and for the stages (build, verify, write).
    """
    from . import onnx as onnx_engine
    from . import int8 as int8_tools

    out = Path(out) if out is not None else default_engine_path(onnx_path)
    check_writable(out, inputs=(onnx_path, timing_cache, calib_cache))
    check_writable(meta_path(out), inputs=(onnx_path, timing_cache, calib_cache))
    if timing_cache is not None:
        check_writable(timing_cache, inputs=(onnx_path, calib_cache))
    if calib_cache is not None:
        check_writable(calib_cache, inputs=(onnx_path,))
    given = [b for b in (min_batch, opt_batch, max_batch) if b is not None]
    if given != sorted(given):  # refused before any file is read: the flags alone contradict
        raise UsageError("batch range must satisfy min <= opt <= max, got --min-batch {} --opt-batch {} "
                         "--max-batch {}".format(*("-" if b is None else b for b in (min_batch, opt_batch, max_batch))))
    model = onnx_engine.load_onnx(onnx_path)
    input_name, output_name, dims = onnx_engine.io_spec(model)
    if len(dims) != 4 or not all(isinstance(d, int) and d > 0 for d in dims[1:]):
        raise IrepError("{}: expected an NCHW input with fixed C, H, W, got {}".format(onnx_path, dims))
    if isinstance(dims[0], int) and dims[0] > 0:  # exported with a fixed batch: that is the only size
        asked = {b for b in (min_batch, opt_batch, max_batch) if b is not None}
        if asked - {dims[0]}:
            raise IrepError("{}: has a fixed batch of {}; re-export with a dynamic batch for another range".format(
                onnx_path, dims[0]))
        min_batch = opt_batch = max_batch = dims[0]
    else:
        min_batch = 1 if min_batch is None else min_batch
        opt_batch = min_batch if opt_batch is None else opt_batch
        max_batch = max(32, opt_batch) if max_batch is None else max_batch
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise UsageError("batch range must satisfy 1 <= min ({}) <= opt ({}) <= max ({})".format(
            min_batch, opt_batch, max_batch))
    chw = tuple(int(d) for d in dims[1:])
    qdq = int8_tools.is_quantized(model)
    calib_batch = min(max_batch, 32)  # one shape for calibration, inside the profile
    cache_present = calib_cache is not None and Path(calib_cache).is_file()
    _check_int8_args(onnx_path, int8, qdq, calib, calib_cache, cache_present, verify, calib_size, calib_batch)
    images = None
    if int8 and not qdq and calib is not None:  # read before TensorRT: bad data fails fast, in one line
        images = int8_tools.calibration_images(calib, chw, calib_size, data_root, source=str(onnx_path))
    trt = require_tensorrt()
    gpu_name, capability = require_cuda()
    graph = model
    if fp16 and not int8 and needs_fp16_graph(trt):
        graph = onnx_engine.convert_fp16(model)
    cache_in = Path(timing_cache).read_bytes() if timing_cache is not None and Path(timing_cache).is_file() else b""
    calibrator = None
    if int8 and not qdq and int8_plan(trt, qdq, fp16) == "calibrate":
        calibrator = entropy_calibrator(trt, images if images is not None else np.zeros((0,) + chw, np.float32),
                                        calib_batch, Path(calib_cache).read_bytes() if cache_present else b"",
                                        progress=progress)
    options = BuildOptions(fp16, workspace_mb, (min_batch,) + chw, (opt_batch,) + chw, (max_batch,) + chw,
                           dla_core, cache_in, int8=int8, qdq=qdq, calibrator=calibrator)
    with Stages("build-trt", ("build",) + (("verify",) if verify else ()), progress) as stage:
        stage("build")
        result = build_serialized(trt, graph.SerializeToString(), input_name, options, source=str(onnx_path))
        if calibrator is not None:
            calibrator.progress_bar.close()
        meta = _engine_meta(trt, model, qdq, calibrator, calib, calib_cache, gpu_name, capability, int8, fp16,
                            input_name, output_name, options, onnx_path, result, dla_core, workspace_mb)
        stats = None
        if verify:
            stage("verify")
            runner = TrtRunner.from_bytes(result.plan, meta, str(out))
            if int8:
                real = int8_tools.calibration_images(calib, chw, verify_images, data_root, split="test",  # type: ignore[arg-type]
                                                     source=str(onnx_path))
                stats = verify_int8(runner, onnx_path, real, min_cosine, min_agreement)
            else:
                stats = verify_engine(runner, onnx_path, opt_batch, tolerance, min_cosine, seed)
    with atomic_write(out, "wb") as handle:
        handle.write(result.plan)
    write_meta(out, meta)
    if timing_cache is not None:
        with atomic_write(timing_cache, "wb") as handle:
            handle.write(result.timing_cache)
    if calibrator is not None and calib_cache is not None:
        with atomic_write(calib_cache, "wb") as handle:
            handle.write(calibrator.cache_out)
    return BuildReport(str(out), str(meta_path(out)), meta, str(timing_cache) if timing_cache else None,
                       result.calls, stats)


def _engine_meta(trt: Any, model: Any, qdq: bool, calibrator: Any, calib: Optional[str],
                 calib_cache: Optional[PathLike], gpu_name: str, capability: str, int8: bool, fp16: bool,
                 input_name: str, output_name: str, options: BuildOptions, onnx_path: PathLike, result: BuildResult,
                 dla_core: Optional[int], workspace_mb: int) -> EngineMeta:
    """The sidecar of a built engine; refuses a build that wrote no asked-for calibration table."""
    meta = EngineMeta(str(trt.__version__), gpu_name, capability, "int8" if int8 else "fp16" if fp16 else "fp32",
                      input_name, output_name, list(options.min_shape), list(options.opt_shape),
                      list(options.max_shape), sha256_file(onnx_path), str(onnx_path), result.strongly_typed,
                      dla_core, workspace_mb,
                      created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      calibration=calibration_facts(model, qdq, calibrator, calib, calib_cache) if int8 else None)
    if calibrator is not None and calib_cache is not None and calibrator.cache_out is None:
        raise IrepError("{}: TensorRT wrote no calibration table for --calib-cache {}".format(onnx_path, calib_cache))
    return meta


def _check_int8_args(onnx_path: PathLike, int8: bool, qdq: bool, calib: Optional[str],
                     calib_cache: Optional[PathLike], cache_present: bool, verify: bool, calib_size: int,
                     calib_batch: int) -> None:
    """Flag combinations that cannot work, refused before TensorRT is touched."""
    if qdq and not int8:
        raise IrepError("{}: is a quantized (QDQ) ONNX; build it with --int8".format(onnx_path))
    if not int8:
        for flag, value in (("--calib", calib), ("--calib-cache", calib_cache)):
            if value is not None:
                raise UsageError("{} applies to --int8 builds only".format(flag))
        return
    if qdq and calib_cache is not None:
        raise IrepError("--calib-cache {}: {} is already quantized (QDQ); its scales are in the graph, there is "
                        "nothing to calibrate".format(calib_cache, onnx_path))
    if not qdq and calib is None and not cache_present:
        raise UsageError("{}: a float ONNX with --int8 needs --calib DATASET (implicit calibration, TensorRT 8.5/"
                        "10.x) or an existing --calib-cache; or quantize it to QDQ first".format(onnx_path))
    if verify and calib is None:
        raise UsageError("--verify of an INT8 engine compares on real images: give --calib DATASET")
    if not qdq and calib is not None and calib_size < calib_batch:
        raise UsageError("--calib-size {}: too few images for one calibration batch of {}".format(
            calib_size, calib_batch))


def calibration_facts(model: Any, qdq: bool, calibrator: Any, calib: Optional[str],
                      calib_cache: Optional[PathLike]) -> Dict[str, Any]:
    """What the sidecar records about an INT8 build's quantization."""
    if qdq:
        return {"method": "qdq", "onnx_metadata": {p.key: p.value for p in model.metadata_props}}
    table = calibrator.cache_out if calibrator is not None and calibrator.cache_out else \
        (calibrator.cache_in if calibrator is not None else b"")
    return {"method": "entropy2", "dataset": calib, "split": "train",
            "images": int(calibrator.fed * calibrator.batch) if calibrator is not None else 0,
            "batch": int(calibrator.batch) if calibrator is not None else 0,
            "from_cache": bool(calibrator is not None and calibrator.fed == 0 and calibrator.cache_in),
            "cache_path": str(calib_cache) if calib_cache is not None else None,
            "cache_sha256": hashlib.sha256(table).hexdigest() if table else None}


def verify_engine(runner: "TrtRunner", onnx_path: PathLike, batch: int, tolerance: Optional[float] = None,
                  min_cosine: Optional[float] = None, seed: int = 0) -> Dict[str, float]:
    """The engine vs onnxruntime on a seeded random batch: FP32 by relative error (``tolerance``, default
    TRT_FP32), FP16 by cosine similarity (``min_cosine``, default TRT_FP16); returns the measures."""
    from . import ort as ort_helpers

    shape = [batch] + list(runner.meta.opt_shape[1:])
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    reference = ort_helpers.run(ort_helpers.make_session(str(onnx_path)), x.numpy())
    # The engine's own TF32 is a builder flag (cleared for FP32 builds); torch's is off as well, so that
    # nothing torch does around the engine rounds to TF32 while the FP32 tolerance is checked.
    with exact_fp32():
        got = runner(x).float().cpu().numpy()
    fp16 = runner.meta.precision == "fp16"
    limits = TRT_FP16.but(min_cosine=min_cosine) if fp16 else TRT_FP32.but(max_rel_error=tolerance)
    check = compare(reference, got, limits)
    if not check.passed:
        raise VerificationError("{}engine output differs from onnxruntime: {} (max abs error {:.3g}); nothing "
                                "written".format("FP16 " if fp16 else "", "; ".join(check.failures),
                                                 check.max_abs_error))
    return check.as_dict()


def verify_int8(runner: "TrtRunner", onnx_path: PathLike, images: np.ndarray, min_cosine: Optional[float] = None,
                min_agreement: Optional[float] = None) -> Dict[str, float]:
    """INT8 engine vs onnxruntime running the same ONNX (a QDQ graph runs quantized there too, a
    float graph is the FP32 reference) on real ``images``, batch-wise inside the engine's profile:
    cosine similarity and top-1 agreement (:func:`irep_deploy.engines.int8.check_int8`)."""
    from . import int8 as int8_tools
    from . import ort as ort_helpers

    session = ort_helpers.make_session(str(onnx_path))
    low, high = runner.batch_range()
    step = high if low == high else min(high, 64)
    ref, got = [], []
    for i in range(0, len(images) - low + 1, step):
        x = images[i:i + step]
        ref.append(ort_helpers.run(session, x))
        got.append(runner(torch.from_numpy(x)).float().cpu().numpy())
    limits = INT8_REAL.but(min_cosine=min_cosine, min_agreement=min_agreement)
    return int8_tools.check_int8(np.concatenate(ref), np.concatenate(got), limits).as_dict()


# -- running -----------------------------------------------------------------------------------------
_DTYPES = (("FLOAT", torch.float32), ("HALF", torch.float16), ("INT32", torch.int32), ("INT8", torch.int8),
           ("BOOL", torch.bool), ("INT64", torch.int64), ("BF16", torch.bfloat16))


def torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    for name, torch_type in _DTYPES:
        if hasattr(trt.DataType, name) and dtype == getattr(trt.DataType, name):
            return torch_type
    raise IrepError("unsupported TensorRT tensor type {}".format(dtype))


def io_names(trt: Any, engine: Any) -> Tuple[List[str], List[str]]:
    """(inputs, outputs) by the named-tensor API (8.5+); no binding indices."""
    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(name)
    return inputs, outputs


def execute(trt: Any, engine: Any, context: Any, inputs: Dict[str, torch.Tensor], outputs: Sequence[str],
            stream: Any, empty: Callable[..., torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Bind ``inputs`` (contiguous tensors on the engine's device), allocate outputs with ``empty``
    (shape, dtype) for the current input shapes, and enqueue on ``stream`` (a torch CUDA stream; its
    ``cuda_stream`` handle goes to execute_async_v3).

    The engine reads and writes the tensors on ``stream``, which the caching allocator does not know:
    each is ``record_stream``-ed on it, so its memory is not reused before the engine is done with it.
    """
    for name, tensor in inputs.items():
        if not context.set_input_shape(name, tuple(tensor.shape)):  # False: no profile admits the shape
            raise IrepError("TensorRT rejects input {!r} of shape {} (outside the engine's optimization "
                            "profile?)".format(name, "x".join(str(d) for d in tensor.shape)))
        context.set_tensor_address(name, tensor.data_ptr())
    result = {}
    for name in outputs:
        shape = tuple(int(d) for d in context.get_tensor_shape(name))
        tensor = empty(shape, torch_dtype(trt, engine.get_tensor_dtype(name)))
        context.set_tensor_address(name, tensor.data_ptr())
        result[name] = tensor
    if not context.execute_async_v3(stream.cuda_stream):
        raise IrepError("TensorRT execute_async_v3 failed (see the TensorRT log)")
    for tensor in list(inputs.values()) + list(result.values()):
        tensor.record_stream(stream)
    return result


class TrtRunner:
    """Runs a serialized engine on torch CUDA tensors, any batch inside the engine's profile.

    ``TrtRunner("model.engine")`` reads ``model.engine.json`` first and refuses an engine from another
    TensorRT version or GPU (``check=False`` skips that, at the user's risk).
    """

    def __init__(self, engine: PathLike, check: bool = True) -> None:
        path = Path(engine)
        regular_input(path, "a TensorRT engine")
        if not path.is_file():
            raise IrepError("{}: no such file".format(engine))
        meta = read_meta(engine)
        trt = require_tensorrt()
        gpu_name, capability = require_cuda()
        if check:
            check_compatible(meta, engine, str(trt.__version__), gpu_name, capability)
        self._load(trt, path.read_bytes(), meta, str(engine))

    @classmethod
    def from_bytes(cls, plan: bytes, meta: EngineMeta, source: str = "<engine>") -> "TrtRunner":
        runner = cls.__new__(cls)
        require_cuda()
        runner._load(require_tensorrt(), plan, meta, source)
        return runner

    def _load(self, trt: Any, plan: bytes, meta: EngineMeta, source: str) -> None:
        self.trt, self.meta, self.source = trt, meta, source
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise IrepError("{}: TensorRT cannot deserialize it (corrupt, or built by another version)".format(source))
        self.context = self.engine.create_execution_context()
        self.inputs, self.outputs = io_names(trt, self.engine)
        if len(self.inputs) != 1 or len(self.outputs) != 1:
            raise IrepError("{}: expected one input and one output tensor".format(source))
        self.input_dtype = torch_dtype(trt, self.engine.get_tensor_dtype(self.inputs[0]))
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device)

    def batch_range(self) -> Tuple[int, int]:
        return int(self.meta.min_shape[0]), int(self.meta.max_shape[0])

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Enqueue on the runner's stream and return the output without synchronising the host."""
        low, high = self.batch_range()
        if not low <= x.shape[0] <= high:
            raise IrepError("{}: batch {} is outside the engine's profile {}-{}; rebuild with --min-batch/"
                            "--max-batch".format(self.source, x.shape[0], low, high))
        x = x.to(self.device, self.input_dtype).contiguous()
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)  # the input is ready on the caller's stream
        # Input and output live in the caller's stream pool; execute records them on the runner's stream.
        out = execute(self.trt, self.engine, self.context, {self.inputs[0]: x}, self.outputs, self.stream,
                      lambda shape, dtype: torch.empty(shape, dtype=dtype, device=self.device))
        caller.wait_stream(self.stream)  # the caller sees the output only after the engine wrote it
        return out[self.outputs[0]]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.infer(x)
        self.stream.synchronize()
        return out
