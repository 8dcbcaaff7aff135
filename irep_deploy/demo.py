"""The main job end to end on real data (``make demo``, ``irep-deploy demo``).

search (DES, CPU preset) on Fashion-MNIST -> retrain the found code -> train the plain backbone with the
same recipe and seed (the baseline) -> fuse (checked) -> export ONNX
(verified with onnxruntime) -> quantize to INT8 (QDQ) on real calibration images -> evaluate the FP32
and INT8 ONNX on the test split -> bench them (onnxruntime CPU) -> TensorRT engine when TensorRT and a
GPU are present -> benchmark the multi-branch, fused and plain networks -> a report directory
(Markdown, JSON, figures) whose first table sets the searched code beside the baseline.
Every step is the same library function the CLI step calls.

``report.md`` is rendered from ``report.json`` alone (:func:`render_report`), and every latency and
ratio in both carries its spread over the bench rounds and the UNTRUSTED mark, and every training-time
ratio whether the two runs can be compared (:mod:`irep_deploy.trust`).
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
from .engines.quantize import weight_scales
from .errors import IrepError
from .search.answer import WHY
from .search.des import make_config, search
from .search.records import ANSWER_FILE, BEST_SEEN_FILE
from .train import TrainConfig, train
from .trust import marks, ratio_marks, shown

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class DemoSettings:
    """Sizes of the demo; ``quick`` is a smoke run.

    The defaults (their measured time is in README's quick start): the ``cpu`` search preset on at most
    4000 images per split (the full preset alone takes about 8 minutes), 3 epochs of retraining on
    8000 images (tested on 8000 of the 10 000 test images), the same for the plain backbone (about a
    minute more), and 2-second benchmarks.
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
    calib_size: int = 512  # quantize's default
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
        raise IrepError("{}: holds an earlier demo; remove it or choose another -o/--output".format(out))
    # a demo that fails before its search saved anything leaves no directory behind
    with run_directory(out, keep=lambda p: (p / "search" / "state.pt").exists(), command="demo"):
        return _run_steps(out, settings, device, data_root, progress, say)


def _run_steps(out: Path, settings: DemoSettings, device: str, data_root: Optional[str], progress: bool,
               say: Callable[[str], None]) -> Dict[str, Any]:
    steps: List[Step] = []
    total = 11

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
                      "{} rounds, population {}, answer (the final round's best) {} of {} branches (budget {}), "
                      "val top-1 {:.2f}%".format(config.rounds, config.population, code.count(), code.capacity(),
                                                 code.budget(config.budget), found.best_fitness)))
    say(steps[-1].note)
    say(found.answer())

    # 2. retrain
    t = step(2, "train: the found code from scratch ({} epochs)".format(settings.train_epochs))
    recipe = TrainConfig(arch=code.dumps(), backbone=settings.backbone, dataset=settings.dataset, width=settings.width,
                         epochs=settings.train_epochs, limit=settings.train_limit, seed=settings.seed)
    trained = train(out / "train", recipe, data_root=data_root, device=device, progress=progress)
    steps.append(Step("train", time.perf_counter() - t, "done",
                      "test top-1 multi-branch {:.2f}%, fused {:.2f}% ({} examples)".format(
                          trained.multi_branch.top1, trained.fused.top1, trained.multi_branch.examples)))
    say(steps[-1].note)

    # 3. the baseline: what the branches bought
    from .baseline import compare, latencies, train_baseline, train_seconds
    t = step(3, "baseline: the plain backbone (no branches), same recipe and seed")
    base = train_baseline(out, recipe, data_root=data_root, device=device, progress=progress)
    steps.append(Step("baseline", time.perf_counter() - t, "done",
                      "test top-1 {:.2f}% (searched code, fused: {:.2f}%); training {:.1f} s (searched code: "
                      "{:.1f} s)".format(base.fused.top1, trained.fused.top1, train_seconds(base),
                                         train_seconds(trained))))
    say(steps[-1].note)

    # 4. fuse
    from .pipeline import fuse
    t = step(4, "fuse: every block into one 3x3 conv, checked against the multi-branch network")
    fused = fuse(trained.ckpt, out / "search" / "arch.bin", out=out / "deploy.pt", progress=progress)
    steps.append(Step("fuse", time.perf_counter() - t, "done",
                      "{:,} -> {:,} parameters, relative error {:.2e}".format(
                          fused.params_multi_branch, fused.params_fused, fused.rel_error)))
    say(steps[-1].note)

    # 5. export
    from .engines.onnx import export
    t = step(5, "export: ONNX (opset 17, dynamic batch), verified with onnxruntime")
    exported = export(out / "deploy.pt", out / "model.onnx", progress=progress)
    steps.append(Step("export", time.perf_counter() - t, "done",
                      "ops {}; onnxruntime vs torch: {}".format(
                          ", ".join(sorted(exported.op_types)),
                          ", ".join("batch {} rel {:.1e}".format(c.batch, c.rel_error) for c in exported.checks))))
    say(steps[-1].note)

    # 6-8. INT8
    int8 = _int8_steps(out, settings, data_root, steps, step, say, progress)

    # 9. TensorRT, where it can run
    t = step(9, "build-trt: TensorRT FP16 engine")
    engine_note = _try_tensorrt(out, progress)
    steps.append(Step("build-trt", time.perf_counter() - t, "done" if engine_note.startswith("built") else "skipped",
                      engine_note))
    say(steps[-1].note)

    # 10. bench
    from .bench.devices import bench_profile
    from .bench.latency import bench, format_table
    t = step(10, "bench: multi-branch vs fused vs plain backbone (torch eager, onnxruntime)")
    # bench takes device profiles and runs on the current CUDA device: cuda:N selects that device
    with torch.cuda.device(torch.device(device)) if device.startswith("cuda:") else contextlib.nullcontext():
        report = bench(trained.ckpt, device=bench_profile(device), backends=["torch", "ort"],
                       batches=settings.bench_batches, duration_s=settings.bench_duration_s, compare=True,
                       rounds=settings.bench_rounds, json_out=out / "bench.json", progress=progress)
    table = format_table(report)
    say(table)
    steps.append(Step("bench", time.perf_counter() - t, "done", "{} measurements".format(len(report.results))))

    versus = compare(trained, base, latencies(report), settings.seed)

    # 11. figures
    t = step(11, "figures")
    latency = latency_record(report)
    figures = _try_figures(out, trained, base, latency["results"])
    skipped = bool(figures) and figures[0].startswith("skipped")
    steps.append(Step("figures", time.perf_counter() - t, "skipped" if skipped else "done", ", ".join(figures)))
    say(steps[-1].note)

    summary = {
        "package_version": __version__, "torch": torch.__version__, "settings": dataclasses.asdict(settings),
        "search": dict(search_record(found), config=dataclasses.asdict(config)),
        "accuracy": {"multi_branch_top1": trained.multi_branch.top1, "fused_top1": trained.fused.top1,
                     "test_examples": trained.multi_branch.examples, "fused_rel_error": trained.fused_rel_error,
                     "disagreements": trained.disagreements},
        "baseline": dataclasses.asdict(versus),
        "fuse": dataclasses.asdict(fused),
        "export": {"op_types": exported.op_types, "checks": [dataclasses.asdict(c) for c in exported.checks]},
        "latency": latency,
        "int8": int8,
        "figures": [] if skipped else ["figures/" + name for name in figures],
        "steps": [dataclasses.asdict(s) for s in steps],
    }
    write_json(out / "report.json", summary)
    with atomic_write(out / "report.md", "w") as handle:
        handle.write(render_report(summary))
    say("\nreport: {} and {}".format(out / "report.md", out / "report.json"))
    return summary


