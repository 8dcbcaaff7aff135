"""Evidence that the search works: retrained Fashion-MNIST test accuracy of four codes.

    (a) plain   the backbone with no branch (empty code)
    (b) full    every available branch
    (c) random  a uniformly random code with exactly C = floor(2/3 * capacity) branches (new per seed)
    (d) des     the best code of a real DES search at budget C (``make_config(preset)``)

All four are retrained from scratch with the same recipe (backbone, width, epochs, train limit,
batch, lr, seed) and scored on the (limited) test set, which the search never sees (it scores
codes on a validation split carved out of the training set). Each seed retrains the four
variants with that training seed; (c) draws a new random code per seed.

The run is resumable: every finished search/training lives in ``--work-dir`` (a training run with
``metrics.json`` is not redone, an interrupted search is resumed) and the results files are
rewritten after every finished run, so a partial table exists if the run is cut short.

    OMP_NUM_THREADS=1 nohup python benchmarks/evidence_fmnist.py > evidence.log 2>&1 &   # recorded run
    python benchmarks/evidence_fmnist.py --quick --work-dir /tmp/ev-quick --out /tmp/ev-quick/res  # smoke run

Writes ``results/evidence_fmnist.{json,md}``. No timed assertions: numbers only.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from _common import describe_machine, write_results
from benchstats import holm_table, paired_interval  # noqa: E402
from runs import finished_search, fmt, mean_std, rounds_text, run_search, run_training  # noqa: E402
from sweeps import run_jobs  # noqa: E402

from irep_deploy import ArchCode  # noqa: E402
from irep_deploy.search.des import make_config  # noqa: E402

VARIANTS = ("plain", "full", "random", "des", "rsearch")
LABELS = {"plain": "(a) plain backbone (empty code)", "full": "(b) all branches (full code)",
          "random": "(c) random code at C", "des": "(d) DES code at C",
          "rsearch": "(e) random-search code at C (same compute as (d))"}


def code_for(variant: str, backbone: str, seed: int, budget_ratio: float, des_code: Optional[str]) -> Optional[str]:
    if variant == "plain":
        return None  # TrainConfig(arch=None): the plain backbone
    if variant == "full":
        return ArchCode.full(backbone).dumps()
    if variant == "random":
        return ArchCode.random(backbone, ratio=budget_ratio, seed=10_000 + seed).dumps()
    assert des_code is not None
    return des_code


def summarise(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    table: Dict[str, Any] = {}
    for v in [v for v in VARIANTS if any(r["variant"] == v for r in runs)]:
        vals = [r["test_top1"] for r in runs if r["variant"] == v]
        table[v] = {"n": len(vals), "per_seed": {str(r["seed"]): r["test_top1"] for r in runs if r["variant"] == v},
                    **mean_std(vals),
                    "branches": {str(r["seed"]): r["branches"] for r in runs if r["variant"] == v},
                    "train_wall_s": {str(r["seed"]): r["wall_s"] for r in runs if r["variant"] == v}}
    # paired differences (same training seed): DES minus each other variant; one table, one Holm family
    paired: Dict[str, Any] = {}
    by = {(r["variant"], r["seed"]): r["test_top1"] for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    for a, b in (("des", "plain"), ("des", "full"), ("des", "random"), ("des", "rsearch"), ("full", "plain"),
                 ("random", "plain")):
        diffs = [by[(a, s)] - by[(b, s)] for s in seeds if (a, s) in by and (b, s) in by]
        if not any(v == b for v, _ in by):
            continue
        ci = paired_interval(diffs)
        paired["{}_minus_{}".format(a, b)] = {"per_seed": diffs, **mean_std(diffs), "ci95": [ci["lo"], ci["hi"]],
                                              "p": ci["p"]}
    holm_table(list(paired.values()))
    return {"variants": table, "paired": paired}


def markdown(result: Dict[str, Any]) -> str:
    s, summary = result["search"], result["summary"]
    seeds = result["seeds"]
    lines = ["# Evidence that the search works: Fashion-MNIST, {} ({} width {}, {} training examples)".format(
                 result.get("device", "cpu").upper(), result["recipe"]["backbone"], result["recipe"]["width"],
                 result["recipe"]["limit"] or "all 60 000"), "",
             "Command: `{}`".format(result["command"]), "",
             "Machine: {}".format(result["machine"]["summary"]), "",
             "Status: {}".format(result["status"]), "",
             "## Retrained test top-1 (%)", "",
             "| variant | branches | mean +- std | " + " | ".join("seed {}".format(x) for x in seeds) + " |",
             "|---|---|---|" + "---|" * len(seeds)]
    for v in summary["variants"]:
        t = summary["variants"][v]
        branches = sorted(set(t["branches"].values()))
        lines.append("| {} | {} | {} | {} |".format(
            LABELS[v], "/".join(map(str, branches)) or "-", fmt(t["mean"], t["std"]),
            " | ".join("{:.2f}".format(t["per_seed"][str(x)]) if str(x) in t["per_seed"] else "-" for x in seeds)))
    lines += ["", "Paired differences (same training seed, percentage points): mean +- std, [95% t interval], "
              "reading after Holm's correction over the differences of this table", ""]
    for k, d in summary["paired"].items():
        ci = d.get("ci95", [None, None])
        lines.append("- {}: {} [{}] (per seed: {}): {}".format(
            k.replace("_", " "), fmt(d["mean"], d["std"]),
            "-" if ci[0] is None else "{:+.2f}, {:+.2f}".format(*ci),
            ", ".join("{:+.2f}".format(x) for x in d["per_seed"]) or "-", d.get("reading", "-")))
    lines += ["", "std is the sample standard deviation over seeds (n-1); the interval is mean +- t(0.975, n-1) "
              "std / sqrt(n), unadjusted. The table holds several comparisons, so a difference is shown only "
              "where Holm's step-down correction over all of them keeps p below 0.05; an interval that "
              "contains 0 shows no difference.", ""]
    if result.get("notes"):
        lines += ["## Notes", ""] + ["- " + n for n in result["notes"]] + [""]
    lines += ["## Settings", ""]
    searches = result.get("searches") or ([s] if s else [])
    if searches:
        lines += ["- Searches ({} independent DES searches; retraining seed number i uses search i mod {}): preset "
                  "`{}` with overrides {} (search 0's; the others differ in their seed).".format(
                      len(searches), len(searches), s["preset"],
                      json.dumps(s["overrides"]) if s["overrides"] else "none")]
        for k, x in enumerate(searches):
            lines.append("  - search {} (seed {}): {} wall s; best validation top-1 (fused, on the search's val "
                         "split) {:.2f}% with {} of {} available branches (budget C = {}); rounds (best / mean): {}"
                         .format(k, x["config"]["seed"], x["wall_s"], x["best_fitness_val_top1"],
                                 x["best_branches"], x["capacity"], x["budget"], rounds_text(x["rounds"])))
        lines.append("- Search config (search 0): `{}`".format(json.dumps(s["config"])))
    lines += ["- Retraining recipe (identical for every variant): `{}`; the test set is limited by the "
              "same `limit` (a seeded subset of the 10 000 test images; `irep_deploy.data.load_data`; no limit: "
              "all of them).".format(json.dumps(result["recipe"])),
              "- Random codes: `ArchCode.random(backbone, ratio={:.4f}, seed=10000 + seed)`.".format(result["budget_ratio"]),
              "- Wall times (s) of the retraining runs: " + "; ".join(
                  "{} {}".format(v, "/".join(str(x) for x in summary["variants"][v]["train_wall_s"].values()))
                  for v in summary["variants"]),
              "- Compute so far (the search and every retraining run, summed over resumed invocations): {:.0f} s; "
              "this invocation: {:.0f} s{}.".format(
                  sum(x["wall_s"] for x in searches) + sum(r["wall_s"] for r in result["runs"]), result["wall_s"],
                  "" if result.get("jobs", 1) == 1 else " with {} runs in parallel (each run's wall time includes "
                  "the contention)".format(result["jobs"])), "",
              "## Reading", "",
              "Seeds vary the retraining (initial weights, data order, augmentation) and the random code; with "
              "one search the DES code is the same for every seed, so its spread does not include search-to-search "
              "variation (with several, it does). A difference is evidence only where it survives Holm's "
              "correction over the table."]
    return "\n".join(lines) + "\n"


def train_task(job: Dict[str, Any]) -> Dict[str, Any]:
    """One retraining run (variant, seed), in a worker process."""
    torch.set_num_threads(job["threads"])
    return run_training(Path(job["run"]), job["variant"], job["seed"], job["arch"], job["recipe"], job["device"],
                        job["workers"])


def search_task(job: Dict[str, Any]) -> Dict[str, Any]:
    """One DES search, in a worker process."""
    torch.set_num_threads(job["threads"])
    return dict(run_search(Path(job["run"]), job["preset"], job["overrides"], job["device"], job["workers"]),
                index=job["index"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="retraining seeds")
    parser.add_argument("--searches", type=int, default=1,
                        help="independent DES searches (search seeds --search-seed, +1, ...); retraining seed "
                             "number i uses the code of search i mod N (default 1)")
    parser.add_argument("--preset", default="cpu", help="search preset (default cpu)")
    parser.add_argument("--search-rounds", type=int, help="override the preset's rounds")
    parser.add_argument("--search-limit", type=int, help="override the preset's limit")
    parser.add_argument("--search-set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="more search settings (SearchConfig fields, JSON values), e.g. population=32 width=1.0")
    parser.add_argument("--search-seed", type=int, default=0)
    parser.add_argument("--backbone", help="override the preset's backbone (e.g. vgg16_cifar)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit", type=int, default=5000, help="examples per split for retraining (0: every example)")
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                        help="mixed precision of searches and retraining (CUDA; default none)")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes; searches first)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--device", default="cpu", help="where the runs go (default cpu)")
    parser.add_argument("--workers", type=int, default=0, help="data-loading processes per run (default 0)")
    parser.add_argument("--searches-in", metavar="DIR",
                        help="take the searches from search_phase.py's work dir instead of running them: retraining "
                             "seed s uses DIR/des-seed<s> for (d) and DIR/random-seed<s> for (e), random search "
                             "at the same compute (one independent search per seed)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--work-dir", default="runs/evidence_fmnist")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "evidence_fmnist"))
    args = parser.parse_args()

    overrides: Dict[str, Any] = {}
    if args.backbone:
        overrides["backbone"] = args.backbone
    if args.search_rounds:
        overrides["rounds"] = args.search_rounds
    if args.search_limit:
        overrides["limit"] = args.search_limit
    for item in args.search_set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except ValueError:
            overrides[key] = value
    if args.amp != "none":
        overrides["amp"] = args.amp
    if args.quick:
        overrides.update(rounds=1, warmup_epochs=0, limit=256, population=4)
        args.epochs, args.limit, args.seeds = 1, 256, args.seeds[:2]
    search_config = make_config(args.preset, **overrides)  # bad settings stop here, before any run
    backbone = search_config.backbone
    recipe: Dict[str, Any] = {"backbone": backbone, "dataset": search_config.dataset, "width": args.width,
                              "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                              "limit": args.limit or None}
    if args.amp != "none":
        recipe["amp"] = args.amp
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    result: Dict[str, Any] = {"command": "OMP_NUM_THREADS={} python {}".format(
                                  torch.get_num_threads(), " ".join(sys.argv)),
                              "machine": describe_machine(), "device": args.device, "jobs": args.jobs,
                              "seeds": args.seeds, "recipe": recipe, "budget_ratio": search_config.budget,
                              "searches": [], "search": None, "runs": [], "status": "started"}
    variants = VARIANTS if args.searches_in else VARIANTS[:4]
    total = (0 if args.searches_in else args.searches) + len(args.seeds) * len(variants)

    def flush() -> None:
        done = (0 if args.searches_in else len(result["searches"])) + len(result["runs"])
        result["status"] = "complete" if done == total else "partial: {} of {} runs done".format(done, total)
        result["wall_s"] = time.time() - t0
        result["summary"] = summarise(result["runs"])
        write_results(args.out, result, markdown(result))

    def search_done(info: Dict[str, Any]) -> None:
        result["searches"] = sorted(result["searches"] + [info], key=lambda x: x["index"])
        result["search"] = result["searches"][0]
        flush()

    common = {"threads": args.threads, "device": args.device, "workers": args.workers}
    rsearch: Dict[int, str] = {}
    if args.searches_in:
        for index, seed in enumerate(args.seeds):
            found = {arm: finished_search(Path(args.searches_in) / "{}-seed{}".format(arm, seed))
                     for arm in ("des", "random")}
            result["searches"].append(dict(found["des"], index=index))
            rsearch[seed] = found["random"]["code"]
        result["search"] = result["searches"][0]
    else:
        search_seeds = [args.search_seed + k for k in range(args.searches)]
        run_jobs(search_task, [dict(common, index=k, preset=args.preset, overrides=dict(overrides, seed=seed),
                                    run=str(work / ("search" if k == 0 else "search{}".format(k))))
                               for k, seed in enumerate(search_seeds)], args.jobs, search_done)
    codes = [s["code"] for s in result["searches"]]
    jobs = []
    for i, seed in enumerate(args.seeds):
        for variant in variants:
            arch = rsearch[seed] if variant == "rsearch" else code_for(variant, backbone, seed, search_config.budget,
                                                                       codes[i % len(codes)])
            jobs.append(dict(common, variant=variant, seed=seed, recipe=recipe, arch=arch,
                             run=str(work / "train" / "{}-seed{}".format(variant, seed))))
    order = {(j["variant"], j["seed"]): n for n, j in enumerate(jobs)}

    def trained(info: Dict[str, Any]) -> None:
        result["runs"] = sorted(result["runs"] + [info], key=lambda r: order[r["variant"], r["seed"]])
        flush()

    # the slowest runs (most branches) first, so that parallel jobs end together
    jobs.sort(key=lambda j: -(ArchCode.loads(j["arch"]).count() if j["arch"] else 0))
    run_jobs(train_task, jobs, args.jobs, trained)


if __name__ == "__main__":
    main()
