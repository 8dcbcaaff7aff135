"""The main job end to end on real data (``make demo``, ``irep-deploy demo``).

search (DES, CPU preset) on Fashion-MNIST -> retrain the found code -> fuse (checked) -> export ONNX
(verified with onnxruntime) -> TensorRT engine when TensorRT and a GPU are present -> benchmark the
multi-branch, fused and plain networks -> a report directory (Markdown, JSON, figures).
Every step is the same library function the CLI step calls.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch

from . import __version__
from ._io import atomic_write, run_directory, write_json
from .arch import ArchCode
from .errors import IrepError
from .search.des import make_config, search
from .train import TrainConfig, train

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class DemoSettings:
    """Sizes of the demo; ``quick`` is a smoke run.

    The defaults aim at about 15 minutes on 2 idle CPU cores: the ``cpu`` search preset on at most
    4000 images per split (the full preset alone takes about 8 minutes), 3 epochs of retraining on
    8000 images (tested on 8000 of the 10 000 test images), and 2-second benchmarks.
    """

    dataset: str = "fashion-mnist"
    backbone: str = "resnet18_cifar"
    width: float = 0.125
    search_preset: str = "cpu"
    search_overrides: Dict[str, Any] = field(default_factory=lambda: {"limit": 4000})
    train_epochs: int = 3
    train_limit: Optional[int] = 8000
    bench_batches: List[int] = field(default_factory=lambda: [1, 32])
    bench_duration_s: float = 2.0
    bench_rounds: int = 5
    seed: int = 0

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(dataset="digits", search_overrides=dict(population=4, subnets=2, warmup_epochs=1, rounds=1,
                                                           limit=400, batch_size=64),
                   train_epochs=1, train_limit=400, bench_batches=[1, 8], bench_duration_s=0.2, bench_rounds=1)


@dataclass
class Step:
    name: str
    seconds: float
    status: str  # done | skipped
    note: str = ""


def run_demo(out: PathLike, settings: Optional[DemoSettings] = None, device: str = "cpu",
             data_root: Optional[str] = None, progress: bool = True,
             say: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run every step into ``out`` and write ``report.md`` / ``report.json``; returns the report."""
    settings = settings or DemoSettings()
    out = Path(out)
    if (out / "search" / "state.pt").exists() or (out / "train" / "state.pt").exists():
        raise IrepError("{}: holds an earlier demo; remove it or choose another --out".format(out))
    # a demo that fails before its search saved anything leaves no directory behind
    with run_directory(out, keep=lambda p: (p / "search" / "state.pt").exists()):
        return _run_steps(out, settings, device, data_root, progress, say)