def _int8_steps(out: Path, settings: DemoSettings, data_root: Optional[str], steps: List[Step],
                step: Callable[[int, str], float], say: Callable[[str], None], progress: bool) -> Dict[str, Any]:
    """quantize -> eval -> bench of the exported model's INT8 copy; the report's ``int8`` section."""
    from .bench.latency import bench_onnx_files, format_table
    from .engines.onnx_eval import evaluate_onnx
    from .engines.quantize import quantize
    from .errors import VerificationError

    fp32, int8 = out / "model.onnx", out / "model.int8.onnx"
    t = step(6, "quantize: INT8 (QDQ, default settings) on {} real {} training images".format(
        settings.calib_size, settings.dataset))
    try:
        q = quantize(fp32, settings.dataset, out=int8, data_root=data_root, calib_size=settings.calib_size,
                     progress=progress)
    except VerificationError as exc:
        # an INT8 model too far from FP32 is a result of the run, not a reason to lose the steps after it
        steps.append(Step("quantize", time.perf_counter() - t, "failed", str(exc)))
        say(steps[-1].note)
        return {"error": str(exc)}
    quantized = {"out": int8.name, "method": q.method, "per_channel": q.per_channel, "calib_dataset": q.calib_dataset,
                 "calib_size": q.calib_size, "cosine": q.cosine, "agreement": q.agreement,
                 "check_batch": q.check_batch, "op_types": q.op_types, "size_bytes": q.size_bytes,
                 "fp32_size_bytes": fp32.stat().st_size}
    steps.append(Step("quantize", time.perf_counter() - t, "done",
                      "{}: {}, {} weights, {} QuantizeLinear; {:,} -> {:,} bytes; cosine {:.4f} vs FP32 on a "
                      "calibration batch".format(int8.name, q.method, weight_scales(q.per_channel),
                                                 q.op_types.get("QuantizeLinear", 0), quantized["fp32_size_bytes"],
                                                 q.size_bytes, q.cosine)))
    say(steps[-1].note)

    # the test images train scored the fused network on (same limit and seed), so FP32 here matches it
    t = step(7, "eval: FP32 and INT8 ONNX on the {} test split (onnxruntime)".format(settings.dataset))
    r = evaluate_onnx(int8, settings.dataset, data_root=data_root, limit=settings.train_limit, reference=fp32,
                      progress=progress)
    evaluated = {"dataset": r.dataset, "examples": r.examples, "fp32_top1": r.reference_top1,
                 "fp32_top5": r.reference_top5, "int8_top1": r.top1, "int8_top5": r.top5, "differ": r.differ}
    steps.append(Step("eval-int8", time.perf_counter() - t, "done",
                      "test top-1 FP32 {:.2f}%, INT8 {:.2f}% (top-5 {:.2f}% / {:.2f}%); {} of {} predictions "
                      "differ".format(r.reference_top1, r.top1, r.reference_top5, r.top5, r.differ, r.examples)))
    say(steps[-1].note)

    t = step(8, "bench: FP32 vs INT8 ONNX (onnxruntime CPU, interleaved rounds)")
    report = bench_onnx_files([("onnx", fp32), ("onnx-int8", int8)], batches=settings.bench_batches,
                              duration_s=settings.bench_duration_s, rounds=settings.bench_rounds,
                              json_out=out / "bench_int8.json", progress=progress)
    table = format_table(report)
    say(table)
    steps.append(Step("bench-int8", time.perf_counter() - t, "done", "{} measurements".format(len(report.results))))
    return {"quantize": quantized, "eval": evaluated, "table": table, "latency": latency_record(report)}


