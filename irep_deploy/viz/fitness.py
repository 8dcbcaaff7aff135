"""Figure 3, the population's fitness over the rounds: ``fitness.png`` + ``fitness.json``, from the
round records of ``log.jsonl`` and the final ``population.json``."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..errors import PlotError
from ..search.records import LOG_FILE, POPULATION_FILE, Population, RoundRecord, read_log, read_population
from .common import Outputs, PathLike, figure, json_bytes, png, write

FITNESS_FILES = ("fitness.png", "fitness.json")


def read_rounds(path: PathLike) -> List[RoundRecord]:
    """The round records of ``log.jsonl`` (its epoch records, a train run's too, are not read)."""
    return [r for r in read_log(path, kinds=(RoundRecord,)) if isinstance(r, RoundRecord)]


def fitness_data(rounds: Optional[Sequence[RoundRecord]], population: Optional[Population]) -> Dict[str, Any]:
    """Best and mean fitness per round, and every final code's fitness in each round it was in."""
    return {"figure": "population fitness over rounds",
            "rounds": [{"round": r.round, "best_fitness": r.best_fitness, "mean_fitness": r.mean_fitness}
                       for r in rounds or []],
            "codes": [{"rank": c.rank, "fitness": c.fitness, "branches": c.branches,
                       "history": [list(h) for h in c.history]} for c in (population.codes if population else [])],
            "note": "rounds: best and mean fitness of each round (log.jsonl); codes: every code of the final "
                    "population with its fitness in each round it was evaluated (population.json)"}


def render_fitness(rounds: Optional[Sequence[RoundRecord]], population: Optional[Population]) -> Outputs:
    if not rounds and not population:
        raise PlotError("no fitness to plot: no round in log.jsonl and no population.json")
    data = fitness_data(rounds, population)
    fig = figure(6.4, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    xs: List[int] = []
    if population:
        for code in sorted(data["codes"], key=lambda c: -c["rank"]):
            hx = [h[0] for h in code["history"]]
            hy = [h[1] for h in code["history"]]
            xs += hx
            best = code["rank"] == 1
            ax.plot(hx, hy, "-", color="#d62728" if best else "#9e9e9e", linewidth=1.2 if best else 0.6,
                    alpha=1.0 if best else 0.6, zorder=3 if best else 1)
            ax.scatter(hx, hy, s=22 if best else 12, color="#d62728" if best else "#7f7f7f", alpha=1.0 if best else 0.6,
                       zorder=4 if best else 2, edgecolors="none",
                       label=("final best code (rank 1)" if best else None))
        ax.scatter([], [], s=12, color="#7f7f7f", alpha=0.6,
                   label="other codes of the final population ({} codes)".format(len(data["codes"])))
    if rounds:
        rx = [r["round"] for r in data["rounds"]]
        xs += rx
        ax.plot(rx, [r["best_fitness"] for r in data["rounds"]], "o-", color="#1f77b4", linewidth=2,
                label="best of round")
        ax.plot(rx, [r["mean_fitness"] for r in data["rounds"]], "s--", color="#2ca02c", linewidth=1.5,
                label="population mean of round")
    if xs:
        lo, hi = min(xs), max(xs)
        step = max(1, int(math.ceil((hi - lo + 1) / 12.0)))
        ax.set_xticks(list(range(lo, hi + 1, step)))
        ax.set_xlim(lo - 0.5, hi + 0.5)
    ax.set_xlabel("evolution round")
    ax.set_ylabel("fitness: validation top-1 of the fused code (%)")
    ax.grid(True, color="#e0e0e0")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Population fitness over the DES rounds", fontsize=10)
    return [(FITNESS_FILES[0], png(fig)), (FITNESS_FILES[1], json_bytes(data))]


def plot_fitness(run_dir: PathLike, out_dir: PathLike) -> List[Path]:
    """Write ``fitness.png/.json`` from ``log.jsonl`` and/or ``population.json`` of a search run."""
    run = Path(run_dir)
    rounds = read_rounds(run / LOG_FILE) if (run / LOG_FILE).exists() else None
    population = read_population(run / POPULATION_FILE) if (run / POPULATION_FILE).exists() else None
    return write(render_fitness(rounds, population), out_dir)
