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
from runs import fmt, mean_std, rounds_text, run_search, run_training  # noqa: E402

from irep_deploy import ArchCode  # noqa: E402
from irep_deploy.search.des import make_config  # noqa: E402

VARIANTS = ("plain", "full", "random", "des")
LABELS = {"plain": "(a) plain backbone (empty code)", "full": "(b) all branches (full code)",
          "random": "(c) random code at C", "des": "(d) DES code at C"}


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
    for v in VARIANTS:
        vals = [r["test_top1"] for r in runs if r["variant"] == v]
        table[v] = {"n": len(vals), "per_seed": {str(r["seed"]): r["test_top1"] for r in runs if r["variant"] == v},
                    **mean_std(vals),
                    "branches": {str(r["seed"]): r["branches"] for r in runs if r["variant"] == v},
                    "train_wall_s": {str(r["seed"]): r["wall_s"] for r in runs if r["variant"] == v}}
    # paired differences (same training seed): DES minus each other variant
    paired: Dict[str, Any] = {}
    by = {(r["variant"], r["seed"]): r["test_top1"] for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    for other in ("plain", "full", "random"):
        diffs = [by[("des", s)] - by[(other, s)] for s in seeds if ("des", s) in by and (other, s) in by]
        paired["des_minus_" + other] = {"per_seed": diffs, **mean_std(diffs)}
    return {"variants": table, "paired": paired}


def markdown(result: Dict[str, Any]) -> str:
    s, summary = result["search"], result["summary"]
    seeds = result["seeds"]
    lines = ["# Evidence that the search works: Fashion-MNIST, CPU scale ({} width {})".format(
                 result["recipe"]["backbone"], result["recipe"]["width"]), "",
             "Command: `{}`".format(result["command"]), "",
             "Machine: {}".format(result["machine"]["summary"]), "",
             "Status: {}".format(result["status"]), "",
             "## Retrained test top-1 (%)", "",
             "| variant | branches | mean +- std | " + " | ".join("seed {}".format(x) for x in seeds) + " |",
             "|---|---|---|" + "---|" * len(seeds)]
    for v in VARIANTS:
        t = summary["variants"][v]
        branches = sorted(set(t["branches"].values()))
        lines.append("| {} | {} | {} | {} |".format(
            LABELS[v], "/".join(map(str, branches)) or "-", fmt(t["mean"], t["std"]),
            " | ".join("{:.2f}".format(t["per_seed"][str(x)]) if str(x) in t["per_seed"] else "-" for x in seeds)))
    lines += ["", "Paired differences (same training seed, percentage points):", ""]
    for k, d in summary["paired"].items():
        lines.append("- {}: {} (per seed: {})".format(k.replace("_", " "), fmt(d["mean"], d["std"]),
                                                     ", ".join("{:+.2f}".format(x) for x in d["per_seed"]) or "-"))
    lines += ["", "std is the sample standard deviation over seeds (n-1).", "", "## Settings", ""]
    if s:
        lines += ["- Search (one DES search, used for every seed of (d)): preset `{}` with overrides {}; "
                  "{} wall s; best validation top-1 (fused, on the search's val split) {:.2f}% with {} of {} "
                  "available branches (budget C = {}).".format(
                      s["preset"], json.dumps(s["overrides"]) if s["overrides"] else "none", s["wall_s"],
                      s["best_fitness_val_top1"], s["best_branches"], s["capacity"], s["budget"]),
                  "- Search config: `{}`".format(json.dumps(s["config"])),
                  "- Search rounds (best / mean validation fitness): " + rounds_text(s["rounds"])]
    lines += ["- Retraining recipe (identical for all four variants): `{}`; the test set is limited by the "
              "same `limit` (a seeded subset of the 10 000 test images; `irep_deploy.data.load_data`).".format(
                  json.dumps(result["recipe"])),
              "- Random codes: `ArchCode.random(backbone, ratio={:.4f}, seed=10000 + seed)`.".format(result["budget_ratio"]),
              "- Wall times (s) of the retraining runs: " + "; ".join(
                  "{} {}".format(v, "/".join(str(x) for x in summary["variants"][v]["train_wall_s"].values()))
                  for v in VARIANTS),
              "- Compute so far (the search and every retraining run, summed over resumed invocations): {:.0f} s; "
              "this invocation: {:.0f} s.".format((s["wall_s"] if s else 0) + sum(r["wall_s"] for r in result["runs"]),
                                                   result["wall_s"]), "",
              "## Reading", "",
              "Seeds vary the retraining (initial weights, data order, augmentation) and the random code; the "
              "DES code comes from a single search, so its spread does not include search-to-search variation. "
              "At this scale (a few epochs on a few thousand images, width {}) differences of about one "
              "standard deviation are not evidence either way.".format(result["recipe"]["width"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--preset", default="cpu", help="search preset (default cpu)")
    parser.add_argument("--search-rounds", type=int, help="override the preset's rounds")
    parser.add_argument("--search-limit", type=int, help="override the preset's limit")
    parser.add_argument("--search-seed", type=int, default=0)
    parser.add_argument("--backbone", help="override the preset's backbone (e.g. vgg16_cifar)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit", type=int, default=5000, help="examples per split for retraining")
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--work-dir", default="runs/evidence_fmnist")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "evidence_fmnist"))
    args = parser.parse_args()

    overrides: Dict[str, Any] = {"seed": args.search_seed}
    if args.backbone:
        overrides["backbone"] = args.backbone
    if args.search_rounds:
        overrides["rounds"] = args.search_rounds
    if args.search_limit:
        overrides["limit"] = args.search_limit
    if args.quick:
        overrides.update(rounds=1, warmup_epochs=0, limit=256, population=4)
        args.epochs, args.limit, args.seeds = 1, 256, args.seeds[:2]
    search_config = make_config(args.preset, **overrides)
    backbone = search_config.backbone
    recipe = {"backbone": backbone, "dataset": search_config.dataset, "width": args.width, "epochs": args.epochs,
              "batch_size": args.batch_size, "lr": args.lr, "limit": args.limit}
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    result: Dict[str, Any] = {"command": "OMP_NUM_THREADS={} python {}".format(
                                  torch.get_num_threads(), " ".join(sys.argv)),
                              "machine": describe_machine(), "seeds": args.seeds, "recipe": recipe,
                              "budget_ratio": search_config.budget, "search": None, "runs": [], "status": "started"}

    def flush(status: str) -> None:
        result["status"] = status
        result["wall_s"] = time.time() - t0
        result["summary"] = summarise(result["runs"])
        write_results(args.out, result, markdown(result))

    result["search"] = run_search(work / "search", args.preset, overrides)
    flush("search done; retraining")
    for seed in args.seeds:
        for variant in VARIANTS:
            arch = code_for(variant, backbone, seed, search_config.budget, result["search"]["code"])
            run = work / "train" / "{}-seed{}".format(variant, seed)
            result["runs"].append(run_training(run, variant, seed, arch, recipe))
            done = len(result["runs"])
            flush("partial: {} of {} retraining runs done".format(done, len(args.seeds) * len(VARIANTS))
                  if done < len(args.seeds) * len(VARIANTS) else "complete")


if __name__ == "__main__":
    main()
