"""What the branches bought: a searched code's training run beside the plain backbone's.

The baseline is the same :class:`~irep_deploy.train.TrainConfig` (recipe, data, seed) with no
architecture code, i.e. the empty code: the backbone's own 3x3 convs, no branches. It trains into
``RUN_DIR/baseline``. The comparison holds both test accuracies, both training times (the
branches' training cost; wall and CPU time, and whether the two runs' wall times compare: see
:mod:`irep_deploy.trust`) and the torch latency of the multi-branch, fused and plain networks
measured in one bench run, each with its spread over the rounds and the UNTRUSTED mark (the fused
network has the plain one's shape, so their latency should match: that is the point of
re-parameterization).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from ._io import write_json
from .bench.devices import bench_profile
from .bench.latency import BenchReport, bench
from .errors import IrepError
from .runs import read_run_state, state_path
from .train import TrainConfig, TrainReport, train
from .trust import marks, shown, time_comparison

PathLike = Union[str, "os.PathLike[str]"]

BASELINE_DIR = "baseline"
BASELINE_FILE = "baseline.json"


def baseline_config(config: TrainConfig) -> TrainConfig:
    """The same recipe and seed without branches (the backbone named, since no code names it)."""
    code = config.code()
    backbone = config.backbone or (code.backbone if code is not None else None)
    return dataclasses.replace(config, arch=None, backbone=backbone)


def train_seconds(report: TrainReport) -> float:
    """Training wall time of a run over all its epochs (a resumed run's earlier epochs included)."""
    return float(sum(r.get("seconds", 0.0) for r in report.history))


def train_cpu_seconds(report: TrainReport) -> Optional[float]:
    """The run's CPU time over the same epochs; None when an epoch recorded none (an earlier version's)."""
    cpu = [r.get("cpu_seconds") for r in report.history]
    return float(sum(cpu)) if cpu and all(isinstance(c, (int, float)) for c in cpu) else None


@dataclass
class ModelRow:
    """One network of the comparison: test top-1, training seconds (wall and CPU), torch latency at
    batch 1 (ms) with its spread over the bench rounds and mark (:mod:`irep_deploy.trust`)."""

    model: str
    test_top1: float
    train_seconds: Optional[float]
    latency_ms: Optional[float]
    train_cpu_seconds: Optional[float] = None
    latency_ms_spread: Optional[float] = None
    latency_ms_untrusted: bool = False


@dataclass
class BaselineComparison:
    rows: List[ModelRow]
    top1_gain: float  # searched fused minus baseline, percentage points (one seed: not an interval)
    train_cost: float  # searched training wall time / baseline training wall time
    test_examples: int
    seed: int
    train_cpu_cost: Optional[float] = None  # the same with CPU times
    train_cost_comparable: Optional[bool] = None  # the runs kept the machine alike busy (None: no CPU times)
    train_cost_note: str = ""  # the ratio in words, "not comparable: ..." where it is not
    cores_busy: Optional[List[float]] = None  # CPU s per wall s of the searched run and of the baseline

    def table(self) -> str:
        lines = ["| model | test top-1 % | training s (wall / CPU) | torch latency, batch 1 (ms) |",
                 "|---|---|---|---|"]
        lines += ["| {} | {:.2f} | {} | {} |".format(
            r.model, r.test_top1, "-" if r.train_seconds is None else "{:.1f} / {}".format(
                r.train_seconds, "-" if r.train_cpu_seconds is None else "{:.1f}".format(r.train_cpu_seconds)),
            shown(dataclasses.asdict(r), "latency_ms")) for r in self.rows]
        return "\n".join(lines)

    def summary(self) -> str:
        return ("searched code vs plain backbone (seed {}, {} test examples): top-1 {:+.2f} points for {}".format(
            self.seed, self.test_examples, self.top1_gain, self.train_cost_note))


def latencies(bench_report: BenchReport, batch: int = 1) -> Dict[str, Dict[str, Any]]:
    """Per variant, the median torch latency (ms) at ``batch`` from a ``bench(..., compare=True)`` run
    with its spread over the rounds and mark: ``{latency_ms, latency_ms_spread, latency_ms_untrusted}``."""
    return {r.variant: dict(latency_ms=r.host.median, **marks("latency_ms", r.round_medians))
            for r in bench_report.results if r.backend == "torch" and r.batch == batch}


def compare(searched: TrainReport, baseline: TrainReport, latency: Optional[Dict[str, Dict[str, Any]]] = None,
            seed: int = 0) -> BaselineComparison:
    latency = latency or {}
    base_s, ours_s = train_seconds(baseline), train_seconds(searched)
    base_cpu, ours_cpu = train_cpu_seconds(baseline), train_cpu_seconds(searched)

    def row(model: str, top1: float, seconds: Optional[float], cpu: Optional[float], variant: str) -> ModelRow:
        measured = latency.get(variant, {"latency_ms": None})
        return ModelRow(model, top1, seconds, train_cpu_seconds=cpu, **measured)

    rows = [row("searched code, multi-branch", searched.multi_branch.top1, ours_s, ours_cpu, "multi-branch"),
            row("searched code, fused", searched.fused.top1, None, None, "fused"),
            row("plain backbone (baseline)", baseline.fused.top1, base_s, base_cpu, "plain")]
    times = time_comparison(ours_s, ours_cpu, base_s, base_cpu)
    return BaselineComparison(rows, searched.fused.top1 - baseline.fused.top1,
                              test_examples=searched.multi_branch.examples, seed=seed, **times)


def train_baseline(run_dir: PathLike, config: TrainConfig, data_root: Optional[str] = None, device: str = "auto",
                   workers: int = 0, progress: bool = True, channels_last: bool = False,
                   trust_pickle: bool = False, cuda_graph: str = "auto") -> TrainReport:
    """Train (or resume) the baseline of ``config`` in ``run_dir/baseline``. ``config`` is the searched
    run's (checked, or named by the caller): its network names the baseline's on resume too."""
    where = Path(run_dir) / BASELINE_DIR
    base = baseline_config(config)
    resume = state_path(where).exists()
    return train(where, None if resume else base, resume=resume, data_root=data_root, device=device,
                 workers=workers, progress=progress, channels_last=channels_last,
                 model=base.backbone if resume else None, trust_pickle=trust_pickle, cuda_graph=cuda_graph)


def train_with_baseline(run_dir: PathLike, config: Optional[TrainConfig] = None, resume: bool = False,
                        data_root: Optional[str] = None, device: str = "auto", workers: int = 0,
                        progress: bool = True, channels_last: bool = False, cuda_graph: str = "auto",
                        bench_duration_s: float = 0.5, bench_rounds: int = 3,
                        model: Optional[str] = None, trust_pickle: bool = False) -> BaselineComparison:
    """``train`` the code, then the plain backbone with the same settings, bench both (torch, batch 1),
    write ``baseline.json`` into ``run_dir``; returns the comparison. Resumable as ``train`` is."""
    settings = read_run_state(run_dir, "train", TrainConfig, model=model,
                              trust_pickle=trust_pickle)[1] if resume else config
    if settings is None or settings.arch is None:  # checked before any training starts
        raise IrepError("--baseline compares an architecture code with the plain backbone; give --arch")
    searched = train(run_dir, config, resume=resume, data_root=data_root, device=device, workers=workers,
                     progress=progress, channels_last=channels_last, model=model, trust_pickle=trust_pickle,
                     cuda_graph=cuda_graph)
    if not searched.main_process:
        raise IrepError("train --baseline runs in one process (not under torchrun)")
    base = train_baseline(run_dir, settings, data_root, device, workers, progress, channels_last, trust_pickle,
                          cuda_graph)  # the same step either way: the times compare
    report = bench(searched.ckpt, device=bench_profile(device), backends=["torch"], batches=[1],
                   duration_s=bench_duration_s, rounds=bench_rounds, compare=True, progress=progress)
    result = compare(searched, base, latencies(report), settings.seed)
    write_json(Path(run_dir) / BASELINE_FILE, dataclasses.asdict(result))
    return result
