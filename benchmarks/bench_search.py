"""Search benchmark (targets: docs/performance.md): what the SuperNet machinery costs, how much fusing
saves when a population is scored, and what the CPU preset needs in memory and time.

1. B-subnet step: one SuperNet step over B codes (forward all B, averaged loss, backward, SGD on the
   weights + Adam on alpha/beta) against the sum of B plain forward/backward passes of the same
   masked networks built standalone (``build_model(..., arch=code)``), same batch. Target <= 1.15x.
2. Population evaluation: every code of a population fused from the SuperNet (``fuse_model(supernet,
   arch=code)``, fusion time included) and evaluated on a validation set, against applying the code
   to the SuperNet and evaluating the multi-branch network. Target >= 3x.
3. Peak memory (max RSS) and wall time of ``irep-deploy search --preset cpu`` in a subprocess.
   Target < 4 GB.

Timings are interleaved (the compared measurements alternate, round by round) and reported as the
median of per-round ratios of adjacent measurements with an interval for it and its spread
(UNTRUSTED above 10 %, the rule of ``irep-deploy bench``), next to an A/A control (the same
measurement taken twice). A target is met only when the ratio's interval, widened by the A/A's
deviation from 1, clears it and both spreads are trusted (``benchstats.judge``). The analysis is recomputed
from the stored samples (``analyse_step``, ``analyse_population``; ``reanalyse.py`` does it for a
stored file). Writes ``results/search_cpu.{json,md}``.

    python benchmarks/bench_search.py                      # the recorded run
    python benchmarks/bench_search.py --quick              # smoke run (seconds)
    python benchmarks/bench_search.py --skip-preset        # sections 1-2 only
    python benchmarks/bench_search.py --skip-population --skip-preset --keep-skipped   # section 1 again,
                                                           # sections 2-3 kept from the file (with their command)
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from _common import describe_machine, write_results
from benchstats import judge, ratio_cell, ratio_stats, verdict_text  # noqa: E402

from irep_deploy import ArchCode, build_model, fuse_model  # noqa: E402
from irep_deploy.data import load_data  # noqa: E402
from irep_deploy.search.des import make_config  # noqa: E402
from irep_deploy.search.supernet import SuperNet, averaged_loss  # noqa: E402

NAME = "resnet18_cifar"
STEP_TARGET = 1.15  # SuperNet step / sum of B plain forward/backward passes, at most
POPULATION_TARGET = 3.0  # multi-branch / fused population evaluation, at least


def clock(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- 1. B-subnet step -------------------------------------------------------------------------------
def step_section(subnets: Sequence[int], width: float, batch: int, rounds: int, steps: int) -> List[Dict[str, Any]]:
    torch.manual_seed(0)
    x = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    criterion = nn.CrossEntropyLoss()
    rows = []
    for b in subnets:
        codes = [ArchCode.random(NAME, ratio=2 / 3, seed=100 + i) for i in range(b)]
        supernet = SuperNet(build_model(NAME, width=width, in_channels=1, num_classes=10, supernet=True)).train()
        w_opt = torch.optim.SGD(supernet.weight_parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        a_opt = torch.optim.Adam(supernet.arch_parameters(), lr=1e-4, betas=(0.5, 0.999))
        standalone = [build_model(NAME, arch=c, width=width, in_channels=1, num_classes=10).train() for c in codes]
        sgd = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4) for m in standalone]

        def supernet_step() -> None:
            w_opt.zero_grad(set_to_none=True)
            a_opt.zero_grad(set_to_none=True)
            loss = averaged_loss(supernet(x, codes), y, criterion)
            loss.backward()
            w_opt.step()
            a_opt.step()

        def plain_fwd_bwd() -> None:  # the target's reference: B forward/backward passes, no optimizer
            for m in standalone:
                m.zero_grad(set_to_none=True)
                criterion(m(x), y).backward()

        def plain_train_steps() -> None:  # B full training steps (forward, backward, SGD step)
            for m, opt in zip(standalone, sgd):
                opt.zero_grad(set_to_none=True)
                criterion(m(x), y).backward()
                opt.step()

        fns = {"supernet_step": supernet_step, "plain_fwd_bwd": plain_fwd_bwd,
               "plain_fwd_bwd_again": plain_fwd_bwd, "plain_train_steps": plain_train_steps}
        for fn in fns.values():  # warm-up: allocator, oneDNN caches, the SuperNet's plan cache
            fn()
        samples: Dict[str, List[float]] = {k: [] for k in fns}
        for r in range(rounds):
            order = list(fns.items()) if r % 2 == 0 else list(reversed(fns.items()))  # no fixed position
            for name, fn in order:
                samples[name].append(clock(lambda: [fn() for _ in range(steps)]) / steps)
        row = analyse_step({"B": b, "branches_per_code": [c.count() for c in codes], "rounds": rounds,
                            "steps_per_sample": steps, "samples_s": samples})
        rows.append(row)
        print("B={}: supernet step {:.1f} ms, sum of plain fwd/bwd {:.1f} ms, ratio {:.3f} [{:.3f}, {:.3f}]; "
              "A/A {:.3f} [{:.3f}, {:.3f}]".format(
                  b, row["ms"]["supernet_step"], row["ms"]["plain_fwd_bwd"], row["step_over_fwd_bwd"]["median"],
                  row["step_over_fwd_bwd"]["min"], row["step_over_fwd_bwd"]["max"], row["aa_control"]["median"],
                  row["aa_control"]["min"], row["aa_control"]["max"]), flush=True)
    return rows


def analyse_step(row: Dict[str, Any]) -> Dict[str, Any]:
    """Medians, ratios and the target's verdict of one B from its stored per-round samples."""
    samples = row["samples_s"]
    row["ms"] = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    row["step_over_fwd_bwd"] = ratio_stats(samples["supernet_step"], samples["plain_fwd_bwd"])
    row["step_over_train_steps"] = ratio_stats(samples["supernet_step"], samples["plain_train_steps"])
    row["aa_control"] = ratio_stats(samples["plain_fwd_bwd_again"], samples["plain_fwd_bwd"])
    row["target"] = judge(row["step_over_fwd_bwd"], row["aa_control"], STEP_TARGET)
    return row


