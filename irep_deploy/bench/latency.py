"""A trtexec-like latency harness for torch (eager, CUDA graphs), onnxruntime and TensorRT.

Each measurement warms up for a time (default 200 ms), then runs for ``duration_s`` and at least
``min_iters`` iterations, timing every iteration on the host (perf_counter around the call and a
synchronisation) and, on a GPU, with CUDA events on the stream (GPU compute time, without host
overhead). Statistics: min/mean/median/p90/p95/p99, coefficient of variation (a warning above
``cv_warn``), throughput = batch / mean host latency. ``--compare`` benches the multi-branch, the
fused and the plain backbone of the same shape in one run and reports latency ratios of medians.
"""
from __future__ import annotations

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
from ..checkpoint import load_checkpoint
from ..errors import IrepError
from ..models import build_model
from ..reparam import fuse_model
from . import devices

PathLike = Union[str, "os.PathLike[str]"]
BACKENDS = ("torch", "cudagraph", "ort", "trt")
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


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
    variant: str   # fused | multi-branch | plain | onnx | engine
    backend: str   # torch | cudagraph | ort:<providers> | trt
    batch: int
    host: Stats
    gpu: Optional[Stats]
    throughput: float  # samples per second (batch / mean host latency)
    warnings: List[str] = field(default_factory=list)


def measure_samples(step: Callable[[], Any], sync: Callable[[], None], warmup_ms: float = 200.0,
                    duration_s: float = 3.0, min_iters: int = 10, cuda_events: bool = False
                    ) -> Tuple[List[float], List[float]]:
    """Time ``step`` (followed by ``sync``): (host latencies, GPU compute times or []), in ms."""
    end = time.perf_counter() + warmup_ms / 1000.0
    step()
    sync()
    while time.perf_counter() < end:
        step()
        sync()
    host: List[float] = []
    events: List[Tuple[Any, Any]] = []
    stop = time.perf_counter() + duration_s
    while len(host) < min_iters or time.perf_counter() < stop:
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


def torch_runner(model: nn.Module, shape: Sequence[int], cuda: bool, graphs: bool = False) -> Runner:
    device = torch.device("cuda" if cuda else "cpu")
    model = model.to(device).eval()
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
        model(x)
    return graph.replay, sync, True


def ort_runner(onnx_model: Union[str, bytes], shape: Sequence[int], providers: Optional[Sequence[str]],
               threads: Optional[int], source: str) -> Runner:
    from ..engines import ort as ort_helpers

    session = ort_helpers.make_session(onnx_model, providers=providers, threads=threads, source=source)
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal(tuple(shape)).astype(np.float32)
    return (lambda: session.run(None, {name: x})), _noop, False


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


def _variants(path: str, arch: Optional[PathLike], compare: bool) -> Tuple[List[Variant], Dict[str, Any], List[str]]:
    """Models to bench, the input description (channels, size) and notes."""
    from ..pipeline import multi_branch_model

    notes: List[str] = []
    kind = _kind(path)
    if kind != "checkpoint":
        if compare:
            raise IrepError("{}: --compare needs a checkpoint (deploy or multi-branch), not an {} file".format(
                path, kind))
        if arch is not None:
            raise IrepError("{}: --arch applies to multi-branch checkpoints only".format(path))
        return [Variant(kind, path=path)], {}, notes
    checkpoint = load_checkpoint(path)
    h = checkpoint.header
    shape = {"in_channels": h["in_channels"], "input_size": h["input_size"]}
    build_kw = dict(num_classes=h["num_classes"], width=h["width"], in_channels=h["in_channels"], ops=h["ops"])
    if not compare:
        if checkpoint.kind == "deploy":
            if arch is not None:
                raise IrepError("{}: is already fused (a deploy checkpoint); drop --arch".format(path))
            return [Variant("fused", checkpoint.build().eval())], shape, notes
        return [Variant("multi-branch", multi_branch_model(checkpoint, arch).eval())], shape, notes
    if checkpoint.kind == "deploy":
        if arch is not None:
            raise IrepError("{}: is already fused (a deploy checkpoint); drop --arch".format(path))
        fused = checkpoint.build().eval()
        # same structure as the trained network; the weights do not change the latency
        multi = build_model(h["backbone"], arch=checkpoint.arch, **build_kw).eval()
        notes.append("multi-branch variant rebuilt from the deploy checkpoint's code with fresh weights")
    else:
        multi = multi_branch_model(checkpoint, arch).eval()
        fused = fuse_model(multi)  # the model just built, not a second load of the checkpoint
    plain = fuse_model(build_model(h["backbone"], arch=None, **build_kw).eval())
    return [Variant("multi-branch", multi), Variant("fused", fused), Variant("plain", plain)], shape, notes


