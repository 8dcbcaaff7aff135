"""Shared by the search-phase and ranking benchmarks: their common flags, a process pool that hands
back each finished job, and the figure boilerplate."""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import multiprocessing
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List

from irep_deploy._io import atomic_write

RESULTS = Path(__file__).resolve().parent / "results"


def common_flags(parser: argparse.ArgumentParser, name: str, jobs_help: str) -> None:
    """--preset, --jobs, --threads, --device, --workers, --quick, --work-dir and --out (default results/<name>)."""
    parser.add_argument("--preset", default="cpu", help="search preset (default cpu)")
    parser.add_argument("--device", default="cpu", help="where every search and training runs (default cpu; "
                        "cuda: several jobs share the GPU)")
    parser.add_argument("--workers", type=int, default=0, help="data-loading processes per job (default 0)")
    parser.add_argument("--jobs", type=int, default=1, help=jobs_help)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--work-dir", default="runs/" + name)
    parser.add_argument("--out", default=str(RESULTS / name))


def run_jobs(task: Callable[[Dict[str, Any]], Dict[str, Any]], jobs: List[Dict[str, Any]], workers: int,
             on_result: Callable[[Dict[str, Any]], None]) -> None:
    """``task(job)`` for every job in ``workers`` fresh interpreters (spawn: no forked OpenMP state);
    ``on_result`` gets each result as it finishes, so partial results can be written."""
    ctx = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        for done in futures.as_completed([pool.submit(task, j) for j in jobs]):
            on_result(done.result())


def pyplot() -> Any:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig: Any, axes: Iterable[Any], path: Path) -> None:
    for ax in axes:
        ax.grid(True, color="#e0e0e0")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as handle:  # results files are never half-written
        fig.savefig(handle, format=path.suffix.lstrip(".") or "png")
    pyplot().close(fig)