def latency_record(report: Any) -> Dict[str, Any]:
    """A bench report as report.json holds it: every median and ratio with its spread and mark."""
    from .bench.latency import RATIOS
    results = [dict({"variant": r.variant, "backend": r.backend, "batch": r.batch, "median_ms": r.host.median,
                     "p90_ms": r.host.p90, "throughput": r.throughput, "round_medians_ms": r.round_medians},
                    **marks("median_ms", r.round_medians)) for r in report.results]
    return {"results": results, "ratios": [ratio_marks(q, [name for name, _, _, _ in RATIOS]) for q in report.ratios],
            "device": report.device, "warnings": report.warnings}


def search_record(found: Any) -> Dict[str, Any]:
    """The search's answer and its best-seen code, and the line that says which is which and why."""
    answer = found.best
    seen = found.best_seen
    record = {"best_fitness": found.best_fitness, "branches": answer.count(), "capacity": answer.capacity(),
              "rounds": found.rounds, "answer_file": "search/" + ANSWER_FILE, "code_table": answer.format_table(),
              "explanation": found.answer("search/"), "best_seen": None}
    if seen is not None:
        record["best_seen"] = {"file": "search/" + BEST_SEEN_FILE, "round": found.best_seen_round,
                               "fitness": found.best_seen_fitness, "branches": seen.count(),
                               "differs": seen != answer, "code_table": seen.format_table()}
    return record


def _try_tensorrt(out: Path, progress: bool) -> str:
    try:
        from .engines.tensorrt import build_engine, require_cuda, require_tensorrt
        require_tensorrt()
        require_cuda()
    except IrepError as exc:
        return "skipped: {}".format(exc)
    report = build_engine(out / "model.onnx", out / "model.engine", fp16=True, progress=progress)
    return "built {}".format(getattr(report, "out", out / "model.engine"))