# -- 2. population evaluation -----------------------------------------------------------------------
def population_section(population: int, blocks: Sequence[int], width: float, images: int,
                       batch: int) -> Dict[str, Any]:
    """Each code is timed fused (fuse + evaluate), fused again (A/A) and multi-branch, interleaved."""
    data = load_data("fashion-mnist", val_fraction=0.1, limit=images, parts=("train", "val"))
    xs = torch.stack([data.val[i][0] for i in range(len(data.val))]).split(batch)  # type: ignore[arg-type]
    torch.manual_seed(0)
    supernet = SuperNet(build_model(NAME, width=width, in_channels=1, num_classes=10, supernet=True)).eval()
    template = ArchCode.full(NAME)
    codes = [ArchCode.random(NAME, count=template.budget(2 / 3), seed=1000 + i) for i in range(population)]

    def fused_eval(code: ArchCode) -> Dict[str, float]:
        t0 = time.perf_counter()
        net = fuse_model(supernet.model, arch=code)
        t1 = time.perf_counter()
        with torch.inference_mode():
            for chunk in xs:
                net(chunk)
        t2 = time.perf_counter()
        return {"fuse": t1 - t0, "eval": t2 - t1, "total": t2 - t0}

    def multi_eval(code: ArchCode) -> float:
        t0 = time.perf_counter()
        supernet.activate(code)
        with torch.inference_mode():
            for chunk in xs:
                supernet.model(chunk)
        return time.perf_counter() - t0

    fused_eval(codes[0]), multi_eval(codes[0])  # warm-up
    fused, fused_again, multi, fuse_only = [], [], [], []
    for i, code in enumerate(codes):
        if i % 2 == 0:
            f = fused_eval(code)
            m = multi_eval(code)
            f2 = fused_eval(code)
        else:
            f2 = fused_eval(code)
            m = multi_eval(code)
            f = fused_eval(code)
        fused.append(f["total"])
        fuse_only.append(f["fuse"])
        fused_again.append(f2["total"])
        multi.append(m)
    result = analyse_population({"model": NAME, "width": width, "images": len(data.val),  # type: ignore[arg-type]
                                 "batch": batch, "codes": population, "branches_per_code": codes[0].count(),
                                 "samples_s": {"fused": fused, "fused_again": fused_again, "multi": multi,
                                               "fuse_only": fuse_only}}, blocks)
    for r in result["populations"]:
        print("population {} ({} disjoint groups): multi-branch {:.2f} s, fused {:.2f} s, speedup {:.2f} [{:.2f}, {:.2f}]".format(
            r["population"], r["groups"], r["multi_branch_s"], r["fused_s"], r["speedup"]["median"],
            r["speedup"]["min"], r["speedup"]["max"]), flush=True)
    print("per code: speedup {:.2f} [{:.2f}, {:.2f}], A/A {:.3f} [{:.3f}, {:.3f}], fuse {:.1f} ms of {:.1f} ms".format(
        result["per_code_speedup"]["median"], result["per_code_speedup"]["min"], result["per_code_speedup"]["max"],
        result["per_code_aa_control"]["median"], result["per_code_aa_control"]["min"],
        result["per_code_aa_control"]["max"], result["fuse_s_median"] * 1e3, result["fused_total_s_median"] * 1e3),
        flush=True)
    return result


