"""The trust rule of the numbers a report states, in one record format.

Latencies and latency ratios: bench's rule (:func:`irep_deploy.bench.latency.spread`, limit
``SPREAD_WARN``): the spread of the per-round values, (max - min) / median, above 10 % marks the
value UNTRUSTED. Beside a measured field ``K`` of a record stand ``K_spread`` (a number, or None with
fewer than 2 rounds) and ``K_untrusted`` (bool); :func:`shown` writes the value with both.

Training times: two runs' wall times compare only when the machine treated them alike. Each run
records its own CPU time (user + system); CPU seconds per wall second is how many cores it kept
busy. When the two runs' values are further apart than ``LOAD_WARN`` (by the same spread
arithmetic), something else loaded the machine during one of them, and the wall-time ratio is shown
as not comparable, with the CPU-time ratio beside it.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

from .bench.latency import SPREAD_WARN, spread

#: The most the two runs' cores-busy values (CPU s / wall s) may spread, (max - min) / median, for their
#: wall times to be compared. Wider than the latency limit: models of different sizes keep a
#: multi-threaded backend busy to different degrees on an idle machine too.
LOAD_WARN = 0.25


def marks(key: str, rounds: Sequence[float]) -> Dict[str, Any]:
    """``K_spread`` and ``K_untrusted`` of a value measured in ``rounds`` (per-round values)."""
    if len(rounds) < 2:
        return {key + "_spread": None, key + "_untrusted": False}
    s = spread(rounds)
    return {key + "_spread": s, key + "_untrusted": s > SPREAD_WARN}


def ratio_marks(row: Dict[str, Any], keys: Sequence[str]) -> Dict[str, Any]:
    """A bench ratio row (``bench.latency.ratios``) in the record format: ``K_untrusted`` from bench's
    own ``untrusted`` list, ``K_spread`` None where it took one round."""
    out = dict(row)
    for key in keys:
        if key in row:
            out.setdefault(key + "_spread", None)
            out[key + "_untrusted"] = key in row.get("untrusted", [])
    return out


def shown(record: Dict[str, Any], key: str, fmt: str = "{:.3f}") -> str:
    """``record[key]`` with its spread and mark: ``57.012 (spread 644.0 %, UNTRUSTED)``."""
    value = record.get(key)
    if value is None:
        return "-"
    text = fmt.format(value)
    s = record.get(key + "_spread")
    if s is None:
        return text + " (1 round: no spread)"
    return text + " (spread {:.1%}{})".format(s, ", UNTRUSTED" if record.get(key + "_untrusted") else "")


def time_comparison(ours_wall: float, ours_cpu: Optional[float], base_wall: float,
                    base_cpu: Optional[float]) -> Dict[str, Any]:
    """The training-time ratio of two runs and whether it can be read: ``train_cost`` (wall),
    ``train_cpu_cost``, ``train_cost_comparable`` (None: a run has no CPU time) and ``train_cost_note``."""
    wall = ours_wall / max(base_wall, 1e-9)
    out: Dict[str, Any] = {"train_cost": wall, "train_cpu_cost": None, "train_cost_comparable": None}
    if ours_cpu is None or base_cpu is None or ours_wall <= 0 or base_wall <= 0:
        out["train_cost_note"] = "{:.2f}x the training wall time (comparability unknown: a run recorded no CPU " \
                                 "time)".format(wall)
        return out
    cpu = ours_cpu / max(base_cpu, 1e-9)
    busy = (ours_cpu / ours_wall, base_cpu / base_wall)
    apart = spread(busy) if min(busy) > 0 else float("inf")
    out.update(train_cpu_cost=cpu, train_cost_comparable=apart <= LOAD_WARN, cores_busy=list(busy))
    if apart <= LOAD_WARN:
        out["train_cost_note"] = "{:.2f}x the training time (wall; CPU time {:.2f}x; the runs kept {:.2f} and {:.2f} " \
                                 "cores busy)".format(wall, cpu, busy[0], busy[1])
    else:
        out["train_cost_note"] = (
            "{:.2f}x the training wall time, not comparable: the searched run kept {:.2f} cores busy per wall second "
            "and the baseline {:.2f}, {:.0%} apart (limit {:.0%}), so the machine was loaded during one of them; "
            "their CPU times compare instead: {:.2f}x".format(wall, busy[0], busy[1], apart, LOAD_WARN, cpu))
    return out