def _try_figures(out: Path, trained: Any, base: Any, results: List[Dict[str, Any]]) -> List[str]:
    """Figures of the search run, plus accuracy vs latency (torch, batch 1) of the trained network
    and of the baseline (the plain variant has the baseline's shape); a latency whose rounds spread
    too wide is drawn as untrusted."""
    from . import viz
    top1 = {"multi-branch": trained.multi_branch.top1, "fused": trained.fused.top1, "plain": base.fused.top1}
    names = {"multi-branch": "DES code, multi-branch", "fused": "DES code, fused", "plain": "plain backbone"}
    points = [{"label": names[r["variant"]], "group": r["variant"], "latency_ms": r["median_ms"],
               "accuracy": top1[r["variant"]], "latency_spread": r["median_ms_spread"],
               "untrusted": r["median_ms_untrusted"],
               "latency_range_ms": [min(r["round_medians_ms"]), max(r["round_medians_ms"])]}
              for r in results if r["backend"] == "torch" and r["batch"] == 1 and r["variant"] in top1]
    write_json(out / "points.json", {"title": "test top-1 vs torch CPU latency, batch 1", "points": points})
    try:
        report = viz.plot(out / "search", out / "figures", points=out / "points.json")
    except IrepError as exc:  # matplotlib is an optional extra
        return ["skipped: {}".format(exc)]
    return [p.name for p in report.written if p.suffix == ".png"]


UNTRUSTED_NOTE = ("UNTRUSTED: its values over the bench rounds spread wider than {:.0%} of their median (bench's "
                  "rule), so the machine's load moved it; rerun the bench on an idle machine, longer or with more "
                  "rounds before quoting it.")


def render_report(s: Dict[str, Any]) -> str:
    """``report.md`` from ``report.json``'s content alone."""
    from .bench.latency import SPREAD_WARN
    acc, srch, versus = s["accuracy"], s["search"], s["baseline"]
    lines = [
        "# irep-deploy demo report", "",
        "Dataset {}, backbone {} (width {}), seed {}.".format(s["settings"]["dataset"], srch["config"]["backbone"],
                                                               srch["config"]["width"], s["settings"]["seed"]), "",
        "Every latency and latency ratio below is the median over the bench rounds, with the spread of its per-round "
        "values ((max - min) / median); a spread above {:.0%} marks it UNTRUSTED.".format(SPREAD_WARN), "",
        "## What the branches bought", "",
        "The searched code and the plain backbone (no branches), trained with the same recipe and seed "
        "and tested on the same images; latency from the bench step (torch, batch 1). One seed: the "
        "difference carries no interval (benchmarks/evidence_fmnist.py repeats it over seeds).", "",
        _baseline_table(versus), "",
        "Test top-1 {:+.2f} points for {}.".format(versus["top1_gain"], _train_cost(versus)), "",
    ]
    if any(r.get("latency_ms_untrusted") for r in versus["rows"]):
        lines += ["A latency above is " + UNTRUSTED_NOTE.format(SPREAD_WARN), ""]
    lines += _search_markdown(srch)
    lines += ["## Accuracy before and after fusion", "",
              "| model | test top-1 % |", "|---|---|",
              "| multi-branch | {:.2f} |".format(acc["multi_branch_top1"]),
              "| fused | {:.2f} |".format(acc["fused_top1"]), "",
              "{} test examples; predictions that differ: {}; largest relative logit error {:.2e}.".format(
                  acc["test_examples"], acc["disagreements"], acc["fused_rel_error"]), ""]
    lines += ["## Latency", ""] + _latency_markdown(s["latency"])
    lines += _int8_markdown(s["int8"])
    lines += _figures_markdown(s.get("figures", []))
    lines += ["## Steps", "", "| step | seconds | status | note |", "|---|---|---|---|"]
    lines += ["| {} | {:.1f} | {} | {} |".format(st["name"], st["seconds"], st["status"], st["note"]) for st in s["steps"]]
    return "\n".join(lines) + "\n"


def _baseline_table(versus: Dict[str, Any]) -> str:
    from .baseline import BaselineComparison, ModelRow
    rows = [ModelRow(**r) for r in versus["rows"]]
    return BaselineComparison(**dict(versus, rows=rows)).table()


def _train_cost(versus: Dict[str, Any]) -> str:
    note = versus.get("train_cost_note")
    return note or "{:.2f}x the training wall time (comparability unknown)".format(versus["train_cost"])