def _run_steps(out: Path, settings: DemoSettings, device: str, data_root: Optional[str], progress: bool,
               say: Callable[[str], None]) -> Dict[str, Any]:
    steps: List[Step] = []
    total = 7

    def step(n: int, title: str) -> float:
        say("\n[{}/{}] {}".format(n, total, title))
        return time.perf_counter()

    # 1. search
    t = step(1, "search: DES over the IREPS space on {} ({} preset)".format(settings.dataset, settings.search_preset))
    config = make_config(settings.search_preset, dataset=settings.dataset, backbone=settings.backbone,
                         width=settings.width, seed=settings.seed, **settings.search_overrides)
    found = search(out / "search", config, data_root=data_root, device=device, progress=progress)
    code = found.best
    steps.append(Step("search", time.perf_counter() - t, "done",
                      "{} rounds, population {}, best code {} of {} branches (budget {}), val top-1 {:.2f}%".format(
                          config.rounds, config.population, code.count(), code.capacity(),
                          code.budget(config.budget), found.best_fitness)))
    say(steps[-1].note)

    # 2. retrain
    t = step(2, "train: the found code from scratch ({} epochs)".format(settings.train_epochs))
    trained = train(out / "train", TrainConfig(arch=code.dumps(), dataset=settings.dataset, width=settings.width,
                                               epochs=settings.train_epochs, limit=settings.train_limit,
                                               seed=settings.seed),
                    data_root=data_root, device=device, progress=progress)
    steps.append(Step("train", time.perf_counter() - t, "done",
                      "test top-1 multi-branch {:.2f}%, fused {:.2f}% ({} examples)".format(
                          trained.multi_branch.top1, trained.fused.top1, trained.multi_branch.examples)))
    say(steps[-1].note)

    # 3. fuse
    from .pipeline import fuse
    t = step(3, "fuse: every block into one 3x3 conv, checked against the multi-branch network")
    fused = fuse(trained.ckpt, out / "search" / "arch.bin", out=out / "deploy.pt")
    steps.append(Step("fuse", time.perf_counter() - t, "done",
                      "{:,} -> {:,} parameters, relative error {:.2e}".format(
                          fused.params_multi_branch, fused.params_fused, fused.rel_error)))
    say(steps[-1].note)

    # 4. export
    from .engines.onnx import export
    t = step(4, "export: ONNX (opset 17, dynamic batch), verified with onnxruntime")
    exported = export(out / "deploy.pt", out / "model.onnx")
    steps.append(Step("export", time.perf_counter() - t, "done",
                      "ops {}; onnxruntime vs torch: {}".format(
                          ", ".join(sorted(exported.op_types)),
                          ", ".join("batch {} rel {:.1e}".format(c.batch, c.rel_error) for c in exported.checks))))
    say(steps[-1].note)

    # 5. TensorRT, where it can run
    t = step(5, "build-trt: TensorRT FP16 engine")
    engine_note = _try_tensorrt(out)
    steps.append(Step("build-trt", time.perf_counter() - t, "done" if engine_note.startswith("built") else "skipped",
                      engine_note))
    say(steps[-1].note)

    # 6. bench
    from .bench.devices import bench_profile
    from .bench.latency import bench, format_table
    t = step(6, "bench: multi-branch vs fused vs plain backbone (torch eager, onnxruntime)")
    # bench takes device profiles and runs on the current CUDA device: cuda:N selects that device
    with torch.cuda.device(torch.device(device)) if device.startswith("cuda:") else contextlib.nullcontext():
        report = bench(trained.ckpt, device=bench_profile(device), backends=["torch", "ort"],
                       batches=settings.bench_batches, duration_s=settings.bench_duration_s, compare=True,
                       rounds=settings.bench_rounds, json_out=out / "bench.json")
    table = format_table(report)
    say(table)
    steps.append(Step("bench", time.perf_counter() - t, "done", "{} measurements".format(len(report.results))))

    # 7. figures
    t = step(7, "figures")
    figures = _try_figures(out, trained, report.results)
    skipped = bool(figures) and figures[0].startswith("skipped")
    steps.append(Step("figures", time.perf_counter() - t, "skipped" if skipped else "done", ", ".join(figures)))
    say(steps[-1].note)

    summary = {
        "package_version": __version__, "torch": torch.__version__, "settings": dataclasses.asdict(settings),
        "search": {"config": dataclasses.asdict(config), "best_fitness": found.best_fitness,
                   "branches": code.count(), "capacity": code.capacity(), "rounds": found.rounds},
        "accuracy": {"multi_branch_top1": trained.multi_branch.top1, "fused_top1": trained.fused.top1,
                     "test_examples": trained.multi_branch.examples, "fused_rel_error": trained.fused_rel_error,
                     "disagreements": trained.disagreements},
        "fuse": dataclasses.asdict(fused),
        "export": {"op_types": exported.op_types, "checks": [dataclasses.asdict(c) for c in exported.checks]},
        "latency": {"results": [_result_row(r) for r in report.results], "ratios": report.ratios,
                    "device": report.device, "warnings": report.warnings},
        "steps": [dataclasses.asdict(s) for s in steps],
    }
    write_json(out / "report.json", summary)
    with atomic_write(out / "report.md", "w") as handle:
        handle.write(_markdown(summary, table, code))
    say("\nreport: {} and {}".format(out / "report.md", out / "report.json"))
    return summary