def analyse_population(result: Dict[str, Any], blocks: Sequence[int]) -> Dict[str, Any]:
    """Per population size P (disjoint groups of P codes, Table-1 style: the time of a whole
    population), the speedup and its A/A control (fused again / fused over the same groups), and the
    per-code figures, from the stored per-code samples."""
    s = result["samples_s"]
    fused, fused_again, multi, fuse_only = s["fused"], s["fused_again"], s["multi"], s["fuse_only"]
    rows = []
    for p in blocks:
        groups = [range(k, k + p) for k in range(0, len(fused) - p + 1, p)]
        per_group = {name: [sum(v[i] for i in g) for g in groups] for name, v in s.items()}
        speedup = ratio_stats(per_group["multi"], per_group["fused"])
        aa = ratio_stats(per_group["fused_again"], per_group["fused"])
        rows.append({"population": p, "groups": len(groups), "multi_branch_s": statistics.median(per_group["multi"]),
                     "fused_s": statistics.median(per_group["fused"]), "speedup": speedup, "aa_control": aa,
                     "target": judge(speedup, aa, POPULATION_TARGET, at_most=False)})
    result.update(populations=rows, per_code_speedup=ratio_stats(multi, fused),
                  per_code_aa_control=ratio_stats(fused_again, fused), fuse_s_median=statistics.median(fuse_only),
                  fused_total_s_median=statistics.median(fused), multi_s_median=statistics.median(multi),
                  fuse_share_of_fused=statistics.median([a / b for a, b in zip(fuse_only, fused)]))
    return result


