"""Accuracy vs budget ratio (paper Table 5) at CPU scale, on Fashion-MNIST.

For every budget ratio C / (available branches) in ``--ratios`` one DES search runs at that budget
(preset ``cpu`` with the overrides given), and its best code is retrained from scratch with one
recipe for every ratio, once per training seed. Ratio 0 is the plain backbone (no search: the
empty code is the only one). With ``--random`` a uniformly random code with exactly C branches is
retrained next to each DES code, as a control. Test accuracy is measured on the (limited) test
set, which the search never sees.

Independent ratios run in parallel with ``--jobs`` (one process each, ``--threads`` torch threads
each); every search and training is resumable (``benchmarks/runs.py``) and the results files are
rewritten after every finished ratio.

    python benchmarks/budget_sweep.py --jobs 2                 # the recorded run (about 40 min on 2 cores)
    python benchmarks/budget_sweep.py --quick --work-dir /tmp/bs --out /tmp/bs/res   # smoke run

Writes ``results/budget_sweep.{json,md}`` and ``results/figures/budget_sweep.png``.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import multiprocessing
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any, Dict

import torch

from _common import describe_machine, write_results
from runs import checkpoint_params, fmt, mean_std, rounds_text, run_search, run_training  # noqa: E402

from irep_deploy import ArchCode  # noqa: E402
from irep_deploy.search.des import make_config  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_RATIOS = ("0", "1/6", "1/3", "1/2", "2/3", "5/6", "1")


def slug(ratio: str) -> str:
    return "ratio-" + ratio.replace("/", "_")


def ratio_task(job: Dict[str, Any]) -> Dict[str, Any]:
    """One row of the table: search at the ratio (unless 0), then retrain per seed. Runs in a worker."""
    torch.set_num_threads(job["threads"])
    ratio, work, recipe = job["ratio"], Path(job["work_dir"]) / slug(job["ratio"]), job["recipe"]
    value = float(Fraction(ratio))
    backbone = recipe["backbone"]
    row: Dict[str, Any] = {"ratio": ratio, "value": value, "search": None, "des": [], "random": []}
    if value == 0:
        arch = None
    else:
        row["search"] = run_search(work / "search", job["preset"], dict(job["overrides"], budget=value))
        arch = row["search"]["code"]
    for seed in job["seeds"]:
        row["des"].append(run_training(work / "train-seed{}".format(seed), "des", seed, arch, recipe))
        if job["random"] and value > 0:
            code = ArchCode.random(backbone, ratio=value, seed=10_000 + seed).dumps()
            row["random"].append(run_training(work / "random-seed{}".format(seed), "random", seed, code, recipe))
    params = checkpoint_params(Path(row["des"][0]["run_dir"]))
    row["train_params"], row["deploy_params"] = params["trained"], params["deployed"]
    return row


def summarise(row: Dict[str, Any]) -> Dict[str, Any]:
    out = {"des": mean_std([r["test_top1"] for r in row["des"]]),
           "random": mean_std([r["test_top1"] for r in row["random"]])}
    out["fused_equals_multi_branch"] = all(r["fused_test_top1"] == r["test_top1"] for r in row["des"] + row["random"])
    return out


def markdown(result: Dict[str, Any]) -> str:
    seeds, rows = result["seeds"], result["rows"]
    capacity = ArchCode.full(result["recipe"]["backbone"]).capacity()
    lines = ["# Accuracy vs budget ratio (paper Table 5 style): Fashion-MNIST, CPU scale ({} width {})".format(
                 result["recipe"]["backbone"], result["recipe"]["width"]), "",
             "Command: `{}`".format(result["command"]), "",
             "Machine: {}".format(result["machine"]["summary"]), "",
             "Status: {}".format(result["status"]), "",
             "## Retrained test top-1 (%) of the DES code found at each budget", "",
             "| budget ratio | C (of {}) | DES branches | search val top-1 | test top-1 mean +- std | ".format(capacity)
             + " | ".join("seed {}".format(s) for s in seeds)
             + (" | random code at C, mean +- std" if result["random"] else "") + " | params trained | search s |",
             "|---|---|---|---|---|" + "---|" * len(seeds) + ("---|" if result["random"] else "") + "---|---|"]
    for row in sorted(rows, key=lambda r: r["value"]):
        s, summ = row["search"], row["summary"]
        per_seed = {r["seed"]: r["test_top1"] for r in row["des"]}
        cells = [row["ratio"], str(s["budget"]) if s else "0", str(s["best_branches"]) if s else "0 (plain)",
                 "{:.2f}".format(s["best_fitness_val_top1"]) if s else "-",
                 fmt(summ["des"]["mean"], summ["des"]["std"])]
        cells += ["{:.2f}".format(per_seed[x]) if x in per_seed else "-" for x in seeds]
        if result["random"]:
            cells.append(fmt(summ["random"]["mean"], summ["random"]["std"]) if row["random"] else "-")
        cells += ["{:,}".format(row["train_params"]), "{:.0f}".format(s["wall_s"]) if s else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    deploy = sorted({r["deploy_params"] for r in rows})
    lines += ["", "Every row deploys as the same plain network ({} parameters after fusion), so the budget only "
              "changes training cost and accuracy, never latency. Fused test accuracy equals the multi-branch "
              "one in every run: {}.".format(
                  "/".join("{:,}".format(d) for d in deploy),
                  "yes" if all(r["summary"]["fused_equals_multi_branch"] for r in rows) else "NO (see the JSON)"),
              "", "std is the sample standard deviation over training seeds (n-1); every DES code comes from one "
              "search (seed {}), so the spread does not include search-to-search variation.".format(
                  result["overrides"].get("seed", 0)),
              "", "## Settings", "",
              "- Search: preset `{}` with overrides {} and `budget` set per row.".format(
                  result["preset"], result["overrides"]),
              "- Retraining recipe (every row and seed): `{}`.".format(result["recipe"])]
    for row in sorted(rows, key=lambda r: r["value"]):
        if row["search"]:
            lines.append("- Ratio {} search rounds (best / mean validation fitness): {}".format(
                row["ratio"], rounds_text(row["search"]["rounds"])))
    lines += ["- Compute (searches and trainings, summed): {:.0f} s; wall time of this invocation: {:.0f} s "
              "with {} parallel jobs.".format(result["compute_s"], result["wall_s"], result["jobs"]), "",
              "![accuracy vs budget ratio]({})".format(result["figure"])]
    return "\n".join(lines) + "\n"


def figure(result: Dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(result["rows"], key=lambda r: r["value"])
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for key, label, marker in (("des", "DES code", "o"), ("random", "random code", "s")):
        xs = [r["value"] for r in rows if r[key]]
        if not xs:
            continue
        means = [r["summary"][key]["mean"] for r in rows if r[key]]
        stds = [r["summary"][key]["std"] or 0.0 for r in rows if r[key]]
        ax.errorbar(xs, means, yerr=stds, marker=marker, capsize=3, label=label)
        for r in rows:
            for run in r[key]:
                ax.plot(r["value"], run["test_top1"], marker=".", color="grey", alpha=0.5, linestyle="none")
    ax.set_xlabel("budget ratio C / available branches (0 = plain backbone)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("Accuracy vs budget, {} on Fashion-MNIST".format(result["recipe"]["backbone"]), fontsize=10)
    ax.grid(True, color="#e0e0e0")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path))
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", nargs="+", default=list(DEFAULT_RATIOS),
                        help="budget ratios as fractions (0 = plain backbone); default: %(default)s")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds")
    parser.add_argument("--random", action="store_true", help="also retrain a random code at each budget")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--search-rounds", type=int, default=3)
    parser.add_argument("--search-limit", type=int, default=3000)
    parser.add_argument("--search-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit", type=int, default=3000, help="examples per split for retraining")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--jobs", type=int, default=1, help="ratios run in parallel (processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--work-dir", default="runs/budget_sweep")
    parser.add_argument("--out", default=str(RESULTS / "budget_sweep"))
    args = parser.parse_args()
    for r in args.ratios:
        try:
            ok = 0 <= Fraction(r) <= 1
        except ValueError:
            ok = False
        if not ok:
            parser.error("--ratios: {!r} is not a fraction in [0, 1]".format(r))
    overrides: Dict[str, Any] = {"seed": args.search_seed, "rounds": args.search_rounds, "limit": args.search_limit}
    if args.quick:
        overrides.update(rounds=1, warmup_epochs=0, limit=256, population=4)
        args.epochs, args.limit, args.seeds = 1, 256, args.seeds[:1]
    config = make_config(args.preset, **overrides)
    recipe = {"backbone": config.backbone, "dataset": config.dataset, "width": config.width, "epochs": args.epochs,
              "batch_size": args.batch_size, "lr": args.lr, "limit": args.limit}
    out = Path(args.out)
    fig_path = out.parent / "figures" / (out.name + ".png")
    result: Dict[str, Any] = {"command": "python " + " ".join(sys.argv), "machine": describe_machine(),
                              "preset": args.preset, "overrides": overrides, "recipe": recipe, "seeds": args.seeds,
                              "random": args.random, "jobs": args.jobs, "threads_per_job": args.threads,
                              "rows": [], "status": "started"}
    jobs = [{"ratio": r, "work_dir": args.work_dir, "recipe": recipe, "preset": args.preset, "overrides": overrides,
             "seeds": args.seeds, "random": args.random, "threads": args.threads} for r in args.ratios]
    # the costliest rows (most branches) first, so parallel workers finish close together
    jobs.sort(key=lambda j: -float(Fraction(j["ratio"])))
    t0 = time.time()
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked OpenMP state
    with futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        pending = [pool.submit(ratio_task, j) for j in jobs]
        for done in futures.as_completed(pending):
            row = done.result()
            row["summary"] = summarise(row)
            result["rows"].append(row)
            result["status"] = ("complete" if len(result["rows"]) == len(jobs)
                                else "partial: {} of {} ratios done".format(len(result["rows"]), len(jobs)))
            result["wall_s"] = time.time() - t0
            result["compute_s"] = sum((r["search"]["wall_s"] if r["search"] else 0)
                                      + sum(x["wall_s"] for x in r["des"] + r["random"]) for r in result["rows"])
            figure(result, fig_path)
            result["figure"] = "figures/" + fig_path.name
            write_results(str(out), result, markdown(result))
            print("ratio {} done: test top-1 {}".format(row["ratio"], fmt(row["summary"]["des"]["mean"],
                                                                          row["summary"]["des"]["std"])), flush=True)


if __name__ == "__main__":
    main()
