"""Does the search phase work? DES vs undirected evolution vs random search at equal compute (issue 14).

    des         Algorithm 1 (``--strategy des --sampler directional``)
    undirected  the same evolution, its SuperNet-sampled share drawn uniformly (``--sampler uniform``)
    random      random search: every round scores fresh random codes at the budget (``--strategy random``)
    des-recal, random-recal   des and random with every code's BatchNorm statistics recalibrated on
                RECALIBRATE training batches before it is scored (``--recalibrate``); not run by default

Every arm runs the same searches (preset, overrides, SuperNet training, population size, rounds) for
each search seed, so every round costs the same epochs and evaluates the same number of codes
(``population``): codes evaluated after round r = r * population for all three. A seed fixes the
SuperNet's initial weights, the data order and the initial population, which all arms share, so
arms are compared paired by seed.

Per round and per codes evaluated: the best and the mean fused validation fitness of the round's
population, and the best so far. The paper's claim "DES converges faster" is tested as stated:
for each pair of arms scored alike (PAIRS) and each seed, the level is the best-so-far fitness both
reach by their last round (the lower of their final best-so-far values); each arm's cost is the number
of codes it evaluated before its best so far first reached that level. The reference (DES) minus the
other arm, paired by seed, with a 95% t interval (n - 1 degrees of freedom); negative means DES got
there with fewer evaluations. The area under the best-so-far curve (its mean over rounds) is the
second measure and the final best so far the third, higher is better for both. The table holds
several comparisons (pairs x measures): a verdict other than "no difference shown" needs Holm's
correction over all of them to keep p below 0.05. ``--baseline FILE`` adds the same comparisons of
another results file's arms restricted to this run's seeds (like-for-like: the same seeds, though a
recalibrated arm's fitness is on another scale than an unrecalibrated one's).

Resumable like the other accuracy benchmarks (``runs.run_search``: a finished search is not redone).

    OMP_NUM_THREADS=1 python benchmarks/search_phase.py --jobs 2 --rounds 6       # the recorded protocol
    OMP_NUM_THREADS=1 python benchmarks/search_phase.py --arms des-recal random-recal --seeds 0 1 2 --rounds 6 \
        --jobs 2 --baseline benchmarks/results/search_phase.json \
        --out benchmarks/results/search_phase_recal                                # the recalibrated pair
    python benchmarks/search_phase.py --quick --work-dir /tmp/sp --out /tmp/sp/res/search_phase  # smoke run

Writes ``results/search_phase.{json,md}`` and ``results/figures/search_phase.png``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from _common import describe_machine, write_results
from benchstats import holm_table, paired_interval  # noqa: E402
from runs import interval, run_search  # noqa: E402
from sweeps import common_flags, pyplot, run_jobs, save_figure  # noqa: E402

from irep_deploy.search.des import make_config  # noqa: E402

RECALIBRATE = 8  # training batches per code (ranking.py measures what this does to the proxy)

#: arm -> the SearchConfig settings that make it
ARMS: Dict[str, Dict[str, Any]] = {
    "des": {"strategy": "des", "sampler": "directional"},
    "undirected": {"strategy": "des", "sampler": "uniform"},
    "random": {"strategy": "random", "sampler": "directional"},
    # the same two searches with every code's BatchNorm statistics recalibrated before it is scored
    "des-recal": {"strategy": "des", "sampler": "directional", "recalibrate": RECALIBRATE},
    "random-recal": {"strategy": "random", "sampler": "directional", "recalibrate": RECALIBRATE}}
#: the comparisons, (reference, other): arms scored alike, so their fitness values compare
PAIRS = (("des", "undirected"), ("des", "random"), ("des-recal", "random-recal"))


def search_task(job: Dict[str, Any]) -> Dict[str, Any]:
    """One search (arm, seed), in a worker process; its per-round records."""
    torch.set_num_threads(job["threads"])
    overrides = dict(job["overrides"], seed=job["seed"], **ARMS[job["arm"]])
    info = run_search(Path(job["work_dir"]) / "{}-seed{}".format(job["arm"], job["seed"]), job["preset"], overrides,
                      job["device"], job["workers"])
    return {"arm": job["arm"], "seed": job["seed"], "run_dir": info["run_dir"], "wall_s": info["wall_s"],
            "population": info["config"]["population"],
            "best": [r["best_fitness"] for r in info["rounds"]], "mean": [r["mean_fitness"] for r in info["rounds"]]}


def best_so_far(values: Sequence[float]) -> List[float]:
    out: List[float] = []
    for v in values:
        out.append(max(v, out[-1]) if out else v)
    return out


def evaluations_to_reach(curve: Sequence[float], level: float, population: int) -> int:
    """Codes evaluated until the best so far first reaches ``level`` (the round's whole population counts)."""
    for r, v in enumerate(best_so_far(curve), start=1):
        if v >= level:
            return r * population
    raise ValueError("level {} never reached".format(level))


def verdict(diff: Dict[str, Any], fewer_is_faster: bool, words: Tuple[str, str] = ("faster", "slower")) -> str:
    """What a paired difference (DES minus other) says once ``diff`` has its Holm-adjusted p
    (:func:`benchstats.holm_table`): DES ``words[0]`` or ``words[1]`` where that p is below 0.05."""
    if diff["lo"] is None:
        return "not tested (fewer than 2 seeds)"
    if not diff["reading"].startswith("difference shown"):
        return "no difference shown ({}{})".format(
            "interval contains 0" if diff["lo"] <= 0 <= diff["hi"] else "interval excludes 0 unadjusted",
            ", Holm p = {:.2f} over {}".format(diff["p_holm"], diff["family"]))
    better = diff["mean"] < 0 if fewer_is_faster else diff["mean"] > 0
    return "DES {} (Holm p = {:.3f} over {})".format(words[0] if better else words[1], diff["p_holm"], diff["family"])


MEASURES = (("evaluations_to_level", True, ("faster", "slower")), ("area_best_so_far", False, ("faster", "slower")),
            ("final_best", False, ("higher", "lower")))


def analyse(searches: List[Dict[str, Any]], only_seeds: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """Curves per arm (mean and 95% band over seeds) and, per pair of arms scored alike, the paired
    convergence comparison (over ``only_seeds`` where given), Holm-corrected over the whole table."""
    by = {(s["arm"], s["seed"]): s for s in searches}
    arms = [a for a in ARMS if any(s["arm"] == a for s in searches)]
    seeds = sorted({s["seed"] for s in searches if all((a, s["seed"]) in by for a in arms)
                    and (only_seeds is None or s["seed"] in only_seeds)})
    curves: Dict[str, Any] = {}
    for arm in arms:
        runs = [by[arm, s] for s in seeds]
        rounds = min((len(r["best"]) for r in runs), default=0)
        curves[arm] = {key: [interval([f(r)[i] for r in runs]) for i in range(rounds)]
                       for key, f in (("best", lambda r: r["best"]), ("mean", lambda r: r["mean"]),
                                      ("best_so_far", lambda r: best_so_far(r["best"])))}
        curves[arm]["evaluations"] = [(i + 1) * runs[0]["population"] for i in range(rounds)] if runs else []
    paired: Dict[str, Any] = {}
    for ref, other in [p for p in PAIRS if p[0] in arms and p[1] in arms]:
        # per seed, the level both arms reach: the lower of their final best-so-far values
        levels = {s: min(best_so_far(by[a, s]["best"])[-1] for a in (ref, other)) for s in seeds}
        cost = {(a, s): evaluations_to_reach(by[a, s]["best"], levels[s], by[a, s]["population"])
                for a in (ref, other) for s in seeds}
        auc = {(a, s): statistics.mean(best_so_far(by[a, s]["best"])) for a in (ref, other) for s in seeds}
        final = {(a, s): best_so_far(by[a, s]["best"])[-1] for a in (ref, other) for s in seeds}
        paired["{}_vs_{}".format(ref, other)] = {  # no spaces: claim markers in the docs name these keys
            "levels": {str(s): levels[s] for s in seeds},
            "evaluations": {a: {str(s): cost[a, s] for s in seeds} for a in (ref, other)},
            "evaluations_to_level": paired_interval([cost[ref, s] - cost[other, s] for s in seeds]),
            "area_best_so_far": paired_interval([auc[ref, s] - auc[other, s] for s in seeds]),
            "final_best": paired_interval([final[ref, s] - final[other, s] for s in seeds])}
    holm_table([p[m] for p in paired.values() for m, _, _ in MEASURES])
    for p in paired.values():
        for m, fewer, words in MEASURES:
            p[m]["verdict"] = verdict(p[m], fewer, words)
    return {"seeds": seeds, "curves": curves, "paired": paired}


def _num(x: Optional[float], fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def _ci(d: Dict[str, Any], fmt: str = "{:+.2f}") -> str:
    return "{} [{}, {}]".format(_num(d["mean"], fmt), _num(d["lo"], fmt), _num(d["hi"], fmt))


def markdown(result: Dict[str, Any]) -> str:
    a = result["analysis"]
    lines = ["# Search phase: DES vs undirected evolution vs random search (equal compute)", "",
             "Command: `{}`".format(result["command"]), "", "Machine: {}".format(result["machine"]["summary"]), "",
             "Status: {}".format(result["status"]), "",
             "Search settings (every arm): preset `{}`, overrides `{}`; search seeds {}.".format(
                 result["preset"], result["overrides"], a["seeds"]), "",
             "## Fitness per round (fused validation top-1 %, mean over seeds [95% t interval])", ""]
    for key, title in (("best_so_far", "best so far"), ("best", "best of the round"), ("mean", "population mean")):
        lines += ["### " + title, "", "| round | codes evaluated | " + " | ".join(a["curves"]) + " |",
                  "|---|---|" + "---|" * len(a["curves"])]
        first = next(iter(a["curves"].values()), {"evaluations": []})
        for i, evals in enumerate(first["evaluations"]):
            lines.append("| {} | {} | {} |".format(i + 1, evals, " | ".join(
                _ci(c[key][i], "{:.2f}") for c in a["curves"].values())))
        lines.append("")
    lines += ["## Does DES converge faster?", "",
              "Per pair of arms scored alike and per seed, the level is the best-so-far fitness both reach by "
              "their last round; cost is the codes evaluated until the best so far first reaches it. The "
              "intervals are unadjusted 95% t intervals; verdicts apply Holm's correction over every row of "
              "the table.", ""] + paired_rows(a["paired"])
    b = result.get("baseline")
    if b:
        lines += ["## Like for like: `{}` on this run's seeds {}".format(b["source"], b["seeds"]), "",
                  "The same comparisons of that file's searches (`{}`) restricted to the seeds of this run, so "
                  "that both tables rest on the same seeds (Holm over this table). Fitness of recalibrated "
                  "arms is on another scale (each code's BatchNorm re-estimated) than that of the others: "
                  "compare differences, not levels.".format(b["command"]), ""] + paired_rows(b["paired"])
    for name, p in a["paired"].items():
        lines.append("- {}: levels {}; codes evaluated to reach them: {}".format(
            name.replace("_vs_", " vs "), ", ".join("{:.2f}%".format(v) for v in p["levels"].values()),
            "; ".join("{} {}".format(arm, "/".join(str(v) for v in per.values())) for arm, per in p["evaluations"].items())))
    lines += ["", "Compute: {:.0f} s of searches ({} searches, each search's own wall time); this invocation {:.0f} s "
              "wall with {} parallel jobs (finished searches are read back, not redone).".format(
                  result["compute_s"], len(result["searches"]), result["wall_s"], result["jobs"]), "",
              "![fitness per codes evaluated]({})".format(result["figure"]), ""]
    return "\n".join(lines)


def paired_rows(paired: Dict[str, Any]) -> List[str]:
    lines = ["| comparison | measure | reference minus other, mean [95% t interval] | per seed | p | verdict |",
             "|---|---|---|---|---|---|"]
    for name, p in paired.items():
        for measure, label, fmt in (("evaluations_to_level", "codes evaluated to the level", "{:+.1f}"),
                                    ("area_best_so_far", "mean best-so-far fitness (points)", "{:+.2f}"),
                                    ("final_best", "final best-so-far fitness (points)", "{:+.2f}")):
            d = p[measure]
            lines.append("| {} | {} | {} | {} | {} | {} |".format(
                name.replace("_vs_", " vs "), label, _ci(d, fmt), ", ".join(fmt.format(v) for v in d["values"]),
                _num(d.get("p"), "{:.3f}"), d["verdict"]))
    return lines + [""]


def baseline_comparison(baseline: Dict[str, Any], seeds: Sequence[int], source: str) -> Dict[str, Any]:
    """The comparisons of another results file's searches over ``seeds`` only (like-for-like seeds)."""
    a = analyse(baseline["searches"], only_seeds=seeds)
    return {"source": source, "command": baseline["command"], "seeds": a["seeds"], "paired": a["paired"]}


def figure(result: Dict[str, Any], path: Path) -> None:
    curves = result["analysis"]["curves"]
    fig, axes = pyplot().subplots(1, 2, figsize=(9, 3.6), dpi=120)
    for ax, key, title in ((axes[0], "best_so_far", "best so far"), (axes[1], "mean", "population mean")):
        for arm, c in curves.items():
            xs, pts = c["evaluations"], c[key]
            ax.plot(xs, [p["mean"] for p in pts], marker="o", label=arm)
            if all(p["lo"] is not None for p in pts):
                ax.fill_between(xs, [p["lo"] for p in pts], [p["hi"] for p in pts], alpha=0.2)
        ax.set_xlabel("codes evaluated")
        ax.set_ylabel("fused validation top-1 (%)")
        ax.set_title("{} (mean, 95% band over {} seeds)".format(title, len(result["analysis"]["seeds"])), fontsize=9)
    save_figure(fig, axes, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", default=["des", "undirected", "random"], choices=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="search seeds (>= 5)")
    parser.add_argument("--rounds", type=int, default=8, help="search rounds (default 8)")
    parser.add_argument("--limit", type=int, default=3000, help="examples per split (default 3000)")
    parser.add_argument("--baseline", metavar="FILE",
                        help="a search_phase results file: its comparisons on this run's seeds are added (like for like)")
    common_flags(parser, "search_phase", "searches run in parallel (processes)")
    args = parser.parse_args()
    baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else None
    overrides: Dict[str, Any] = {"rounds": args.rounds, "limit": args.limit}
    if args.quick:
        overrides.update(rounds=2, warmup_epochs=0, limit=256, population=4)
        args.seeds = args.seeds[:2]
    make_config(args.preset, **overrides)  # bad settings stop here, before any search
    out = Path(args.out)
    fig_path = out.parent / "figures" / (out.name + ".png")
    result: Dict[str, Any] = {"command": "OMP_NUM_THREADS={} python {}".format(torch.get_num_threads(),
                                                                               " ".join(sys.argv)),
                              "machine": describe_machine(), "preset": args.preset, "overrides": overrides,
                              "arms": {a: ARMS[a] for a in args.arms}, "jobs": args.jobs, "device": args.device,
                              "threads_per_job": args.threads, "searches": [], "status": "started",
                              "figure": "figures/" + fig_path.name}
    jobs = [{"arm": a, "seed": s, "work_dir": args.work_dir, "preset": args.preset, "overrides": overrides,
             "threads": args.threads, "device": args.device, "workers": args.workers}
            for s in args.seeds for a in args.arms]
    t0 = time.time()

    def finished(search: Dict[str, Any]) -> None:
        result["searches"].append(search)
        n = len(result["searches"])
        result["status"] = "complete" if n == len(jobs) else "partial: {} of {} searches done".format(n, len(jobs))
        result["wall_s"] = time.time() - t0
        result["compute_s"] = sum(s["wall_s"] for s in result["searches"])
        result["analysis"] = analyse(result["searches"])
        if baseline is not None:
            result["baseline"] = baseline_comparison(baseline, result["analysis"]["seeds"], Path(args.baseline).name)
        figure(result, fig_path)
        write_results(str(out), result, markdown(result))

    run_jobs(search_task, jobs, args.jobs, finished)


if __name__ == "__main__":
    main()