# -- 3. the CPU preset: peak memory and wall time ---------------------------------------------------
def preset_section(rounds: Optional[int], threads: Optional[int], limit: Optional[int] = None) -> Dict[str, Any]:
    config = make_config("cpu", rounds=rounds, limit=limit)
    run = Path(tempfile.mkdtemp(prefix="bench-search-")) / "run"
    exe = shutil.which("irep-deploy", path=str(Path(sys.executable).parent)) or "irep-deploy"
    cmd = [exe, "search", "--preset", "cpu", "--run-dir", str(run), "--device", "cpu"]
    if rounds is not None:
        cmd += ["--rounds", str(rounds)]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.time()
    marks: List[Dict[str, Any]] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:  # one line per epoch / round (tqdm.write), stamped as it arrives
        marks.append({"t_s": round(time.time() - start, 1), "line": line.strip()})
        print("  [{:6.1f} s] {}".format(marks[-1]["t_s"], line.strip()), flush=True)
    code = proc.wait()
    wall = time.time() - start
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB, largest waited child
    shutil.rmtree(run.parent, ignore_errors=True)
    result = {"command": " ".join(["OMP_NUM_THREADS={}".format(threads)] if threads else []) + " " + " ".join(
                  ["irep-deploy"] + cmd[1:]), "exit_code": code, "rounds": config.rounds,
              "preset_rounds": make_config("cpu").rounds, "total_epochs": config.total_epochs,
              "config": {k: v for k, v in vars(config).items()}, "wall_s": wall, "peak_rss_mib": peak_kb / 1024,
              "peak_rss_note": "max RSS of the search subprocess (getrusage RUSAGE_CHILDREN; previous max {:.0f} MiB)".format(
                  before / 1024), "marks": marks, "threads": threads or torch.get_num_threads()}
    result["extrapolated"] = extrapolate(result)
    print("cpu preset ({} rounds): exit {}, {:.0f} s, peak RSS {:.0f} MiB".format(
        config.rounds, code, wall, result["peak_rss_mib"]), flush=True)
    return result


def extrapolate(q: Dict[str, Any]) -> Optional[Dict[str, float]]:
    """Time of the whole preset from a shortened run: warm-up epoch(s) + rounds x one round."""
    warm = [m["t_s"] for m in q["marks"] if "(warmup)" in m["line"]]
    rounds = [m["t_s"] for m in q["marks"] if m["line"].startswith("round ")]
    if not warm or not rounds:
        return None
    warm_s = warm[-1]
    round_s = (rounds[-1] - warm_s) / len(rounds)
    return {"warmup_s": warm_s, "round_s": round_s, "full_s": warm_s + q["preset_rounds"] * round_s}


