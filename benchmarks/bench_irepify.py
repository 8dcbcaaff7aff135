"""Your own network, deployed: fused irepified torchvision models vs the originals (docs/performance.md).

For each torchvision model (``weights=None``, every BatchNorm given random statistics so that
folding is not the identity):

- original: the model as torchvision builds it, eval mode;
- original folded: ``fuse_model(original)`` (every fx-found conv->BN pair folded);
- multi-branch: ``irepify(original)`` with a random architecture code at 2/3 of the capacity
  (branches created, their BNs and alpha/beta randomised so that they contribute);
- fused: ``fuse_model(multi-branch)``.

Recorded: parameter counts of all four (fused must equal original folded: the script stops with an
error otherwise), the largest relative output difference fused vs multi-branch (eval mode; above
``--tolerance`` is an error too), and onnxruntime CPU latency of fused, original folded and original
at every batch, all three exported the same way (opset 17, onnxslim, checked against torch) and
timed by ``irep_deploy.bench`` in interleaved rounds: ratios of medians, with the per-round ratios
and their spread ((max - min) / median, UNTRUSTED above 10 % as ``irep-deploy bench`` says).
Then the wall time of ``irepify`` + ``fuse_model`` of resnet50 (median of ``--repeats`` runs).

    OMP_NUM_THREADS=1 python benchmarks/bench_irepify.py        # the recorded run (about 16 min)
    python benchmarks/bench_irepify.py --quick --out /tmp/irepify_quick    # smoke run (seconds)

Writes ``results/irepify_cpu.{json,md}`` (atomically).
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import onnx
import onnxruntime
import torch
import torch.nn as nn
import torchvision

import irep_deploy
from _common import describe_machine, write_results

from irep_deploy import ArchCode, apply_arch, fuse_model, irepify  # noqa: E402
from irep_deploy.bench.latency import (SPREAD_WARN, Job, Result, Samples, Variant, _to_onnx,  # noqa: E402
                                       ort_runner, run_rounds, spread, summarise)
from irep_deploy.block import IrepConv  # noqa: E402
from irep_deploy.compare import compare  # noqa: E402
from irep_deploy.engines import ort as ort_helpers  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("resnet18", "resnet50", "mobilenet_v2", "vgg16_bn", "regnet_x_400mf")
VARIANTS = ("fused", "original folded", "original")
# original / original folded is an A/A control where the exporter folded BN itself (same graph twice)
RATIOS = (("fused", "original"), ("fused", "original folded"), ("original", "original folded"))
TARGET = (0.98, 1.02)  # the latency target for fused / original (docs/performance.md)


def randomise_bn(module: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial statistics and affine parameters in every BatchNorm2d, as after training."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            ranges = ((m.running_mean, -0.2, 0.2), (m.running_var, 0.5, 2.0), (m.weight, 0.5, 1.5), (m.bias, -0.2, 0.2))
            with torch.no_grad():
                for tensor, low, high in ranges:
                    tensor.uniform_(low, high, generator=gen)


def randomise_branches(model: nn.Module, gen: torch.Generator) -> None:
    """Branches start at zero output; give them (and the scales alpha/beta) values so fusion has work."""
    for m in model.modules():
        if isinstance(m, IrepConv):
            randomise_bn(m.branches, gen)
            with torch.no_grad():
                m.alpha.copy_(torch.randn(m.alpha.shape, generator=gen))
                m.beta.copy_(torch.randn((), generator=gen))


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def original(name: str, seed: int) -> nn.Module:
    model = torchvision.models.get_model(name, weights=None)
    randomise_bn(model, torch.Generator().manual_seed(seed))
    return model.eval()


def build(name: str, seed: int, ratio: float, size: int) -> Tuple[Dict[str, nn.Module], Dict[str, Any]]:
    """The four networks of one torchvision model, and their parameter counts and fusion error."""
    orig = original(name, seed)
    folded = fuse_model(orig)
    multi = irepify(orig, name="torchvision:" + name, input_size=size)
    code = ArchCode.random(multi.irep_config["backbone"], ratio, seed, ops=multi.irep_config["ops"])
    apply_arch(multi, code, create=True)
    randomise_branches(multi, torch.Generator().manual_seed(seed + 1))
    multi.eval()
    fused = fuse_model(multi)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want, got = multi(x), fused(x)
    info = {"params": {"original": params(orig), "original folded": params(folded), "multi-branch": params(multi),
                       "fused": params(fused)},
            "rewritten_convs": len(multi.irep_report.rewritten), "skipped_convs": len(multi.irep_report.skipped),
            "branches": code.count(), "capacity": code.capacity(),
            "max_rel_error": compare(want, got).rel_error}
    info["params_equal"] = info["params"]["fused"] == info["params"]["original folded"]
    return {"fused": fused, "original folded": folded, "original": orig}, info


def onnx_ops(data: bytes) -> Dict[str, int]:
    return dict(collections.Counter(n.op_type for n in onnx.load_from_string(data).graph.node))


def ort_jobs(models: Dict[str, nn.Module], batches: Sequence[int], size: int, threads: int,
             source: str) -> Tuple[List[Job], Dict[str, Dict[str, int]]]:
    """One onnxruntime CPU job per (variant, batch), every variant exported as ``bench`` exports it;
    also the op counts of each exported graph (does the export fold BN by itself?)."""
    providers = ort_helpers.resolve_providers(["cpu"])
    jobs: List[Job] = []
    ops: Dict[str, Dict[str, int]] = {}
    for variant in VARIANTS:
        data = _to_onnx(Variant(variant, models[variant]), (1, 3, size, size), 17, "auto")
        ops[variant] = onnx_ops(data)
        for batch in batches:
            runner, label, _ = ort_runner(data, (batch, 3, size, size), providers, threads,
                                          "{} {}".format(source, variant))
            jobs.append(Job(variant, label, batch, runner))
    return jobs, ops


def rotated_rounds(jobs: Sequence[Job], rounds: int, warmup_ms: float, duration_s: float,
                   source: str) -> List[List[Samples]]:
    """``run_rounds`` one round at a time, the variants' order rotated each round, so that no variant
    always runs first (right after the warm-up of another session) or last; samples[job][round]."""
    samples: List[List[Samples]] = [[] for _ in jobs]
    for r in range(rounds):
        first = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        order = sorted(range(len(jobs)), key=lambda i: first.index(jobs[i].variant))
        got = run_rounds([jobs[i] for i in order], 1, warmup_ms if r == 0 else min(warmup_ms, 50.0),
                         duration_s / rounds, 1, source=source)
        for i, one in zip(order, got):
            samples[i].extend(one)
    return samples


def ratio_rows(results: Sequence[Result], batches: Sequence[int], spread_warn: float) -> List[Dict[str, Any]]:
    """Each of :data:`RATIOS` per batch: ratio of the medians over all rounds,
    the ratio of each round's medians and their spread (flagged untrusted above ``spread_warn``)."""
    by = {(r.variant, r.batch): r for r in results}
    rows = []
    for batch in batches:
        for top, bottom in RATIOS:
            a, b = by[(top, batch)], by[(bottom, batch)]
            per_round = [x / y for x, y in zip(a.round_medians, b.round_medians)]
            row: Dict[str, Any] = {"batch": batch, "ratio": "{} / {}".format(top, bottom),
                                   "value": a.host.median / b.host.median, "rounds": per_round}
            row["spread"] = spread(per_round) if len(per_round) >= 2 else None
            row["untrusted"] = row["spread"] is not None and row["spread"] > spread_warn
            row["within_target"] = TARGET[0] <= row["value"] <= TARGET[1]
            rows.append(row)
    return rows


