"""Shared by the accuracy benchmarks: resumable DES searches and retraining runs, one directory each.

A finished run leaves a small JSON summary (``report.json`` for a search, ``result.json`` for a
training) and is not redone; an interrupted one (``state.pt`` present) is resumed. So a long
benchmark that is cut short picks up where it stopped when its command is run again.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from _common import write_json

from irep_deploy import ArchCode, fuse_model, load_model
from irep_deploy.search.des import make_config, search
from irep_deploy.train import TrainConfig, train


def run_search(run: Path, preset: str, overrides: Dict[str, Any], device: str = "cpu",
               workers: int = 0) -> Dict[str, Any]:
    """A DES search in ``run`` (resumed if interrupted) on ``device``; its summary, with the best code as text.
    ``workers``: data-loading processes (0: in the main process; a GPU run wants a few)."""
    done = run / "report.json"
    config = make_config(preset, **overrides)
    if done.is_file():
        info = json.loads(done.read_text())
        # a setting added after the search ran was at its default then
        stored = dict({f.name: json.loads(json.dumps(f.default)) for f in dataclasses.fields(config)
                       if f.name not in info["config"]}, **info["config"])
        if stored != json.loads(json.dumps(dataclasses.asdict(config))):
            raise SystemExit("{}: holds a search with other settings; pick another --work-dir or delete it".format(run))
        return info
    start = time.time()
    resume = (run / "state.pt").is_file()
    print("search: {} ({})".format("resuming " + str(run) if resume else "starting in " + str(run),
                                   json.dumps(dataclasses.asdict(config))), flush=True)
    # a resume names the network again (the script's own setting): a run's saved settings never do
    report = search(run, None if resume else config, resume=resume, device=device, progress=False, workers=workers,
                    model=config.backbone if resume else None)
    info = {"run_dir": str(run), "preset": preset, "overrides": overrides, "config": dataclasses.asdict(config),
            "device": device,
            "resumed": resume, "wall_s": round(time.time() - start, 1), "best_fitness_val_top1": report.best_fitness,
            "best_branches": report.best.count(), "budget": report.best.budget(config.budget),
            "capacity": report.best.capacity(), "rounds": report.rounds, "code": report.best.dumps()}
    write_json(done, info)
    return info


def run_training(run: Path, variant: str, seed: int, arch: Optional[str], recipe: Dict[str, Any],
                 device: str = "cpu", workers: int = 0) -> Dict[str, Any]:
    """Retrain ``arch`` (None: the plain backbone) in ``run`` with ``recipe`` on ``device``; test accuracy
    and costs. ``workers`` as for :func:`run_search`."""
    done = run / "result.json"
    if done.is_file():
        info = json.loads(done.read_text())
        if info.get("recipe", recipe) != recipe or info.get("arch", arch) != arch:
            raise SystemExit("{}: holds a training with other settings; pick another --work-dir or delete it".format(run))
        return info
    run.parent.mkdir(parents=True, exist_ok=True)
    resume = (run / "state.pt").is_file()
    start = time.time()
    config = TrainConfig(arch=arch, seed=seed, **recipe)
    print("train {} seed {}: {}".format(variant, seed, "resuming" if resume else "starting"), flush=True)
    report = train(run, None if resume else config, resume=resume, device=device, progress=False, workers=workers,
                   model=config.backbone if resume else None)
    code = ArchCode.loads(arch) if arch is not None else ArchCode.empty(recipe["backbone"])
    info = {"variant": variant, "seed": seed, "run_dir": str(run), "branches": code.count(),
            "test_top1": report.multi_branch.top1, "fused_test_top1": report.fused.top1,
            "test_examples": report.multi_branch.examples, "fused_rel_error": report.fused_rel_error,
            "train_top1_last_epoch": report.history[-1]["train_top1"] if report.history else None,
            "wall_s": round(time.time() - start, 1), "resumed": resume, "recipe": recipe, "arch": arch,
            "device": device}
    write_json(done, info)
    print("  -> test top-1 {:.2f}% (fused {:.2f}%), {} branches, {:.0f} s".format(
        info["test_top1"], info["fused_test_top1"], info["branches"], info["wall_s"]), flush=True)
    return info


def interval(values: Sequence[float]) -> Dict[str, Any]:
    """Mean with a two-sided 95% t interval (None where n < 2), and the values."""
    from scipy import stats
    n = len(values)
    mean = statistics.mean(values) if values else None
    if n < 2:
        return {"n": n, "mean": mean, "lo": None, "hi": None, "values": list(values)}
    half = stats.t.ppf(0.975, n - 1) * statistics.stdev(values) / n ** 0.5
    return {"n": n, "mean": mean, "lo": mean - half, "hi": mean + half, "values": list(values)}


def mean_std(values: Sequence[float]) -> Dict[str, Optional[float]]:
    """Mean and sample standard deviation (n-1); None where undefined."""
    return {"mean": statistics.mean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None}


def fmt(mean: Optional[float], std: Optional[float]) -> str:
    if mean is None:
        return "-"
    return "{:.2f}".format(mean) + (" +- {:.2f}".format(std) if std is not None else "")


def checkpoint_params(run: Path) -> Dict[str, int]:
    """Parameters of a training run's network as trained (multi-branch, with BN and alpha/beta) and
    as deployed (fused: one 3x3 conv + bias per block, whatever the code)."""
    model = load_model(run / "ckpt.pt")
    return {"trained": sum(p.numel() for p in model.parameters()),
            "deployed": sum(p.numel() for p in fuse_model(model).parameters())}


def rounds_text(rounds: List[Dict[str, Any]]) -> str:
    return "; ".join("r{}: {:.2f} / {:.2f}".format(r["round"], r["best_fitness"], r["mean_fitness"]) for r in rounds)