def markdown(result: Dict[str, Any]) -> str:
    s = result["settings"]
    lines = ["# Search benchmark (CPU)", "", "Command: `{}`".format(result["command"]), "",
             "Machine: {}".format(result["machine"]["summary"]), ""]
    if result.get("step"):
        lines += ["## B-subnet step vs B standalone forward/backward passes (target <= 1.15x)", "",
                  "{} at width {}, batch {} of 1x28x28 inputs, codes of 2/3 of the branches (random, "
                  "the same codes on both sides); {} interleaved rounds of {} step(s) each.".format(
                      NAME, s["step_width"], s["step_batch"], s["step_rounds"], s["step_steps"]), "",
                  "| B | SuperNet step ms | sum of B fwd/bwd ms | sum of B train steps ms | step / fwd-bwd | "
                  "step / train steps | A/A fwd-bwd / fwd-bwd | <= {}x |".format(STEP_TARGET),
                  "|---|---|---|---|---|---|---|---|"]
        for r in result["step"]:
            ms = r["ms"]
            lines.append("| {} | {:.1f} | {:.1f} | {:.1f} | {} | {} | {} | {} |".format(
                r["B"], ms["supernet_step"], ms["plain_fwd_bwd"], ms["plain_train_steps"],
                ratio_cell(r["step_over_fwd_bwd"]), ratio_cell(r["step_over_train_steps"]), ratio_cell(r["aa_control"]),
                verdict_text(r["target"])))
        lines += ["", "The SuperNet step includes the SGD step of the weights and the Adam step of alpha/beta; "
                  "\"fwd-bwd\" is the target's reference (B forward + backward passes, no optimizer), "
                  "\"train steps\" adds one SGD step per standalone network.", ""]
    if result.get("population"):
        p = result["population"]
        lines += ["## Population evaluation: fuse + evaluate vs multi-branch (target >= 3x)", "",
                  "{} SuperNet at width {}, {} Fashion-MNIST validation images in batches of {}, codes with {} "
                  "branches (2/3); fused time includes `fuse_model(supernet, arch=code)`. {} codes are timed "
                  "once each, interleaved (fused, multi-branch, fused again; order alternating per code); a "
                  "population of P is a disjoint group of P of them, so P = {} is timed once and smaller P "
                  "give several groups.".format(NAME, p["width"], p["images"], p["batch"], p["branches_per_code"],
                                               p["codes"], p["codes"]), "",
                  "| population | groups | multi-branch s | fused (incl. fusion) s | speedup | A/A fused again / fused "
                  "| >= {}x |".format(POPULATION_TARGET), "|---|---|---|---|---|---|---|"]
        for r in p["populations"]:
            lines.append("| {} | {} | {:.2f} | {:.2f} | {} | {} | {} |".format(
                r["population"], r["groups"], r["multi_branch_s"], r["fused_s"], ratio_cell(r["speedup"], "{:.2f}"),
                ratio_cell(r["aa_control"]), verdict_text(r["target"])))
        lines += ["", "Per code: speedup {}; A/A control (fused again / fused) {}; fusing one code takes "
                  "{:.1f} ms, {:.0%} of the fused side's {:.1f} ms (the search's `cpu` preset evaluates "
                  "6000 validation images per code, which makes the fusion share smaller still).".format(
                      ratio_cell(p["per_code_speedup"], "{:.2f}"), ratio_cell(p["per_code_aa_control"]),
                      p["fuse_s_median"] * 1e3, p["fuse_share_of_fused"], p["fused_total_s_median"] * 1e3), ""]
    if result.get("preset"):
        q = result["preset"]
        lines += ["## The `cpu` preset: peak memory (target < 4 GB) and wall time", "",
                  "Command: `{}` ({} of the preset's {} rounds, {} epochs in all, limit {}, {} torch threads); exit code {}.".format(
                      q["command"].strip(), q["rounds"], q["preset_rounds"], q["total_epochs"], q["config"]["limit"],
                      q["threads"], q["exit_code"]), "",
                  "- Peak RSS: **{:.0f} MiB** ({}).".format(q["peak_rss_mib"],
                                                            "< 4 GB: yes" if q["peak_rss_mib"] < 4096 else "< 4 GB: NO"),
                  "- Wall time: {:.0f} s ({:.1f} min).".format(q["wall_s"], q["wall_s"] / 60)]
        est = extrapolate(q)
        if est is not None:
            lines.append("- The whole preset ({} rounds), extrapolated as start-up + warm-up ({:.0f} s) + {} x the "
                         "measured round (epoch + population evaluation, {:.0f} s): **about {:.0f} s ({:.1f} min)** "
                         "on this machine in this run.".format(q["preset_rounds"], est["warmup_s"], q["preset_rounds"],
                                                              est["round_s"], est["full_s"], est["full_s"] / 60))
        if result.get("load_avg"):
            lines.append("- 1-minute load average at start / end of the benchmark: {:.2f} / {:.2f} (2 cores).".format(
                *result["load_avg"]))
        lines += ["",
                  "Per-epoch lines as they arrived:", ""]
        lines += ["    [{:7.1f} s] {}".format(m["t_s"], m["line"]) for m in q["marks"]]
        lines.append("")
    if result.get("kept"):
        lines += ["Sections kept from an earlier run of this file (not rerun): " + "; ".join(
            "{} (`{}`)".format(k, v) for k, v in result["kept"].items()) + ".", ""]
    lines += ["Ratios are the median of per-round (per-code, per-group) ratios of adjacent measurements "
              "[distribution-free interval for that median: order statistics, about 95 % where the rounds "
              "allow, else min-max], then their spread, (max - min) / median, UNTRUSTED above 10 % (the rule "
              "of `irep-deploy bench`). The A/A control times the same thing twice in the same run. A target "
              "is met only when the ratio's interval, widened by the A/A's largest deviation from 1, clears it "
              "and neither spread is UNTRUSTED (`benchstats.judge`); otherwise the verdict says why not."]
    return "\n".join(lines) + "\n"


