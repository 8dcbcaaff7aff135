"""A trtexec-like latency harness for torch (eager, CUDA graphs), onnxruntime and TensorRT.

Each measurement warms up for a time (default 200 ms), then runs for ``duration_s`` and at least
``min_iters`` iterations, timing every iteration on the host (perf_counter around the call and a
synchronisation) and, on a GPU, with CUDA events on the stream (GPU compute time, without host
overhead). Statistics: min/mean/median/p90/p95/p99, coefficient of variation (a warning above
``cv_warn``), throughput = batch / mean host latency. ``--compare`` benches the multi-branch, the
fused and the plain backbone of the same shape in one run and reports latency ratios of medians
(for a model spec, plain is the user's own network with its BN folded: the same spec without branches).
``int8`` adds ``fused-int8``: the fused model's ONNX quantized to QDQ INT8 on real calibration images
(onnxruntime only), and the ratio fused-int8/fused. A QDQ ``.onnx`` file is the variant ``onnx-int8``,
an INT8 engine ``engine-int8``.

The run is split into rounds (default 5) that each run every job, so drift of a shared machine lands
on all of them alike; with 2+ rounds every ratio is also taken per round and its spread, (max - min) /
median of the per-round ratios, flags it as untrustworthy above ``spread_warn`` (default 10 %).
Every backend gets its own placement of the model (torch/cudagraph run a copy on the GPU); the
onnxruntime label names the providers the session really runs (``session.get_providers()``).
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .._io import atomic_write, check_writable
from ..checkpoint import load_checkpoint, multi_branch_model
from ..compare import ONNX_EXPORT
from ..errors import IrepError, NotAvailableError, UsageError, first_line, raise_if_interrupted
from ..progress import bar
from ..reparam import fuse_model
from ..resources import require_input_memory, size_flags
from . import devices

PathLike = Union[str, "os.PathLike[str]"]
BACKENDS = ("torch", "cudagraph", "ort", "trt")
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
# Rounds by default: one window per model is at the mercy of a shared machine (a single 3-second
# window once gave fused/plain 0.548 for two networks of identical shape).
DEFAULT_ROUNDS = 5
# A ratio whose per-round values spread wider than this (max - min over the median) is flagged.
SPREAD_WARN = 0.10


# -- statistics --------------------------------------------------------------------------------------
@dataclass
class Stats:
    iterations: int
    min: float
    mean: float
    median: float
    p90: float
    p95: float
    p99: float
    std: float
    cv: float  # std / mean

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> "Stats":
        if not samples_ms:
            raise ValueError("no samples")
        a = np.asarray(samples_ms, dtype=np.float64)
        mean = float(a.mean())
        std = float(a.std(ddof=1)) if a.size > 1 else 0.0
        p90, p95, p99 = (float(v) for v in np.percentile(a, [90, 95, 99]))
        return cls(int(a.size), float(a.min()), mean, float(np.median(a)), p90, p95, p99, std,
                   std / mean if mean > 0 else 0.0)


@dataclass
class Result:
    variant: str   # fused | multi-branch | plain | fused-int8 | onnx | onnx-int8 | engine | engine-int8
    backend: str   # torch | cudagraph | ort:<providers> | trt
    batch: int
    host: Stats
    gpu: Optional[Stats]
    throughput: float  # samples per second (batch / mean host latency)
    warnings: List[str] = field(default_factory=list)
    round_medians: List[float] = field(default_factory=list)  # host median of each round, in run order


def measure_samples(step: Callable[[], Any], sync: Callable[[], None], warmup_ms: float = 200.0,
                    duration_s: float = 3.0, min_iters: int = 10, cuda_events: bool = False
                    ) -> Tuple[List[float], List[float]]:
    """Time ``step`` (followed by ``sync``): (host latencies, GPU compute times or []), in ms."""
    end = time.perf_counter() + warmup_ms / 1000.0
    step()
    sync()
    while time.perf_counter() < end:
        raise_if_interrupted()
        step()
        sync()
    host: List[float] = []
    events: List[Tuple[Any, Any]] = []
    stop = time.perf_counter() + duration_s
    while len(host) < min_iters or time.perf_counter() < stop:
        raise_if_interrupted()
        if cuda_events:
            begin_ev, end_ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            begin_ev.record()
            step()
            end_ev.record()
        else:
            t0 = time.perf_counter()
            step()
        sync()
        host.append((time.perf_counter() - t0) * 1000.0)
        if cuda_events:
            events.append((begin_ev, end_ev))
    return host, [b.elapsed_time(e) for b, e in events]


def measure(step: Callable[[], Any], sync: Callable[[], None], warmup_ms: float = 200.0,
            duration_s: float = 3.0, min_iters: int = 10, cuda_events: bool = False) -> Tuple[Stats, Optional[Stats]]:
    """:func:`measure_samples` summarised: (host latency stats, GPU compute stats or None)."""
    host, gpu = measure_samples(step, sync, warmup_ms, duration_s, min_iters, cuda_events)
    return Stats.of(host), (Stats.of(gpu) if gpu else None)


def harness_overhead_ms(samples: int = 2000) -> float:
    """Median host cost of one harness iteration around a no-op (timer reads and loop)."""
    _, _ = measure(lambda: None, lambda: None, warmup_ms=0, duration_s=0, min_iters=10)
    host, _ = measure(lambda: None, lambda: None, warmup_ms=0, duration_s=0, min_iters=samples)
    return host.median


# -- backends: each returns (step, sync, uses CUDA events) for one batch ------------------------------
Runner = Tuple[Callable[[], Any], Callable[[], None], bool]


def _noop() -> None:
    return None


def placed(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` on ``device`` in eval mode without touching the caller's module: ``nn.Module.to``
    moves in place, and the variant's module is shared by every backend (``ort`` exports it on the
    CPU after ``torch`` ran it on the GPU). On its own device and already in eval mode it is shared."""
    tensors = list(model.parameters()) + list(model.buffers())
    here = tensors[0].device if tensors else torch.device("cpu")
    if here == device and not model.training:
        return model
    return copy.deepcopy(model).to(device).eval()


