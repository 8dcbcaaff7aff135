"""Ranking fidelity: does the SuperNet's fused fitness rank codes as stand-alone training does? (issue 14)

One DES search; then a set of codes spanning its final population and beyond it: the population's
best and worst, others of it drawn at random, and fresh random codes at the budget (never in the
population). Each code gets

    fitness   its fused top-1 on the search's validation split, scored here with the final SuperNet
              (``supernet.pt``) exactly as the search scores (the population's recorded fitness
              is checked against it)
    recalibrated  the same, each code's BatchNorm statistics first re-estimated on ``--recalibrate``
              training batches (the search's ``recalibrate`` setting: the second proxy)
    accuracy  its test top-1 retrained from scratch, stand-alone, with one recipe, for >= 2 seeds
              (the mean over seeds is ranked)

and the agreement of each proxy is measured with Kendall's tau and Spearman's rho (scipy.stats) with a 95%
percentile bootstrap interval over codes (2000 resamples; the Fisher-z approximation of Kendall's tau,
var(atanh tau) ~ 0.437 / (n - 4), is recorded beside it as a check), and the top-k overlap (k = n / 4)
against the k^2 / n expected by chance. The seed-to-seed Kendall tau of the stand-alone accuracies,
with the same intervals, is the noise ceiling: no proxy can rank codes more consistently than
retraining ranks them itself. ``analyse`` recomputes all of it from the stored runs (``reanalyse.py``).

Resumable like the other accuracy benchmarks (``runs``: finished runs are not redone).

    OMP_NUM_THREADS=1 python benchmarks/ranking.py --jobs 2          # the full protocol
    python benchmarks/ranking.py --quick --work-dir /tmp/rk --out /tmp/rk/res/ranking   # smoke run

Writes ``results/ranking.{json,md}`` and ``results/figures/ranking.png``.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from itertools import combinations
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch

from _common import describe_machine, write_results
from benchstats import bootstrap_interval, fisher_z_tau_interval  # noqa: E402
from runs import run_search, run_training  # noqa: E402
from sweeps import common_flags, pyplot, run_jobs, save_figure  # noqa: E402

from irep_deploy import ArchCode, load_checkpoint  # noqa: E402
from irep_deploy.data import eval_loader, load_data  # noqa: E402
from irep_deploy.evaluation import evaluate_models  # noqa: E402
from irep_deploy.search.des import make_config, recalibration_batches  # noqa: E402
from irep_deploy.search.supernet import SuperNet, fuse_code  # noqa: E402

BOOTSTRAP = 2000


def pick_codes(population: Dict[str, Any], template: ArchCode, budget_ratio: float, n_best: int, n_worst: int,
               n_middle: int, n_random: int, seed: int) -> List[Dict[str, Any]]:
    """Codes of the final population (best first in population.json) and random codes beyond it."""
    codes = [template.with_bits([[int(ch) for ch in row] for row in c["bits"]]) for c in population["codes"]]
    rng = random.Random(seed)
    middle = list(range(n_best, max(n_best, len(codes) - n_worst)))
    chosen = ([("best", i) for i in range(min(n_best, len(codes)))]
              + [("worst", i) for i in range(max(n_best, len(codes) - n_worst), len(codes))]
              + [("population", i) for i in sorted(rng.sample(middle, min(n_middle, len(middle))))])
    out = [{"group": g, "code": codes[i].dumps(), "recorded_fitness": population["codes"][i]["fitness"]}
           for g, i in chosen]
    seen = set(codes)
    while sum(1 for c in out if c["group"] == "random") < n_random:
        code = ArchCode.random(template.backbone, ratio=budget_ratio, seed=rng.getrandbits(63), ops=template.ops)
        if code not in seen:
            seen.add(code)
            out.append({"group": "random", "code": code.dumps(), "recorded_fitness": None})
    return out


def supernet_fitness(search_dir: Path, config: Dict[str, Any], codes: Sequence[ArchCode],
                     recalibrate: int) -> Tuple[List[float], List[float]]:
    """Fused validation top-1 of every code under the final SuperNet, on the search's own split: as the
    search scores it, and with each code's BatchNorm statistics first re-estimated on ``recalibrate``
    training batches (the search's ``recalibrate`` setting)."""
    supernet = SuperNet(load_checkpoint(search_dir / "supernet.pt").build())
    data = load_data(config["dataset"], val_fraction=config["val_fraction"], split_seed=config["split_seed"],
                     limit=config["limit"], parts=("train", "val"))
    batches = recalibration_batches(data.train, config["batch_size"], recalibrate, config["seed"], torch.device("cpu"))
    models = [fuse_code(supernet, code) for code in codes] + [fuse_code(supernet, code, batches) for code in codes]
    results, _, _ = evaluate_models(models, eval_loader(data.val, config["eval_batch_size"]), torch.device("cpu"))
    top1 = [r.top1 for r in results]
    return top1[:len(codes)], top1[len(codes):]


def train_task(job: Dict[str, Any]) -> Dict[str, Any]:
    torch.set_num_threads(job["threads"])
    run = Path(job["work_dir"]) / "train" / "code{}-seed{}".format(job["index"], job["seed"])
    info = run_training(run, job["group"], job["seed"], job["code"], job["recipe"], job["device"], job["workers"])
    return dict(info, index=job["index"])


def _tau(x: Sequence[float], y: Sequence[float]) -> float:
    from scipy import stats
    return float(stats.kendalltau(x, y)[0])


def _rho(x: Sequence[float], y: Sequence[float]) -> float:
    from scipy import stats
    return float(stats.spearmanr(x, y)[0])


def bootstrap(x: Sequence[float], y: Sequence[float], statistic: Any) -> Tuple[float, float]:
    """95% percentile interval of ``statistic`` over codes resampled with replacement."""
    return bootstrap_interval(x, y, statistic, resamples=BOOTSTRAP)


def tau_with_intervals(x: Sequence[float], y: Sequence[float]) -> Dict[str, Any]:
    tau = _tau(x, y)
    return {"kendall_tau": tau, "ci": list(bootstrap(x, y, _tau)), "ci_fisher_z": list(fisher_z_tau_interval(tau, len(x)))}


def top_k_overlap(x: Sequence[float], y: Sequence[float], k: int) -> int:
    """How many of the k codes ranked highest by x are among the k ranked highest by y."""
    top = lambda v: set(sorted(range(len(v)), key=lambda i: -v[i])[:k])  # noqa: E731
    return len(top(x) & top(y))


def analyse(codes: List[Dict[str, Any]], runs: List[Dict[str, Any]], seeds: Sequence[int],
            proxy: str = "fitness") -> Dict[str, Any]:
    """How well ``proxy`` (a key of every code) ranks the codes' mean stand-alone accuracy."""
    acc = {(r["index"], r["seed"]): r["test_top1"] for r in runs}
    done = [i for i in range(len(codes)) if all((i, s) in acc for s in seeds)]
    fitness = [codes[i][proxy] for i in done]
    accuracy = [statistics.mean(acc[i, s] for s in seeds) for i in done]
    out: Dict[str, Any] = {"codes_done": len(done), "fitness": fitness, "accuracy": accuracy}
    if len(done) < 3:
        return out
    k = max(1, len(done) // 4)
    tau = tau_with_intervals(fitness, accuracy)
    out.update(kendall_tau=tau["kendall_tau"], kendall_tau_ci=tau["ci"], kendall_tau_ci_fisher_z=tau["ci_fisher_z"],
               spearman_rho=_rho(fitness, accuracy), spearman_rho_ci=bootstrap(fitness, accuracy, _rho),
               top_k=k, top_k_overlap=top_k_overlap(fitness, accuracy, k), top_k_chance=k * k / len(done),
               seed_tau=[dict(tau_with_intervals([acc[i, a] for i in done], [acc[i, b] for i in done]), seeds=[a, b])
                         for a, b in combinations(seeds, 2)])
    return out


def _interval(ci: Any) -> str:
    """``[lo, hi]``, or ``-`` where there is none (fewer codes than the interval needs, or an old file)."""
    if not ci or ci[0] is None or not all(np.isfinite(ci)):
        return "-"
    return "[{:.3f}, {:.3f}]".format(*ci)


def markdown(result: Dict[str, Any]) -> str:
    a, s = result["analysis"], result["search"]
    lines = ["# Ranking fidelity: SuperNet fused fitness vs stand-alone retrained accuracy", "",
             "Command: `{}`".format(result["command"]), "", "Machine: {}".format(result["machine"]["summary"]), "",
             "Status: {}".format(result["status"]), "",
             "Search: preset `{}`, overrides `{}`; {:.0f} s; best fused validation top-1 {:.2f}%.".format(
                 s["preset"], json.dumps(s["overrides"]), s["wall_s"], s["best_fitness_val_top1"]),
             "Retraining recipe: `{}`, seeds {}.".format(json.dumps(result["recipe"]), result["seeds"]), ""]
    r = result.get("analysis_recalibrated", {})
    if "kendall_tau" in a:
        def row(name: str, key: str) -> str:
            return "| {} | {} | {} |".format(name, *("{:.3f} [{:.3f}, {:.3f}]".format(x[key], *x[key + "_ci"])
                                                     if key in x else "-" for x in (a, r)))
        lines += ["Proxies: the SuperNet's fused fitness as the search scores it (its running BatchNorm "
                  "statistics), and the same with each code's BatchNorm statistics recalibrated on {} training "
                  "batches (`--recalibrate`).".format(result.get("recalibrate", "-")), "",
                  "| measure, value [95% percentile bootstrap interval over codes] | SuperNet fitness | recalibrated |",
                  "|---|---|---|", row("Kendall tau", "kendall_tau"), row("Spearman rho", "spearman_rho"),
                  "| top-{} overlap (chance {:.2f}) | {} | {} |".format(
                      a["top_k"], a["top_k_chance"], a["top_k_overlap"], r.get("top_k_overlap", "-")), "",
                  "Fisher-z interval of Kendall tau (a check of the bootstrap): {}.".format("; ".join(
                      "{} {}".format(name, _interval(x.get("kendall_tau_ci_fisher_z")))
                      for name, x in (("SuperNet fitness", a), ("recalibrated", r)))), "",
                  "Noise ceiling, Kendall tau of stand-alone accuracies between seeds [95% percentile bootstrap "
                  "interval over codes; Fisher-z]: " + ", ".join(
                      "seeds {}/{}: {:.3f} {}; {}".format(p["seeds"][0], p["seeds"][1], p["kendall_tau"],
                                                         _interval(p.get("ci")), _interval(p.get("ci_fisher_z")))
                      for p in a["seed_tau"]) + ". A proxy's tau can be compared with this ceiling only "
                  "through both intervals.", ""]
    lines += ["| # | group | branches | SuperNet fitness % | recalibrated % | test top-1 % per seed | mean |",
              "|---|---|---|---|---|---|---|"]
    by = {(r["index"], r["seed"]): r["test_top1"] for r in result["runs"]}
    for i, c in enumerate(result["codes"]):
        per = [by.get((i, seed)) for seed in result["seeds"]]
        shown = " / ".join("-" if v is None else "{:.2f}".format(v) for v in per)
        mean = "-" if None in per else "{:.2f}".format(statistics.mean(per))
        recal = c.get("fitness_recalibrated")
        lines.append("| {} | {} | {} | {:.2f} | {} | {} | {} |".format(
            i, c["group"], c["branches"], c["fitness"], "-" if recal is None else "{:.2f}".format(recal), shown, mean))
    lines += ["", "Compute: search {:.0f} s, retraining {:.0f} s ({} runs, each run's own wall time); this invocation "
              "{:.0f} s wall with {} jobs (finished runs are read back, not redone).".format(
                  s["wall_s"], sum(r["wall_s"] for r in result["runs"]), len(result["runs"]), result["wall_s"],
                  result["jobs"]), "", "![fitness vs accuracy]({})".format(result["figure"]), ""]
    return "\n".join(lines)


def figure(result: Dict[str, Any], path: Path) -> None:
    by: Dict[int, List[float]] = {}
    for r in result["runs"]:
        by.setdefault(r["index"], []).append(r["test_top1"])
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 4), dpi=120)
    for ax, proxy, analysis, label in ((axes[0], "fitness", "analysis", "SuperNet fitness"),
                                       (axes[1], "fitness_recalibrated", "analysis_recalibrated", "recalibrated")):
        for group, marker in (("best", "^"), ("worst", "v"), ("population", "o"), ("random", "s")):
            idx = [i for i, c in enumerate(result["codes"]) if c["group"] == group and i in by and proxy in c]
            if not idx:
                continue
            xs = [result["codes"][i][proxy] for i in idx]
            ys = [statistics.mean(by[i]) for i in idx]
            err = [[y - min(by[i]) for i, y in zip(idx, ys)], [max(by[i]) - y for i, y in zip(idx, ys)]]
            ax.errorbar(xs, ys, yerr=err, marker=marker, linestyle="none", capsize=2, label=group)
        a = result.get(analysis, {})
        title = "tau {:.2f}, rho {:.2f}".format(a["kendall_tau"], a["spearman_rho"]) if "kendall_tau" in a else ""
        ax.set_title("{} vs stand-alone accuracy; {}".format(label, title), fontsize=9)
        ax.set_xlabel("{}: fused validation top-1 (%)".format(label))
        ax.set_ylabel("retrained test top-1 (%), mean and range over seeds")
    save_figure(fig, axes, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="retraining seeds (>= 2)")
    parser.add_argument("--search-rounds", type=int, default=8)
    parser.add_argument("--search-limit", type=int, default=3000)
    parser.add_argument("--search-seed", type=int, default=0)
    parser.add_argument("--best", type=int, default=4, help="codes from the top of the population")
    parser.add_argument("--worst", type=int, default=4, help="codes from the bottom of the population")
    parser.add_argument("--middle", type=int, default=4, help="other population codes, drawn at random")
    parser.add_argument("--random", type=int, default=4, help="random codes at the budget, outside the population")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit", type=int, default=3000, help="examples per split for retraining")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--recalibrate", type=int, default=8,
                        help="training batches for the second proxy, BatchNorm recalibrated per code (default 8)")
    common_flags(parser, "ranking", "retraining runs in parallel (processes)")
    args = parser.parse_args()
    overrides: Dict[str, Any] = {"seed": args.search_seed, "rounds": args.search_rounds, "limit": args.search_limit}
    if args.quick:
        overrides.update(rounds=1, warmup_epochs=0, limit=256, population=6)
        args.best, args.worst, args.middle, args.random = 2, 2, 1, 2
        args.epochs, args.limit, args.seeds = 1, 256, args.seeds[:2]
    config = make_config(args.preset, **overrides)
    recipe = {"backbone": config.backbone, "dataset": config.dataset, "width": config.width, "epochs": args.epochs,
              "batch_size": args.batch_size, "lr": args.lr, "limit": args.limit}
    work, out = Path(args.work_dir), Path(args.out)
    fig_path = out.parent / "figures" / (out.name + ".png")
    t0 = time.time()
    search = run_search(work / "search", args.preset, overrides, args.device, args.workers)
    population = json.loads((work / "search" / "population.json").read_text())
    template = ArchCode.loads(search["code"])
    codes = pick_codes(population, template, config.budget, args.best, args.worst, args.middle, args.random,
                       args.search_seed)
    parsed = [ArchCode.loads(c["code"]) for c in codes]
    for c, code, f, fr in zip(codes, parsed, *supernet_fitness(work / "search", search["config"], parsed,
                                                               args.recalibrate)):
        c.update(fitness=f, fitness_recalibrated=fr, branches=code.count())
    result: Dict[str, Any] = {"command": "OMP_NUM_THREADS={} python {}".format(torch.get_num_threads(),
                                                                               " ".join(sys.argv)),
                              "machine": describe_machine(), "search": search, "recipe": recipe, "seeds": args.seeds,
                              "codes": codes, "runs": [], "jobs": args.jobs, "status": "started",
                              "recalibrate": args.recalibrate,
                              "figure": "figures/" + fig_path.name}
    jobs = [{"index": i, "group": c["group"], "code": c["code"], "seed": s, "recipe": recipe,
             "work_dir": str(work), "threads": args.threads, "device": args.device, "workers": args.workers}
            for s in args.seeds for i, c in enumerate(codes)]

    def finished(trained: Dict[str, Any]) -> None:
        result["runs"].append(trained)
        n = len(result["runs"])
        result["status"] = "complete" if n == len(jobs) else "partial: {} of {} retraining runs".format(n, len(jobs))
        result["wall_s"] = time.time() - t0
        result["analysis"] = analyse(codes, result["runs"], args.seeds)
        result["analysis_recalibrated"] = analyse(codes, result["runs"], args.seeds, "fitness_recalibrated")
        figure(result, fig_path)
        write_results(str(out), result, markdown(result))

    run_jobs(train_task, jobs, args.jobs, finished)


if __name__ == "__main__":
    main()