def _search_markdown(srch: Dict[str, Any]) -> List[str]:
    lines = ["## Search", "",
             "The answer is `{}`: {} of {} available branches, validation top-1 (fused) {:.2f}% in the final "
             "round. {}.".format(srch["answer_file"], srch["branches"], srch["capacity"], srch["best_fitness"], WHY), ""]
    seen = srch.get("best_seen")
    if seen is not None and seen["differs"]:
        lines += ["The best fitness of any round, {:.2f}% in round {}, belongs to another code: `{}` ({} branches, "
                  "below). The demo trains the answer.".format(seen["fitness"], seen["round"], seen["file"],
                                                             seen["branches"]), ""]
    elif seen is not None:
        lines += ["The best fitness of any round, {:.2f}% in round {}, is the answer's own (`{}` holds the same "
                  "code).".format(seen["fitness"], seen["round"], seen["file"]), ""]
    lines += ["| round | best fitness % | mean fitness % |", "|---|---|---|"]
    lines += ["| {} | {:.2f} | {:.2f} |".format(r["round"], r["best_fitness"], r["mean_fitness"]) for r in srch["rounds"]]
    lines += ["", "The answer, `{}`:".format(srch["answer_file"]), "", "```", srch["code_table"], "```", ""]
    if seen is not None and seen["differs"]:
        lines += ["The best-seen code, `{}` (round {}):".format(seen["file"], seen["round"]), "", "```",
                  seen["code_table"], "```", ""]
    return lines


def _latency_markdown(latency: Dict[str, Any]) -> List[str]:
    """Each measurement and each ratio of a bench run, with spread and mark (report.json's records)."""
    from .bench.latency import RATIOS, SPREAD_WARN
    device = latency["device"]
    lines = ["Device: {} ({}); the bench's full statistics are in its JSON file.".format(
                 device.get("name"), device.get("kind")) if isinstance(device, dict) else "Device: {}.".format(device),
             "", "| variant | backend | batch | median ms |", "|---|---|---|---|"]
    lines += ["| {} | {} | {} | {} |".format(r["variant"], r["backend"], r["batch"], shown(r, "median_ms"))
              for r in latency["results"]]
    lines.append("")
    if latency["ratios"]:
        lines += ["| backend | batch | ratio of medians | value |", "|---|---|---|---|"]
        for q in latency["ratios"]:
            lines += ["| {} | {} | {} | {} |".format(q["backend"], q["batch"], label, shown(q, key))
                      for key, _, _, label in RATIOS if key in q]
        lines.append("")
    if any(r.get("median_ms_untrusted") for r in latency["results"]) or any(
            q.get(key + "_untrusted") for q in latency["ratios"] for key, _, _, _ in RATIOS):
        lines += ["A value marked " + UNTRUSTED_NOTE.format(SPREAD_WARN), ""]
    return lines


def _figures_markdown(figures: List[str]) -> List[str]:
    if not figures:
        return []
    lines = ["## Figures", "", "Described in the package's docs/figures.md. In `accuracy_latency.png` a hollow "
             "marker is an UNTRUSTED latency; the bars span its per-round medians.", ""]
    for path in figures:
        lines += ["[![{0}]({0})]({0})".format(path), ""]
    return lines


def _int8_markdown(i: Dict[str, Any]) -> List[str]:
    lines = ["## INT8 (onnxruntime, CPU)", ""]
    if "error" in i:
        return lines + ["Not quantized: {}".format(i["error"]), ""]
    q, e = i["quantize"], i["eval"]
    lines += ["`{}`: QDQ, {} calibration on {} {} training images, {} weights; {:,} bytes (FP32 {:,}).".format(
                  q["out"], q["method"], q["calib_size"], q["calib_dataset"],
                  weight_scales(q["per_channel"]), q["size_bytes"], q["fp32_size_bytes"]), "",
              "| model | test top-1 % | test top-5 % |", "|---|---|---|",
              "| FP32 ONNX | {:.2f} | {:.2f} |".format(e["fp32_top1"], e["fp32_top5"]),
              "| INT8 ONNX | {:.2f} | {:.2f} |".format(e["int8_top1"], e["int8_top5"]), "",
              "{} test examples; predictions that differ between FP32 and INT8: {}.".format(e["examples"], e["differ"]),
              ""]
    return lines + _latency_markdown(i["latency"])