def bench_model(name: str, args: argparse.Namespace, batches: Sequence[int]) -> Dict[str, Any]:
    models, info = build(name, args.seed, args.ratio, args.size)
    if not info["params_equal"]:
        raise SystemExit("{}: fused has {:,} parameters, the original with BN folded {:,}: fusion is not "
                         "exact".format(name, info["params"]["fused"], info["params"]["original folded"]))
    if not info["max_rel_error"] <= args.tolerance:
        raise SystemExit("{}: fused differs from multi-branch by {:.2e} (relative), above --tolerance {:g}".format(
            name, info["max_rel_error"], args.tolerance))
    jobs, info["onnx_ops"] = ort_jobs(models, batches, args.size, args.threads, name)
    start = time.perf_counter()
    samples = rotated_rounds(jobs, args.rounds, args.warmup_ms, args.duration, name)
    info["timing_s"] = round(time.perf_counter() - start, 1)
    results = summarise(jobs, samples)
    info["latency"] = [{"variant": r.variant, "backend": r.backend, "batch": r.batch, "median_ms": r.host.median,
                        "min_ms": r.host.min, "cv": r.host.cv, "iterations": r.host.iterations,
                        "round_medians_ms": r.round_medians, "warnings": r.warnings} for r in results]
    info["ratios"] = ratio_rows(results, batches, args.spread_warn)
    print("{}: params {} (fused == folded: {}), max rel err {:.1e}, timed in {} s".format(
        name, info["params"], info["params_equal"], info["max_rel_error"], info["timing_s"]), flush=True)
    for q in info["ratios"]:
        print("  batch {}: {} {:.3f} (rounds {:.3f}-{:.3f}{})".format(
            q["batch"], q["ratio"], q["value"], min(q["rounds"]), max(q["rounds"]),
            ", spread {:.1%}{}".format(q["spread"], ": UNTRUSTED" if q["untrusted"] else "")
            if q["spread"] is not None else ""), flush=True)
    return info