def torch_runner(model: nn.Module, shape: Sequence[int], device: Union[str, torch.device],
                 graphs: bool = False) -> Runner:
    device = torch.device(device)
    cuda = device.type == "cuda"
    model = placed(model, device)
    x = torch.randn(*shape, device=device)
    if not cuda:
        def step() -> Any:
            with torch.inference_mode():
                return model(x)
        return step, _noop, False
    sync = torch.cuda.synchronize
    if not graphs:
        def step_gpu() -> Any:
            with torch.inference_mode():
                return model(x)
        return step_gpu, sync, True
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):  # warm-up on a side stream before capture (cuDNN autotuning, allocations)
            model(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = model(x)
    # a graph replays raw addresses: the model, its input and its output must outlive it
    captured = (model, x, out)

    def replay() -> Any:
        graph.replay()
        return captured[2]
    return replay, sync, True


def ort_runner(onnx_model: Union[str, bytes], shape: Sequence[int], providers: Optional[Sequence[str]],
               threads: Optional[int], source: str) -> Tuple[Runner, str, List[str]]:
    """(runner, label naming the providers that really run, warnings) for an onnxruntime session."""
    from ..engines import ort as ort_helpers

    session = ort_helpers.make_session(onnx_model, providers=providers, threads=threads, source=source)
    return session_runner(session, shape, ort_helpers.resolve_providers(providers), source)


def session_runner(session: Any, shape: Sequence[int], requested: Sequence[str],
                   source: str) -> Tuple[Runner, str, List[str]]:
    """Time an existing session; the label and warnings come from ``session.get_providers()``, since
    onnxruntime falls back to the CPU silently when a GPU provider cannot load (CUDA/cuDNN libraries)."""
    from ..engines import ort as ort_helpers

    running, missing = ort_helpers.providers_in_use(session, requested)
    warnings_ = ["{}: onnxruntime was asked for {} but runs on {}: the provider failed to load (check the CUDA/"
                 "cuDNN libraries onnxruntime needs); these are {} timings".format(
                     source, ", ".join(missing), ", ".join(running), running[0].replace("ExecutionProvider", ""))
                 ] if missing else []
    shown = [p for p in running if p in requested] or running
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal(tuple(shape)).astype(np.float32)
    label = "ort:" + ",".join(p.replace("ExecutionProvider", "") for p in shown)
    return ((lambda: session.run(None, {name: x})), _noop, False), label, warnings_


def trt_runner(engine: PathLike, shape: Sequence[int]) -> Runner:
    from ..engines.tensorrt import TrtRunner

    runner = TrtRunner(engine)
    low, high = runner.batch_range()
    if not low <= shape[0] <= high:
        raise IrepError("{}: batch {} is outside the engine's profile {}-{}".format(engine, shape[0], low, high))
    x = torch.randn(*shape, device=runner.device)
    return (lambda: runner.infer(x)), torch.cuda.synchronize, True


# -- targets -----------------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str
    module: Optional[nn.Module] = None  # checkpoints
    path: Optional[str] = None          # onnx files and engines
    calib: Optional[np.ndarray] = None  # INT8: the module's ONNX is quantized on these images (ort only)


@dataclass
class BenchReport:
    model: str
    device: Dict[str, Any]
    environment: Dict[str, Any]
    config: Dict[str, Any]
    results: List[Result]
    ratios: List[Dict[str, Any]]
    harness_overhead_ms: float
    warnings: List[str]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"


def _kind(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in ENGINE_SUFFIXES:
        return "engine"
    return "checkpoint"


def _variants(path: str, arch: Optional[PathLike], compare: bool, network: Union[str, nn.Module, None] = None,
              trust_pickle: bool = False) -> Tuple[List[Variant], Dict[str, Any], List[str]]:
    """Models to bench, the input description (channels, size) and notes."""
    notes: List[str] = []
    kind = _kind(path)
    if kind != "checkpoint":
        if compare:
            raise IrepError("{}: --compare needs a checkpoint (deploy or multi-branch), not an {} file".format(
                path, kind))
        if arch is not None:
            raise IrepError("{}: --arch applies to multi-branch checkpoints only".format(path))
        if network is not None:
            raise IrepError("{}: --model names the network of a checkpoint; an {} file holds its own".format(
                path, kind))
        return [Variant(kind + ("-int8" if _is_int8_file(path, kind) else ""), path=path)], {}, notes
    checkpoint = load_checkpoint(path, trust_pickle=trust_pickle)
    h = checkpoint.header
    shape = {"in_channels": h["in_channels"], "input_size": h["input_size"]}
    if checkpoint.kind == "deploy" and arch is not None:
        raise IrepError("{}: is already fused (a deploy checkpoint); drop --arch".format(path))
    if not compare:
        if checkpoint.kind == "deploy":
            return [Variant("fused", checkpoint.build(network).eval())], shape, notes
        return [Variant("multi-branch", multi_branch_model(checkpoint, arch, network).eval())], shape, notes
    if checkpoint.kind == "deploy":
        fused = checkpoint.build(network).eval()
        # same structure as the trained network; the weights do not change the latency
        multi = checkpoint.network(network, checkpoint.arch).eval()
        notes.append("multi-branch variant rebuilt from the deploy checkpoint's code with fresh weights")
    else:
        multi = multi_branch_model(checkpoint, arch, network).eval()
        # the model just built, not a second load of the checkpoint; unchecked: a latency needs no
        # equivalence (`fuse` verifies), and the bench's own memory check of the input comes later
        fused = fuse_model(multi, check=False)
    # the same network without branches (a spec: the user's own network with BN folded)
    plain = fuse_model(checkpoint.network(network).eval(), check=False)
    return [Variant("multi-branch", multi), Variant("fused", fused), Variant("plain", plain)], shape, notes


def _is_int8_file(path: str, kind: str) -> bool:
    """An ONNX with quantize/dequantize nodes, or an engine whose sidecar says int8."""
    if kind == "engine":
        from ..engines.tensorrt import read_meta
        return read_meta(path).precision == "int8"
    from ..engines.int8 import is_quantized
    from ..engines.onnx import load_onnx
    return is_quantized(load_onnx(path, one_output=False))  # onnxruntime times every output


def _add_int8(path: str, variants: List[Variant], shape_info: Dict[str, Any], input_size: Optional[int],
              calib: Optional[str], data_root: Optional[str], calib_size: int, backends: Sequence[str]) -> None:
    """Append fused-int8 after the fused variant: its ONNX is quantized on real ``calib`` images."""
    from ..engines.int8 import calibration_images

    fused = [v for v in variants if v.name == "fused"]
    if not fused:
        raise IrepError("{}: --int8 quantizes the fused model: give a deploy checkpoint, or --compare".format(path))
    if calib is None:
        raise UsageError("--int8 needs --calib DATASET: the fused model is calibrated on real images")
    if "ort" not in backends:
        raise UsageError("--int8 variants run on onnxruntime: add ort to --backend")
    size = input_size or shape_info["input_size"]
    images = calibration_images(calib, (shape_info["in_channels"], size, size), calib_size, data_root, source=path)
    variants.insert(variants.index(fused[0]) + 1, Variant("fused-int8", fused[0].module, calib=images))


def _resolve_backends(requested: Optional[Sequence[str]], kind: str, cuda: bool, asked_cpu: bool = False) -> List[str]:
    """The backends to run; ``cuda``: a GPU is used, ``asked_cpu``: because ``--device cpu`` said so (a
    GPU backend is then a contradiction of flags, 2, not a machine without a GPU, 4)."""
    if not requested:
        if kind == "onnx":
            return ["ort"]
        if kind == "engine":
            return ["trt"]
        return ["torch", "cudagraph", "ort"] if cuda else ["torch", "ort"]
    bad = [b for b in requested if b not in BACKENDS]
    if bad:
        raise UsageError("unknown backend {!r} (choose from {})".format(bad[0], ", ".join(BACKENDS)))
    allowed = {"onnx": {"ort"}, "engine": {"trt"}, "checkpoint": {"torch", "cudagraph", "ort"}}[kind]
    for b in requested:
        if b not in allowed:
            hint = " (build an engine with `irep-deploy build-trt` and bench that)" if b == "trt" else ""
            raise IrepError("backend {} cannot run a{} {}{}".format(
                b, "n" if kind in ("onnx", "engine") else "", kind, hint))
        if b in ("cudagraph", "trt") and not cuda:
            if asked_cpu:
                raise UsageError("backend {} needs a CUDA GPU; drop --device cpu".format(b))
            raise NotAvailableError("backend {} needs a CUDA GPU, and none is visible to torch here".format(b))
    return list(dict.fromkeys(requested))


def bench(model: PathLike, device: str = "auto", backends: Optional[Sequence[str]] = None,
          batches: Sequence[int] = (1,), warmup_ms: float = 200.0, duration_s: float = 3.0, min_iters: int = 10,
          input_size: Optional[int] = None, arch: Optional[PathLike] = None, compare: bool = False,
          force: bool = False, providers: Optional[Sequence[str]] = None, threads: Optional[int] = None,
          cv_warn: float = 0.10, opset: int = 17, simplify: str = "auto", rounds: int = DEFAULT_ROUNDS,
          spread_warn: float = SPREAD_WARN, json_out: Optional[PathLike] = None,
          network: Union[str, nn.Module, None] = None, int8: bool = False, calib: Optional[str] = None,
          data_root: Optional[str] = None, calib_size: int = 512, trust_pickle: bool = False,
          progress: bool = True) -> BenchReport:
    """Benchmark a checkpoint, an ONNX file or a TensorRT engine; see the module docstring.

    ``network`` names the network of a checkpoint that is not built in (a model spec or the user's
    module; :meth:`~irep_deploy.checkpoint.Checkpoint.build`). ``trust_pickle``: read an old
    pickle-format checkpoint on torch < 2.10 too.

    ``device`` is a profile name (:data:`devices.PROFILES`); a torch device string (``cuda``,
    ``cuda:0``) is mapped by :func:`devices.bench_profile` first.

    ``int8`` (checkpoints) adds ``fused-int8``, the fused model quantized to QDQ INT8 by onnxruntime on
    ``calib_size`` real training images of the dataset ``calib`` (after its ``eval`` preprocessing).
    ``progress``: bars on stderr while the models are prepared (exported, quantized) and timed."""
    path = str(model)
    if json_out is not None:
        check_writable(json_out, inputs=(model, arch))
    if not Path(path).exists():
        raise IrepError("{}: no such file".format(path))
    if not batches or min(batches) < 1:
        raise IrepError("batch sizes must be at least 1, got {}".format(list(batches)))
    if warmup_ms < 0 or duration_s < 0 or min_iters < 1 or rounds < 1:
        raise IrepError("warm-up and duration must be >= 0, min iterations and rounds >= 1")
    device = devices.bench_profile(device)
    info = devices.resolve(device, force)
    cuda = info.cuda and device != "cpu"
    kind = _kind(path)
    chosen = _resolve_backends(backends, kind, cuda, asked_cpu=device == "cpu")
    ort_providers: List[str] = []
    if "ort" in chosen:
        from ..engines import ort as ort_helpers
        ort_helpers.require_onnxruntime()
        ort_providers = ort_helpers.resolve_providers(
            providers or (["cuda"] if cuda and "CUDAExecutionProvider" in ort_helpers.available_providers()
                          else ["cpu"]))
    if threads:
        torch.set_num_threads(int(threads))
    if not int8 and calib is not None:
        raise UsageError("--calib applies to --int8 only")
    if int8 and kind != "checkpoint":
        raise IrepError("{}: --int8 quantizes a checkpoint's fused model; an {} file is benched as it is "
                        "(a QDQ ONNX is labelled onnx-int8)".format(path, kind))
    variants, shape_info, notes = _variants(path, arch, compare, network, trust_pickle)
    if int8:
        _add_int8(path, variants, shape_info, input_size, calib, data_root, calib_size, chosen)
        notes.append("fused-int8: the fused model's ONNX quantized to QDQ INT8 (symmetric, per-channel weights) "
                     "by onnxruntime on {} {} training images; onnxruntime only".format(calib_size, calib))
    jobs, job_notes = build_jobs(variants, chosen, batches, shape_info, input_size,
                                 torch.device("cuda" if cuda else "cpu"), ort_providers, threads, opset, simplify,
                                 source=path, progress=progress)
    samples = run_rounds(jobs, rounds, warmup_ms, duration_s, min_iters, source=path, progress=progress)
    results = summarise(jobs, samples, cv_warn)
    table = ratios(results, spread_warn)
    report = BenchReport(
        path, {"requested": device, "kind": info.kind if cuda else "cpu",
               "name": info.name if cuda else devices.cpu_model(), "jetson": info.jetson},
        devices.environment(info),
        {"backends": chosen, "batches": list(batches), "warmup_ms": warmup_ms, "duration_s": duration_s,
         "min_iters": min_iters, "input_size": input_size or shape_info.get("input_size"), "compare": compare,
         "threads": threads, "cv_warn": cv_warn, "opset": opset, "simplify": simplify, "rounds": rounds,
         "spread_warn": spread_warn, "int8": int8, "calib": calib, "calib_size": calib_size if int8 else None},
        results, table, harness_overhead_ms(),
        list(info.notes) + notes + job_notes + [w for r in results for w in r.warnings] + ratio_warnings(table))
    if json_out is not None:
        with atomic_write(json_out, "w") as handle:
            handle.write(report.to_json())
    return report


def bench_onnx_files(files: Sequence[Tuple[str, PathLike]], batches: Sequence[int] = (1,),
                     warmup_ms: float = 200.0, duration_s: float = 3.0, min_iters: int = 10,
                     threads: Optional[int] = None, cv_warn: float = 0.10, rounds: int = DEFAULT_ROUNDS,
                     spread_warn: float = SPREAD_WARN, json_out: Optional[PathLike] = None,
                     progress: bool = True) -> BenchReport:
    """Several ONNX files, (variant name, path) each, on onnxruntime's CPU provider in one run.

    Their jobs are interleaved round by round as in :func:`bench`, so that e.g. an FP32 model
    (``onnx``) and its INT8 copy (``onnx-int8``) share the machine's drift and get a ratio with its
    spread over rounds; ``bench`` itself takes one file."""
    from ..engines import ort as ort_helpers

    if not files:
        raise IrepError("no ONNX files to bench")
    for _, path in files:
        if _kind(str(path)) != "onnx" or not Path(path).is_file():
            raise IrepError("{}: not an ONNX file".format(path))
    if json_out is not None:
        check_writable(json_out, inputs=tuple(p for _, p in files))
    if not batches or min(batches) < 1:
        raise IrepError("batch sizes must be at least 1, got {}".format(list(batches)))
    if warmup_ms < 0 or duration_s < 0 or min_iters < 1 or rounds < 1:
        raise IrepError("warm-up and duration must be >= 0, min iterations and rounds >= 1")
    ort_helpers.require_onnxruntime()
    info = devices.resolve("cpu")
    variants = [Variant(name, path=str(path)) for name, path in files]
    source = ", ".join(str(p) for _, p in files)
    jobs, notes = build_jobs(variants, ["ort"], batches, {}, None, torch.device("cpu"),
                             ort_helpers.resolve_providers(["cpu"]), threads, source=source, progress=progress)
    samples = run_rounds(jobs, rounds, warmup_ms, duration_s, min_iters, source=source, progress=progress)
    results = summarise(jobs, samples, cv_warn)
    table = ratios(results, spread_warn)
    report = BenchReport(
        source, {"requested": "cpu", "kind": "cpu", "name": devices.cpu_model(), "jetson": info.jetson},
        devices.environment(info),
        {"backends": ["ort"], "batches": list(batches), "warmup_ms": warmup_ms, "duration_s": duration_s,
         "min_iters": min_iters, "files": {name: str(p) for name, p in files}, "threads": threads,
         "cv_warn": cv_warn, "rounds": rounds, "spread_warn": spread_warn},
        results, table, harness_overhead_ms(),
        list(info.notes) + notes + [w for r in results for w in r.warnings] + ratio_warnings(table))
    if json_out is not None:
        with atomic_write(json_out, "w") as handle:
            handle.write(report.to_json())
    return report


@dataclass
class Job:
    variant: str
    backend: str  # the label results carry: torch | cudagraph | ort:<providers that run> | trt
    batch: int
    runner: Runner


def _failed(source: str, label: str, batch: int, exc: Exception) -> IrepError:
    """A backend's RuntimeError (a size the network cannot take, CUDA out of memory, a capture that
    fails) as one line naming the model, backend and batch."""
    return IrepError("{}: {} failed at batch {}: {}".format(source, label, batch, first_line(exc, 160)))


def build_jobs(variants: Sequence[Variant], backends: Sequence[str], batches: Sequence[int],
               shape_info: Dict[str, Any], input_size: Optional[int], device: torch.device,
               ort_providers: Sequence[str], threads: Optional[int] = None, opset: int = 17,
               simplify: str = "auto", source: str = "<model>", progress: bool = False) -> Tuple[List[Job], List[str]]:
    """One job per (variant, backend, batch), each with its own placement of the model: ``torch`` and
    ``cudagraph`` run a copy on ``device``; ``ort`` exports the variant's module as it is (CPU).
    Returns (jobs, notes). ``progress``: a bar per job prepared (an ONNX export and check, an INT8
    calibration, a CUDA graph capture can each take seconds)."""
    jobs: List[Job] = []
    notes: List[str] = []
    planned = sum(len(batches) * sum(1 for b in backends if v.calib is None or b == "ort") for v in variants)
    with bar(total=planned, desc="bench: preparing", enabled=progress, unit="job") as prepared:
        for variant in variants:
            on_device: Optional[nn.Module] = None  # one copy per variant, shared by its torch/cudagraph jobs
            for backend in backends:
                if variant.calib is not None and backend != "ort":
                    continue  # a QDQ graph: only onnxruntime runs it here
                onnx_bytes: Optional[bytes] = None
                for batch in batches:
                    shape = _input_shape(variant, shape_info, input_size, batch)
                    _require_memory(variant, shape, shape_info, input_size, source)
                    label = backend
                    try:
                        if backend in ("torch", "cudagraph"):
                            if on_device is None:
                                on_device = placed(variant.module, device)
                            runner = torch_runner(on_device, shape, device, graphs=backend == "cudagraph")
                        elif backend == "ort":
                            if variant.module is not None and onnx_bytes is None:
                                onnx_bytes = _to_onnx(variant, shape, opset, simplify)
                                if variant.calib is not None:
                                    from ..engines.int8 import quantize_qdq
                                    onnx_bytes = quantize_qdq(onnx_bytes, variant.calib, source=variant.name)
                            runner, label, warned = ort_runner(
                                onnx_bytes if onnx_bytes is not None else variant.path, shape, ort_providers,
                                threads, variant.path or variant.name)
                            notes.extend(w for w in warned if w not in notes)
                        else:
                            runner = trt_runner(variant.path, shape)
                    except RuntimeError as exc:
                        raise _failed(source, label, batch, exc) from exc
                    jobs.append(Job(variant.name, label, batch, runner))
                    prepared.update()
    gpu_ort = sorted({j.backend for j in jobs if j.backend.startswith("ort:") and j.backend != "ort:CPU"})
    if gpu_ort:
        notes.append("{} timings include the host<->device copies of input and output (numpy in and out); "
                     "torch, cudagraph and trt timings keep the data on the GPU".format(", ".join(gpu_ort)))
    return jobs, notes


Samples = Tuple[List[float], List[float]]  # (host ms, GPU ms) of one job in one round


def run_rounds(jobs: Sequence[Job], rounds: int = DEFAULT_ROUNDS, warmup_ms: float = 200.0,
               duration_s: float = 3.0, min_iters: int = 10, source: str = "<model>",
               on_round: Optional[Callable[[int], None]] = None, progress: bool = False) -> List[List[Samples]]:
    """Run every job once per round, all jobs inside each round (samples[job][round]).

    Rounds interleave the jobs, so that slow drift of a shared machine (other processes, thermal
    state) lands on all of them alike instead of on whichever ran last; the per-round numbers let
    :func:`ratios` say how much a ratio moved between rounds. ``on_round(r)`` is called before round r.
    ``progress``: a bar counting the measurements (rounds x jobs).
    """
    samples: List[List[Samples]] = [[] for _ in jobs]
    per_round = duration_s / rounds
    failures: Tuple[type, ...] = (RuntimeError,)
    if any(job.backend.startswith("ort:") for job in jobs):
        from ..engines import ort as ort_helpers
        failures += ort_helpers.run_errors()
    with bar(total=rounds * len(jobs), desc="bench: timing", enabled=progress, unit="run") as timed:
        for r in range(rounds):
            if on_round is not None:
                on_round(r)
            timed.set_postfix_str("round {}/{}".format(r + 1, rounds), refresh=False)
            for i, job in enumerate(jobs):
                step, sync, events = job.runner
                try:
                    samples[i].append(measure_samples(step, sync, warmup_ms if r == 0 else min(warmup_ms, 50.0),
                                                      per_round, max(1, -(-min_iters // rounds)), events))
                except failures as exc:  # e.g. an input size the network cannot take, out of memory
                    raise _failed(source, job.backend, job.batch, exc) from exc
                timed.update()
    return samples


def summarise(jobs: Sequence[Job], samples: Sequence[Sequence[Samples]], cv_warn: float = 0.10) -> List[Result]:
    """Statistics over all rounds of each job, plus its per-round host medians."""
    results: List[Result] = []
    for job, per_round in zip(jobs, samples):
        host = [v for h, _ in per_round for v in h]
        gpu = [v for _, g in per_round for v in g]
        host_stats = Stats.of(host)
        res = Result(job.variant, job.backend, job.batch, host_stats, Stats.of(gpu) if gpu else None,
                     job.batch * 1000.0 / host_stats.mean, round_medians=[float(np.median(h)) for h, _ in per_round])
        if host_stats.cv > cv_warn:
            res.warnings.append("high variation: CV {:.1%} > {:.0%} ({} {} batch {}); close other work, lock "
                                "clocks, or run longer".format(host_stats.cv, cv_warn, job.variant, job.backend,
                                                               job.batch))
        results.append(res)
    return results


def _require_memory(variant: Variant, shape: Tuple[int, ...], shape_info: Dict[str, Any], input_size: Optional[int],
                    source: str) -> None:
    """Refuse a bench input too large for this machine before it is allocated (see ``resources``)."""
    header = shape_info.get("input_size") if variant.path is None and not input_size else None
    require_input_memory(variant.module, shape[0], shape[1], shape[-1], header, source, "the bench input",
                         size_flags("--batch", shape[0], input_size))


def _fixed_size(path: str, spatial: Sequence[Any], input_size: Optional[int]) -> None:
    """A file whose spatial input is fixed cannot take another --input-size: refused, not ignored."""
    fixed = [int(d) for d in spatial if isinstance(d, int) and d > 0]
    if input_size is not None and fixed and any(d != input_size for d in fixed):
        raise UsageError("--input-size {}: {} has a fixed input of {}; drop --input-size or export the model at "
                         "that size".format(input_size, path, " x ".join(str(d) for d in spatial)))


def _input_shape(variant: Variant, shape_info: Dict[str, Any], input_size: Optional[int], batch: int) -> Tuple[int, ...]:
    if variant.path is None:
        size = input_size or shape_info["input_size"]
        return (batch, shape_info["in_channels"], size, size)
    if _kind(variant.path) == "engine":
        from ..engines.tensorrt import read_meta
        meta = read_meta(variant.path)
        _fixed_size(variant.path, meta.opt_shape[2:], input_size)
        return (batch,) + tuple(int(d) for d in meta.opt_shape[1:])
    from ..engines.onnx import input_spec, load_onnx
    _, dims = input_spec(load_onnx(variant.path, one_output=False))
    if isinstance(dims[0], int) and dims[0] > 0 and dims[0] != batch:
        raise UsageError("--batch {}: {} has a fixed batch of {}; bench that batch or export with a dynamic "
                         "batch".format(batch, variant.path, dims[0]))
    _fixed_size(variant.path, dims[2:], input_size)
    rest = [d if isinstance(d, int) and d > 0 else input_size for d in dims[1:]]
    if any(d is None for d in rest):
        raise IrepError("{}: has a dynamic spatial size; pass --input-size".format(variant.path))
    return (batch,) + tuple(int(d) for d in rest)


def _to_onnx(variant: Variant, shape: Sequence[int], opset: int, simplify: str) -> bytes:
    """Every variant goes through the same export + simplification, so the comparison is fair."""
    from ..engines import onnx as onnx_engine

    proto = onnx_engine.export_module(variant.module, (1,) + tuple(shape[1:]), opset, dynamic_batch=True)
    proto, _ = onnx_engine.simplify_model(proto, simplify)
    data = proto.SerializeToString()
    onnx_engine.verify(variant.module, data, (1,) + tuple(shape[1:]), [1], tolerance=ONNX_EXPORT.max_rel_error,
                       source="{} (exported for bench)".format(variant.name))
    return data


RATIOS = (("fused_over_plain", "fused", "plain", "fused/plain"),
          ("multi_branch_over_fused", "multi-branch", "fused", "multi-branch/fused"),
          ("int8_over_fused", "fused-int8", "fused", "fused-int8/fused"),
          ("onnx_int8_over_onnx", "onnx-int8", "onnx", "onnx-int8/onnx"))


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: how far apart the per-round values of a ratio are, relative to its size."""
    a = np.asarray(values, dtype=np.float64)
    return float((a.max() - a.min()) / np.median(a))


def ratios(results: Sequence[Result], spread_warn: float = SPREAD_WARN) -> List[Dict[str, Any]]:
    """Median-latency ratios fused/plain and multi-branch/fused per backend and batch (same run).

    The ratio is that of the medians over all rounds; with two or more rounds each row also has the
    ratio of every round (``<name>_rounds``, from the per-round medians), their :func:`spread`
    (``<name>_spread``) and ``untrusted``: the names whose spread exceeds ``spread_warn``.
    """
    table: Dict[Tuple[str, int], Dict[str, Result]] = {}
    for r in results:
        table.setdefault((r.backend, r.batch), {})[r.variant] = r
    out = []
    for (backend, batch), by in table.items():
        row: Dict[str, Any] = {"backend": backend, "batch": batch}
        untrusted = []
        for name, top, bottom, _ in RATIOS:
            if top not in by or bottom not in by:
                continue
            row[name] = by[top].host.median / by[bottom].host.median
            per_round = [a / b for a, b in zip(by[top].round_medians, by[bottom].round_medians)]
            if len(per_round) >= 2:
                row[name + "_rounds"] = per_round
                row[name + "_spread"] = spread(per_round)
                if row[name + "_spread"] > spread_warn:
                    untrusted.append(name)
        if len(row) > 2:
            row["untrusted"] = untrusted
            out.append(row)
    return out


def ratio_warnings(table: Sequence[Dict[str, Any]]) -> List[str]:
    out = []
    for q in table:
        for name, _, _, shown in RATIOS:
            if name in q.get("untrusted", []):
                rounds = q[name + "_rounds"]
                out.append("{} ({} batch {}) moved between rounds: {:.3f}-{:.3f}, spread {:.0%} of the median is "
                           "too wide to trust; rerun on an idle machine, longer or with more --rounds".format(
                               shown, q["backend"], q["batch"], min(rounds), max(rounds), q[name + "_spread"]))
    return out


def format_table(report: BenchReport) -> str:
    """The terminal table: one row per (variant, backend, batch), then the ratios."""
    head = ("variant", "backend", "batch", "median ms", "mean", "p90", "p95", "p99", "min", "GPU ms",
            "CV", "iters", "samples/s")
    rows = [head]
    for r in report.results:
        h = r.host
        rows.append((r.variant, r.backend, str(r.batch), "{:.3f}".format(h.median), "{:.3f}".format(h.mean),
                     "{:.3f}".format(h.p90), "{:.3f}".format(h.p95), "{:.3f}".format(h.p99), "{:.3f}".format(h.min),
                     "{:.3f}".format(r.gpu.median) if r.gpu else "-", "{:.1%}".format(h.cv), str(h.iterations),
                     "{:.1f}".format(r.throughput)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    for q in report.ratios:
        parts = []
        for name, _, _, shown in RATIOS:
            if name in q:
                text = "{} {:.3f}".format(shown, q[name])
                if name + "_rounds" in q:
                    text += " (rounds {:.3f}-{:.3f}, spread {:.1%}{})".format(
                        min(q[name + "_rounds"]), max(q[name + "_rounds"]), q[name + "_spread"],
                        ": UNTRUSTED" if name in q["untrusted"] else "")
                parts.append(text)
        lines.append("ratio ({} batch {}): {}".format(q["backend"], q["batch"], ", ".join(parts)))
    return "\n".join(lines)
