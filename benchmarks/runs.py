"""Shared by the accuracy benchmarks: resumable DES searches and retraining runs, one directory each.

A finished run leaves a small JSON summary (``report.json`` for a search, ``result.json`` for a
training) and is not redone; an interrupted one (``state.pt`` present) is resumed. So a long
benchmark that is cut short picks up where it stopped when its command is run again.

A run is reused only when both its settings and its code are the same: the summary records ``code_digest``,
a digest of the package modules that compute it (``provenance.code_digest``: comments aside), and
a started run writes the same digest to ``RUN.code`` beside it, so that a resume on other code is
refused too. Runs of older code (or made before runs recorded it) are refused with their directory.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import provenance
from _common import write_json, write_text

from irep_deploy import ArchCode, fuse_model, load_model
from irep_deploy.search.des import make_config, search
from irep_deploy.train import TrainConfig, train


SEARCH_CODE = ("irep_deploy/search/des.py",)
TRAIN_CODE = ("irep_deploy/train.py",)
_DIGESTS: Dict[Sequence[str], str] = {}


def code_of(start: Sequence[str]) -> str:
    """The digest of the code a search (``SEARCH_CODE``) or a training (``TRAIN_CODE``) runs."""
    if start not in _DIGESTS:
        _DIGESTS[start] = provenance.code_digest(start)
    return _DIGESTS[start]


def _same_code(run: Path, stored: Optional[str], code: str) -> None:
    if stored != code:
        raise SystemExit("{}: holds a run of other code ({}, this code is {}); delete it or pick another "
                         "--work-dir".format(run, "code " + stored if stored else "no code digest recorded", code))


def _started(run: Path, code: str) -> None:
    """Check a resumed run's code, or note a new one's before it starts."""
    mark = run.parent / (run.name + ".code")
    if (run / "state.pt").is_file():
        _same_code(run, mark.read_text().strip() if mark.is_file() else None, code)
    else:
        write_text(mark, code + "\n")


def finished_search(run: Path) -> Dict[str, Any]:
    """The summary of a finished search in ``run``, refused if another version of the code made it."""
    info = json.loads((run / "report.json").read_text())
    _same_code(run, info.get("code_digest"), code_of(SEARCH_CODE))
    return info


def run_search(run: Path, preset: str, overrides: Dict[str, Any], device: str = "cpu",
               workers: int = 0) -> Dict[str, Any]:
    """A DES search in ``run`` (resumed if interrupted) on ``device``; its summary, with the best code as text.
    ``workers``: data-loading processes (0: in the main process; a GPU run wants a few)."""
    done = run / "report.json"
    config = make_config(preset, **overrides)
    code = code_of(SEARCH_CODE)
    if done.is_file():
        info = finished_search(run)
        # a setting added after the search ran was at its default then
        stored = dict({f.name: json.loads(json.dumps(f.default)) for f in dataclasses.fields(config)
                       if f.name not in info["config"]}, **info["config"])
        if stored != json.loads(json.dumps(dataclasses.asdict(config))):
            raise SystemExit("{}: holds a search with other settings; pick another --work-dir or delete it".format(run))
        return info
    start = time.time()
    resume = (run / "state.pt").is_file()
    _started(run, code)
    print("search: {} ({})".format("resuming " + str(run) if resume else "starting in " + str(run),
                                   json.dumps(dataclasses.asdict(config))), flush=True)
    # a resume names the network again (the script's own setting): a run's saved settings never do
    report = search(run, None if resume else config, resume=resume, device=device, progress=False, workers=workers,
                    model=config.backbone if resume else None)
    info = {"run_dir": str(run), "preset": preset, "overrides": overrides, "config": dataclasses.asdict(config),
            "device": device,
            "resumed": resume, "wall_s": round(time.time() - start, 1), "best_fitness_val_top1": report.best_fitness,
            "best_branches": report.best.count(), "budget": report.best.budget(config.budget),
            "capacity": report.best.capacity(), "rounds": report.rounds, "code": report.best.dumps(),
            "code_digest": code}
    write_json(done, info)
    return info


def run_training(run: Path, variant: str, seed: int, arch: Optional[str], recipe: Dict[str, Any],
                 device: str = "cpu", workers: int = 0) -> Dict[str, Any]:
    """Retrain ``arch`` (None: the plain backbone) in ``run`` with ``recipe`` on ``device``; test accuracy
    and costs. ``workers`` as for :func:`run_search`."""
    done = run / "result.json"
    digest = code_of(TRAIN_CODE)
    if done.is_file():
        info = json.loads(done.read_text())
        if info.get("recipe", recipe) != recipe or info.get("arch", arch) != arch:
            raise SystemExit("{}: holds a training with other settings; pick another --work-dir or delete it".format(run))
        _same_code(run, info.get("code_digest"), digest)
        return info
    resume = (run / "state.pt").is_file()
    _started(run, digest)
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
            "device": device, "code_digest": digest}
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