def time_irepify_fuse(name: str, args: argparse.Namespace) -> Dict[str, Any]:
    """Wall time of irepify, of creating a 2/3 code's branches, and of fuse_model on that network."""
    orig = original(name, args.seed)
    runs: Dict[str, List[float]] = {"irepify": [], "apply_arch": [], "fuse_model": [], "irepify + fuse_model": []}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        multi = irepify(orig, name="torchvision:" + name, input_size=args.size)
        t1 = time.perf_counter()
        code = ArchCode.random(multi.irep_config["backbone"], args.ratio, args.seed, ops=multi.irep_config["ops"])
        apply_arch(multi, code, create=True)
        multi.eval()
        t2 = time.perf_counter()
        fuse_model(multi)
        t3 = time.perf_counter()
        for key, value in (("irepify", t1 - t0), ("apply_arch", t2 - t1), ("fuse_model", t3 - t2),
                           ("irepify + fuse_model", (t1 - t0) + (t3 - t2))):
            runs[key].append(value)
    median = {k: statistics.median(v) for k, v in runs.items()}
    print("{}: irepify + fuse_model median {:.2f} s over {} runs".format(
        name, median["irepify + fuse_model"], args.repeats), flush=True)
    return {"model": name, "repeats": args.repeats, "runs_s": runs, "median_s": median,
            "target_s": 2.0, "within_target": median["irepify + fuse_model"] < 2.0}


def fmt_ratio(q: Dict[str, Any]) -> str:
    text = "{:.3f}".format(q["value"])
    if q["spread"] is not None:
        text += " [{:.3f}, {:.3f}], spread {:.1%}{}".format(min(q["rounds"]), max(q["rounds"]), q["spread"],
                                                             " UNTRUSTED" if q["untrusted"] else "")
    return text