def _resolve_backends(requested: Optional[Sequence[str]], kind: str, cuda: bool) -> List[str]:
    if not requested:
        if kind == "onnx":
            return ["ort"]
        if kind == "engine":
            return ["trt"]
        return ["torch", "cudagraph", "ort"] if cuda else ["torch", "ort"]
    bad = [b for b in requested if b not in BACKENDS]
    if bad:
        raise IrepError("unknown backend {!r} (choose from {})".format(bad[0], ", ".join(BACKENDS)))
    allowed = {"onnx": {"ort"}, "engine": {"trt"}, "checkpoint": {"torch", "cudagraph", "ort"}}[kind]
    for b in requested:
        if b not in allowed:
            hint = " (build an engine with `irep-deploy build-trt` and bench that)" if b == "trt" else ""
            raise IrepError("backend {} cannot run a{} {}{}".format(
                b, "n" if kind in ("onnx", "engine") else "", kind, hint))
        if b in ("cudagraph", "trt") and not cuda:
            raise IrepError("backend {} needs a CUDA GPU, and --device resolved to the CPU".format(b))
    return list(dict.fromkeys(requested))


def bench(model: PathLike, device: str = "auto", backends: Optional[Sequence[str]] = None,
          batches: Sequence[int] = (1,), warmup_ms: float = 200.0, duration_s: float = 3.0, min_iters: int = 10,
          input_size: Optional[int] = None, arch: Optional[PathLike] = None, compare: bool = False,
          force: bool = False, providers: Optional[Sequence[str]] = None, threads: Optional[int] = None,
          cv_warn: float = 0.10, opset: int = 17, simplify: str = "auto", rounds: int = 1,
          json_out: Optional[PathLike] = None) -> BenchReport:
    """Benchmark a checkpoint, an ONNX file or a TensorRT engine; see the module docstring."""
    path = str(model)
    if json_out is not None:
        check_writable(json_out, inputs=(model, arch))
    if not Path(path).exists():
        raise IrepError("{}: no such file".format(path))
    if not batches or min(batches) < 1:
        raise IrepError("batch sizes must be at least 1, got {}".format(list(batches)))
    if warmup_ms < 0 or duration_s < 0 or min_iters < 1 or rounds < 1:
        raise IrepError("warm-up and duration must be >= 0, min iterations and rounds >= 1")
    info = devices.resolve(device, force)
    cuda = info.cuda and device != "cpu"
    kind = _kind(path)
    chosen = _resolve_backends(backends, kind, cuda)
    if "ort" in chosen:
        from ..engines import ort as ort_helpers
        ort_helpers.require_onnxruntime()
        ort_providers = ort_helpers.resolve_providers(
            providers or (["cuda"] if cuda and "CUDAExecutionProvider" in ort_helpers.available_providers()
                          else ["cpu"]))
    if threads:
        torch.set_num_threads(int(threads))
    variants, shape_info, notes = _variants(path, arch, compare)
    warnings_: List[str] = list(info.notes) + notes
    jobs: List[Tuple[str, str, int, Runner]] = []
    for variant in variants:
        for backend in chosen:
            onnx_bytes: Optional[bytes] = None
            for batch in batches:
                shape = _input_shape(variant, shape_info, input_size, batch)
                if backend in ("torch", "cudagraph"):
                    runner = torch_runner(variant.module, shape, cuda, graphs=backend == "cudagraph")
                    label = backend
                elif backend == "ort":
                    if variant.module is not None and onnx_bytes is None:
                        onnx_bytes = _to_onnx(variant, shape, opset, simplify)
                    runner = ort_runner(onnx_bytes if onnx_bytes is not None else variant.path, shape,
                                        ort_providers, threads, variant.path or variant.name)
                    label = "ort:" + ",".join(p.replace("ExecutionProvider", "") for p in ort_providers)
                else:
                    runner = trt_runner(variant.path, shape)
                    label = "trt"
                jobs.append((variant.name, label, batch, runner))
    # Rounds interleave the variants, so that slow drift of a shared machine (other processes,
    # thermal state) lands on all of them alike instead of on whichever ran last.
    samples: Dict[int, Tuple[List[float], List[float]]] = {i: ([], []) for i in range(len(jobs))}
    per_round = duration_s / rounds
    for r in range(rounds):
        for i, (name, label, batch, (step, sync, events)) in enumerate(jobs):
            try:
                host, gpu = measure_samples(step, sync, warmup_ms if r == 0 else min(warmup_ms, 50.0),
                                            per_round, max(1, -(-min_iters // rounds)), events)
            except RuntimeError as exc:  # e.g. an input size the network cannot take
                raise IrepError("{}: {} failed at batch {}: {}".format(
                    path, label, batch, (str(exc).splitlines() or ["error"])[0][:160])) from None
            samples[i][0].extend(host)
            samples[i][1].extend(gpu)
    results: List[Result] = []
    for i, (name, label, batch, _) in enumerate(jobs):
        host_stats = Stats.of(samples[i][0])
        res = Result(name, label, batch, host_stats, Stats.of(samples[i][1]) if samples[i][1] else None,
                     batch * 1000.0 / host_stats.mean)
        if host_stats.cv > cv_warn:
            res.warnings.append("high variation: CV {:.1%} > {:.0%} ({} {} batch {}); close other work, lock "
                                "clocks, or run longer".format(host_stats.cv, cv_warn, name, label, batch))
        results.append(res)
    report = BenchReport(
        path, {"requested": device, "kind": info.kind if cuda else "cpu",
               "name": info.name if cuda else devices.cpu_model(), "jetson": info.jetson},
        devices.environment(info),
        {"backends": chosen, "batches": list(batches), "warmup_ms": warmup_ms, "duration_s": duration_s,
         "min_iters": min_iters, "input_size": input_size, "compare": compare, "threads": threads,
         "cv_warn": cv_warn, "opset": opset, "simplify": simplify, "rounds": rounds},
        results, ratios(results), harness_overhead_ms(), warnings_ + [w for r in results for w in r.warnings])
    if json_out is not None:
        with atomic_write(json_out, "w") as handle:
            handle.write(report.to_json())
    return report


def _input_shape(variant: Variant, shape_info: Dict[str, Any], input_size: Optional[int], batch: int) -> Tuple[int, ...]:
    if variant.path is None:
        size = input_size or shape_info["input_size"]
        return (batch, shape_info["in_channels"], size, size)
    if variant.name == "engine":
        from ..engines.tensorrt import read_meta
        meta = read_meta(variant.path)
        return (batch,) + tuple(int(d) for d in meta.opt_shape[1:])
    from ..engines.onnx import io_spec, load_onnx
    _, _, dims = io_spec(load_onnx(variant.path))
    if isinstance(dims[0], int) and dims[0] > 0 and dims[0] != batch:
        raise IrepError("{}: has a fixed batch of {}, cannot bench batch {}".format(variant.path, dims[0], batch))
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
    onnx_engine.verify(variant.module, data, (1,) + tuple(shape[1:]), [1], tolerance=1e-4,
                       source="{} (exported for bench)".format(variant.name))
    return data


def ratios(results: Sequence[Result]) -> List[Dict[str, Any]]:
    """Median-latency ratios fused/plain and multi-branch/fused per backend and batch (same run)."""
    table: Dict[Tuple[str, int], Dict[str, Result]] = {}
    for r in results:
        table.setdefault((r.backend, r.batch), {})[r.variant] = r
    out = []
    for (backend, batch), by in table.items():
        row: Dict[str, Any] = {"backend": backend, "batch": batch}
        if "fused" in by and "plain" in by:
            row["fused_over_plain"] = by["fused"].host.median / by["plain"].host.median
        if "multi-branch" in by and "fused" in by:
            row["multi_branch_over_fused"] = by["multi-branch"].host.median / by["fused"].host.median
        if len(row) > 2:
            out.append(row)
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
        if "fused_over_plain" in q:
            parts.append("fused/plain {:.3f}".format(q["fused_over_plain"]))
        if "multi_branch_over_fused" in q:
            parts.append("multi-branch/fused {:.3f}".format(q["multi_branch_over_fused"]))
        lines.append("ratio ({} batch {}): {}".format(q["backend"], q["batch"], ", ".join(parts)))
    return "\n".join(lines)