def _result_row(r: Any) -> Dict[str, Any]:
    return {"variant": r.variant, "backend": r.backend, "batch": r.batch, "median_ms": r.host.median,
            "p90_ms": r.host.p90, "throughput": r.throughput}


def _try_tensorrt(out: Path) -> str:
    try:
        from .engines.tensorrt import build_engine, require_cuda, require_tensorrt
        require_tensorrt()
        require_cuda()
    except IrepError as exc:
        return "skipped: {}".format(exc)
    report = build_engine(out / "model.onnx", out / "model.engine", fp16=True)
    return "built {}".format(getattr(report, "out", out / "model.engine"))


def _try_figures(out: Path, trained: Any, results: List[Any]) -> List[str]:
    """Figures of the search run, plus accuracy vs latency (torch, batch 1) of the trained network."""
    from . import viz
    top1 = {"multi-branch": trained.multi_branch.top1, "fused": trained.fused.top1}
    points = [{"label": "DES code, {}".format(r.variant), "group": r.variant, "latency_ms": r.host.median,
               "accuracy": top1[r.variant]}
              for r in results if r.backend == "torch" and r.batch == 1 and r.variant in top1]
    write_json(out / "points.json", {"title": "test top-1 vs torch CPU latency, batch 1", "points": points})
    try:
        report = viz.plot(out / "search", out / "figures", points=out / "points.json")
    except IrepError as exc:  # matplotlib is an optional extra
        return ["skipped: {}".format(exc)]
    return [p.name for p in report.written if p.suffix == ".png"]


def _markdown(s: Dict[str, Any], table: str, code: ArchCode) -> str:
    acc, srch = s["accuracy"], s["search"]
    lines = [
        "# irep-deploy demo report", "",
        "Dataset {}, backbone {} (width {}), seed {}.".format(s["settings"]["dataset"], srch["config"]["backbone"],
                                                               srch["config"]["width"], s["settings"]["seed"]), "",
        "## Search", "",
        "Best code: {} of {} available branches, validation top-1 (fused) {:.2f}%.".format(
            srch["branches"], srch["capacity"], srch["best_fitness"]), "",
        "| round | best fitness % | mean fitness % |", "|---|---|---|",
    ]
    lines += ["| {} | {:.2f} | {:.2f} |".format(r["round"], r["best_fitness"], r["mean_fitness"]) for r in srch["rounds"]]
    lines += ["", "```", code.format_table(), "```", "",
              "## Accuracy before and after fusion", "",
              "| model | test top-1 % |", "|---|---|",
              "| multi-branch | {:.2f} |".format(acc["multi_branch_top1"]),
              "| fused | {:.2f} |".format(acc["fused_top1"]), "",
              "{} test examples; predictions that differ: {}; largest relative logit error {:.2e}.".format(
                  acc["test_examples"], acc["disagreements"], acc["fused_rel_error"]), "",
              "## Latency", "", "```", table, "```", ""]
    if s["latency"]["ratios"]:
        from .bench.latency import RATIOS
        lines += ["| backend | batch | ratio | value | spread over rounds |", "|---|---|---|---|---|"]
        for r in s["latency"]["ratios"]:
            for key, _, _, shown in RATIOS:
                if key in r:
                    spread = "-" if key + "_spread" not in r else "{:.1%}{}".format(
                        r[key + "_spread"], " (too wide to trust)" if key in r.get("untrusted", []) else "")
                    lines.append("| {} | {} | {} | {:.3f} | {} |".format(r["backend"], r["batch"], shown, r[key],
                                                                        spread))
        lines.append("")
    lines += ["## Steps", "", "| step | seconds | status | note |", "|---|---|---|---|"]
    lines += ["| {} | {:.1f} | {} | {} |".format(st["name"], st["seconds"], st["status"], st["note"]) for st in s["steps"]]
    return "\n".join(lines) + "\n"