def markdown(result: Dict[str, Any]) -> str:
    s, m = result["settings"], result["machine"]
    lines = ["# Your own network: fused irepified torchvision models vs the originals (onnxruntime CPU)", "",
             "Command: `{}` (irep_deploy from {}, commit {})".format(
                 result["command"], result["code"]["irep_deploy"], result["code"]["commit"]), "",
             "Date: {}. Machine: {}; {} logical CPUs shared with other work; onnxruntime {} ({} intra-op "
             "thread(s)), torchvision {}, onnx {}; OMP_NUM_THREADS={}.".format(
                 result["date"], m["cpu"], m["cpu_count"], m["onnxruntime"], s["threads"], m["torchvision"],
                 m["onnx"], s["omp_num_threads"]) + " " + m["summary"] + ".", "",
             "Settings: input {0}x{0}, batches {1}, {2} interleaved rounds, {3} s per model and batch over all rounds "
             "(at least one timed run per round, after one untimed; the variants' order rotates between rounds), "
             "warm-up {4} ms; random code at {5:.3g} of "
             "the capacity (seed {6}); weights random (`weights=None`), BN statistics randomised. Every variant is "
             "exported the same way (opset 17, onnxslim) and checked against torch.".format(
                 s["size"], s["batches"], s["rounds"], s["duration_s"], s["warmup_ms"], s["ratio"], s["seed"]), "",
             "## Parameters and exactness", "",
             "| model | original | original folded | multi-branch (branches/capacity) | fused | fused == folded "
             "| max rel. error fused vs multi-branch |", "|---|---|---|---|---|---|---|"]
    for name, info in result["models"].items():
        p = info["params"]
        lines.append("| {} | {:,} | {:,} | {:,} ({}/{}) | {:,} | {} | {:.1e} |".format(
            name, p["original"], p["original folded"], p["multi-branch"], info["branches"], info["capacity"],
            p["fused"], "yes" if info["params_equal"] else "NO", info["max_rel_error"]))
    lines += ["", "## Latency (median ms per batch) and ratios of medians", "",
              "Ratios: value [min, max of the per-round ratios], spread = (max - min) / median of the per-round "
              "ratios; UNTRUSTED above {:.0%}. Target for fused / original: {}-{}.".format(
                  s["spread_warn"], *TARGET), "",
              "| model | batch | fused | original folded | original | fused / original | fused / original folded "
              "| original / original folded (A/A) |", "|---|---|---|---|---|---|---|---|"]
    for name, info in result["models"].items():
        ms = {(r["variant"], r["batch"]): r["median_ms"] for r in info["latency"]}
        for batch in s["batches"]:
            q = {r["ratio"]: r for r in info["ratios"] if r["batch"] == batch}
            lines.append("| {} | {} | {:.2f} | {:.2f} | {:.2f} | {} |".format(
                name, batch, ms[("fused", batch)], ms[("original folded", batch)], ms[("original", batch)],
                " | ".join(fmt_ratio(q["{} / {}".format(*pair)]) for pair in RATIOS)))
    lines.append("")
    for pair in RATIOS[::2]:
        rows = [q for info in result["models"].values() for q in info["ratios"] if q["ratio"] == " / ".join(pair)]
        lines.append("{} within {}-{}: {} of {} rows; untrusted (spread > {:.0%}): {}.".format(
            " / ".join(pair).capitalize(), TARGET[0], TARGET[1], sum(q["within_target"] for q in rows), len(rows),
            s["spread_warn"], sum(q["untrusted"] for q in rows)))
    same = [name for name, info in result["models"].items()
            if len({json.dumps(v, sort_keys=True) for v in info["onnx_ops"].values()}) == 1
            and "BatchNormalization" not in info["onnx_ops"]["original"]]
    lines += ["", "Models whose three exported graphs have the same op counts and no BatchNormalization node (the "
              "exporter folds BN into the conv in eval mode, so original and original folded run the same graph "
              "in onnxruntime and their ratio is an A/A control, the noise floor of this machine): {}.".format(
                  ", ".join(same) or "none")]
    t = result["irepify_fuse"]
    lines += ["", "## Time of irepify + fuse_model ({}, {} runs, perf_counter around the library calls)".format(
        t["model"], t["repeats"]), "", "| step | median s | runs |", "|---|---|---|"]
    for key, value in t["median_s"].items():
        lines.append("| {} | {:.3f} | {} |".format(key, value, ", ".join("{:.2f}".format(v) for v in t["runs_s"][key])))
    lines += ["", "Target < {} s for irepify + fuse_model: {}. `apply_arch` (creating the code's branches) is "
              "timed apart, outside the target.".format(t["target_s"], "met" if t["within_target"] else "NOT met")]
    warnings = ["{}: {}".format(name, w) for name, info in result["models"].items() for r in info["latency"]
                for w in r["warnings"]]
    if warnings:
        lines += ["", "Warnings:", ""] + ["- " + w for w in warnings]
    return "\n".join(lines) + "\n"