def keep_skipped(result: Dict[str, Any], path: Path) -> None:
    """Sections this run skipped, copied from the results file at ``path`` with the command that made them."""
    import json
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    kept = dict(old.get("kept", {}))
    for section in ("step", "population", "preset"):
        if section not in result and section in old:
            result[section] = old[section]
            kept[section] = kept.get(section, old["command"])
        else:
            kept.pop(section, None)
    if kept:
        result["kept"] = kept
    reanalyse(result)


def reanalyse(result: Dict[str, Any]) -> Dict[str, Any]:
    """Recompute the ratios and verdicts of sections 1-2 from their stored samples (a file written
    before the trust rule gets it without a rerun)."""
    for row in result.get("step") or []:
        analyse_step(row)
    if result.get("population"):
        analyse_population(result["population"], [r["population"] for r in result["population"]["populations"]])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--subnets", type=int, nargs="+", default=[1, 2, 5])
    parser.add_argument("--step-width", type=float, default=0.25)
    parser.add_argument("--step-batch", type=int, default=32)
    parser.add_argument("--step-rounds", type=int, default=7)
    parser.add_argument("--step-steps", type=int, default=1, help="steps per timed sample")
    parser.add_argument("--pop-codes", type=int, default=64)
    parser.add_argument("--pop-sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--pop-width", type=float, default=0.125, help="the cpu preset's width")
    parser.add_argument("--pop-images", type=int, default=1000)
    parser.add_argument("--pop-batch", type=int, default=500, help="the cpu preset's eval batch")
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("--skip-population", action="store_true")
    parser.add_argument("--skip-preset", action="store_true")
    parser.add_argument("--preset-rounds", type=int, help="shorten the cpu preset (default: its own rounds)")
    parser.add_argument("--preset-limit", type=int, help="shorten the cpu preset's data (default: its own)")
    parser.add_argument("--preset-threads", type=int, help="OMP_NUM_THREADS of the preset subprocess")
    parser.add_argument("--keep-skipped", action="store_true",
                        help="take the skipped sections from the existing results file (each named with its command)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "search_cpu"))
    args = parser.parse_args()
    if args.quick:
        args.subnets, args.step_rounds, args.step_width, args.step_batch = [1, 2], 2, 0.125, 8
        args.pop_codes, args.pop_sizes, args.pop_images = 4, [2, 4], 100
        args.preset_rounds, args.preset_limit = args.preset_rounds or 1, args.preset_limit or 300
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    result: Dict[str, Any] = {"command": "{}python {}".format(
        "OMP_NUM_THREADS={} ".format(os.environ["OMP_NUM_THREADS"]) if "OMP_NUM_THREADS" in os.environ else "",
        " ".join(sys.argv)), "machine": describe_machine(), "settings": settings}
    load_start = os.getloadavg()[0]
    if not args.skip_step:
        result["step"] = step_section(args.subnets, args.step_width, args.step_batch, args.step_rounds, args.step_steps)
    if not args.skip_population:
        result["population"] = population_section(args.pop_codes, args.pop_sizes, args.pop_width, args.pop_images,
                                                  args.pop_batch)
    if not args.skip_preset:
        result["preset"] = preset_section(args.preset_rounds, args.preset_threads, args.preset_limit)
    result["load_avg"] = [load_start, os.getloadavg()[0]]
    if args.keep_skipped:
        keep_skipped(result, Path(args.out).with_suffix(".json"))
    write_results(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
