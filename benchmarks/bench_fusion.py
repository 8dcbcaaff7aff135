"""Fusion benchmark (targets: docs/performance.md): is the fused network as fast as the plain backbone, how much faster
than the multi-branch one, and how cheap is fusing compared with evaluating?

All figures are ratios of medians measured in one run, with the models timed in interleaved rounds
so that load from other processes hits them alike. Each ratio carries its per-round spread (UNTRUSTED
above 10 %, the rule of ``irep-deploy bench``) and an interval for its median; the target fused /
plain <= 1.02 is judged against the A/A control of the same run (``benchstats.judge``). Writes
``results/fusion_cpu.{json,md}``.

    python benchmarks/bench_fusion.py                 # the recorded run (CPU, a few minutes)
    python benchmarks/bench_fusion.py --quick         # smoke run
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn as nn
import torchvision
from torch.utils.benchmark import Timer

from _common import describe_machine, write_results
from benchstats import judge, ratio_cell, ratio_stats, verdict_text  # noqa: E402

from irep_deploy import ArchCode, build_model, fuse_model  # noqa: E402


TARGET = 1.02  # fused / plain, docs/performance.md


def interleaved_samples(models: Dict[str, nn.Module], x: torch.Tensor, rounds: int,
                        min_time: float) -> Dict[str, List[float]]:
    """Seconds per forward of each model in each of ``rounds`` round-robin passes."""
    samples: Dict[str, List[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():  # warm-up (allocator, oneDNN primitive caches)
            m(x)
        for _ in range(rounds):
            for name, m in models.items():
                t = Timer("m(x)", globals={"m": m, "x": x}, num_threads=torch.get_num_threads())
                samples[name].append(t.blocked_autorange(min_run_time=min_time).median)
    return samples


def median(values: List[float]) -> float:
    return statistics.median(values)


def latency_section(name: str, size: int, batches: List[int], rounds: int, min_time: float) -> List[dict]:
    code = ArchCode.random(name, ratio=2 / 3, seed=0)
    multi = build_model(name, arch=ArchCode.full(name)).eval()
    fused = fuse_model(build_model(name, arch=code).eval())
    plain = fuse_model(build_model(name).eval())  # plain backbone, BN folded the same way
    plain_again = copy.deepcopy(plain)  # A/A control: the same network timed twice shows the noise
    tv = getattr(torchvision.models, name)(weights=None).eval()  # torchvision eager, BN not folded
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, size, size)
        t = interleaved_samples({"multi_branch_all": multi, "fused": fused, "plain_folded": plain,
                                 "plain_folded_again": plain_again, "torchvision": tv}, x, rounds, min_time)
        rows.append({
            "model": name, "input": size, "batch": batch, "rounds": rounds,
            "ms": {k: median(v) * 1e3 for k, v in t.items()},
            "fused_over_plain_folded": ratio_stats(t["fused"], t["plain_folded"]),
            "aa_control_plain_over_plain": ratio_stats(t["plain_folded_again"], t["plain_folded"]),
            "fused_over_torchvision": ratio_stats(t["fused"], t["torchvision"]),
            "multi_branch_speedup": ratio_stats(t["multi_branch_all"], t["fused"]),
        })
        rows[-1]["target"] = judge(rows[-1]["fused_over_plain_folded"], rows[-1]["aa_control_plain_over_plain"],
                                   TARGET)
        print("{} b{}: ".format(name, batch) + ", ".join("{} {:.2f} ms".format(k, median(v) * 1e3)
                                                        for k, v in t.items()), flush=True)
    return rows


def fuse_cost_section(images: int, repeats: int) -> dict:
    """Fusing one code of a SuperNet (what the search does per code per round) vs evaluating the
    fused network on ``images`` CIFAR-size images."""
    name = "resnet18_cifar"
    supernet = build_model(name, supernet=True).eval()
    code = ArchCode.random(name, ratio=2 / 3, seed=0)

    def timed(fn: Callable[[], object]) -> float:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best

    fuse_s = timed(lambda: fuse_model(supernet, arch=code))
    fused = fuse_model(supernet, arch=code)
    data = torch.randn(images, 3, 32, 32)

    def evaluate() -> None:
        with torch.inference_mode():
            for chunk in data.split(250):
                fused(chunk)

    eval_s = timed(evaluate)
    print("fuse {:.3f} s vs evaluate {} images {:.3f} s".format(fuse_s, images, eval_s), flush=True)
    return {"model": name, "code_branches": code.count(), "images": images, "fuse_s": fuse_s,
            "evaluate_s": eval_s, "fuse_over_evaluate": fuse_s / eval_s}


def markdown(result: dict) -> str:
    lines = ["# Fusion benchmark (CPU, torch eager)", "",
             "Command: `{}`".format(result["command"]), "", "Machine: {}".format(result["machine"]["summary"]), "",
             "| model | input | batch | multi-branch (all) ms | fused ms | plain folded ms | torchvision ms "
             "| fused / plain | A/A plain / plain | fused / torchvision | multi-branch / fused | fused / plain <= {} |"
             .format(TARGET), "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["latency"]:
        ms = r["ms"]
        lines.append("| {} | {} | {} | {:.2f} | {:.2f} | {:.2f} | {:.2f} | {} | {} | {} | {} | {} |".format(
            r["model"], r["input"], r["batch"], ms["multi_branch_all"], ms["fused"], ms["plain_folded"],
            ms["torchvision"], ratio_cell(r["fused_over_plain_folded"]), ratio_cell(r["aa_control_plain_over_plain"]),
            ratio_cell(r["fused_over_torchvision"]), ratio_cell(r["multi_branch_speedup"], "{:.2f}"),
            verdict_text(r["target"]) if "target" in r else "-"))
    fc = result["fuse_cost"]
    lines += ["", "Fusing one {code_branches}-branch code of a {model} SuperNet: {fuse_s:.3f} s; evaluating the fused "
              "network on {images} images: {evaluate_s:.3f} s; ratio {ratio:.2%}.".format(ratio=fc["fuse_over_evaluate"], **fc),
              "", "\"plain folded\" is the backbone with no branches, BN folded like the fused model; \"torchvision\" is "
              "`torchvision.models.<name>()` in eager mode with separate BN. Latencies are medians over interleaved "
              "rounds; a ratio is the median of per-round ratios [distribution-free interval for that median: "
              "order statistics, about 95 % where the rounds allow, else min-max], then its spread, (max - min) / "
              "median, UNTRUSTED above 10 % (the rule of `irep-deploy bench`). \"A/A\" times the plain network "
              "against an identical copy of itself, same run: the noise floor. The target is met only when the "
              "ratio's interval, widened by the A/A's largest deviation from 1, lies below it and no spread is "
              "UNTRUSTED (`benchstats.judge`)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "fusion_cpu"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.quick:
        latency = latency_section("resnet18", 64, [1, 4], rounds=3, min_time=0.05)
        cost = fuse_cost_section(100, 1)
    else:
        latency = latency_section("resnet18", 224, [1, 32], rounds=11, min_time=0.2)
        cost = fuse_cost_section(1000, 3)
    result = {"command": "python " + " ".join(sys.argv), "machine": describe_machine(),
              "latency": latency, "fuse_cost": cost}
    write_results(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