def shown_path(path: Path) -> str:
    """``path`` relative to this checkout when inside it (results files name no machine's directories)."""
    root = RESULTS.parent.parent
    return str(path.relative_to(root)) if root in path.parents else str(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), help="torchvision.models.get_model names")
    p.add_argument("--size", type=int, default=224, help="input height and width")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--duration", type=float, default=7.0, help="seconds per model and batch, over all rounds")
    p.add_argument("--warmup-ms", type=float, default=200.0)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads (1: least noise on a shared box)")
    p.add_argument("--ratio", type=float, default=2 / 3, help="share of the branches the random code turns on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=1e-5, help="largest relative error fused vs multi-branch")
    p.add_argument("--spread-warn", type=float, default=SPREAD_WARN)
    p.add_argument("--fuse-model", default="resnet50", help="model whose irepify + fuse_model is timed")
    p.add_argument("--repeats", type=int, default=5, help="runs of irepify + fuse_model")
    p.add_argument("--quick", action="store_true", help="smoke run: resnet18 at 64x64, batches 1 and 2, 2 rounds")
    p.add_argument("--out", default=str(RESULTS / "irepify_cpu"))
    args = p.parse_args()
    if args.quick:
        args.models, args.size, args.batches, args.rounds, args.duration = ["resnet18"], 64, "1,2", 2, 0.2
        args.warmup_ms, args.fuse_model, args.repeats = 20.0, "resnet18", 2
    unknown = sorted(set(args.models + [args.fuse_model]) - set(torchvision.models.list_models()))
    if unknown:
        p.error("--models/--fuse-model: {} is not a torchvision.models.get_model name".format(unknown[0]))
    batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    models = {name: bench_model(name, args, batches) for name in args.models}
    irepify_fuse = time_irepify_fuse(args.fuse_model, args)
    omp = os.environ.get("OMP_NUM_THREADS")
    machine = describe_machine()
    machine.update(torchvision=torchvision.__version__, onnxruntime=onnxruntime.__version__, onnx=onnx.__version__,
                   numpy=np.__version__)
    package = Path(irep_deploy.__file__).resolve().parent
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=str(package), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, universal_newlines=True).stdout.strip()
    result = {
        "command": ("OMP_NUM_THREADS={} ".format(omp) if omp else "") + "python " + " ".join(
            shlex.quote(a) for a in ["benchmarks/bench_irepify.py"] + sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine,
        "settings": {"size": args.size, "batches": batches, "rounds": args.rounds, "duration_s": args.duration,
                     "warmup_ms": args.warmup_ms, "threads": args.threads, "omp_num_threads": omp,
                     "ratio": args.ratio, "seed": args.seed, "tolerance": args.tolerance,
                     "spread_warn": args.spread_warn, "quick": args.quick},
        "code": {"irep_deploy": shown_path(package), "commit": commit or None},
        "models": models, "irepify_fuse": irepify_fuse,
        "wall_s": round(time.perf_counter() - start, 1)}
    write_results(args.out, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
