"""Statistics shared by the benchmark scripts, so that every results file says only what its data can.

* Latency ratios: :func:`ratio_stats` gives the median of per-round ratios with its per-round spread
  (``irep_deploy.bench``'s rule: UNTRUSTED above ``SPREAD_WARN``, 10 %) and a distribution-free
  interval for the median; :func:`judge` calls a target met only when that interval, widened by
  how far the A/A control of the same run strays from 1, clears it and neither spread breaks the rule.
* Paired differences over seeds: :func:`paired_interval` (mean, 95 % t interval, two-sided p) and
  :func:`holm` / :func:`holm_table` for a table of several of them (Holm's step-down correction);
  an interval that holds 0 reads "no difference shown".
* Rank agreement: :func:`bootstrap_interval` (percentile, resampling the paired items) and
  :func:`fisher_z_tau_interval` (Fieller, Hartley & Pearson 1957: var(atanh tau) ~ 0.437 / (n - 4)).
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from irep_deploy.bench.latency import SPREAD_WARN, spread

LEVEL = 0.95


# -- latency ratios ---------------------------------------------------------------------------------
def median_interval(values: Sequence[float], level: float = LEVEL) -> Dict[str, Any]:
    """Distribution-free interval for the median: order statistics x_(k) and x_(n+1-k), with k the
    largest whose coverage 1 - 2 P(Bin(n, 1/2) < k) reaches ``level``. Below 6 values no interval
    reaches 95 %; then it is [min, max] and ``coverage`` says what that one holds."""
    from scipy import stats
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        return {"lo": None, "hi": None, "coverage": None}
    k = 1
    while k + 1 <= (n + 1) // 2 and 1 - 2 * stats.binom.cdf(k, n, 0.5) >= level:
        k += 1
    coverage = 1 - 2 * stats.binom.cdf(k - 1, n, 0.5) if n > 1 else 0.0
    return {"lo": xs[k - 1], "hi": xs[n - k], "coverage": float(coverage)}


def ratio_stats(num: Sequence[float], den: Sequence[float], spread_warn: float = SPREAD_WARN) -> Dict[str, Any]:
    """Per-round ratios ``num[i] / den[i]`` (adjacent measurements share the machine's state): their
    median, range, spread ((max - min) / median), ``untrusted`` (spread above ``spread_warn``, the
    rule of ``irep-deploy bench``) and the interval of :func:`median_interval`."""
    ratios = [a / b for a, b in zip(num, den)]
    ci = median_interval(ratios)
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "n": len(ratios),
            "spread": spread(ratios), "untrusted": len(ratios) > 1 and spread(ratios) > spread_warn,
            "ci": [ci["lo"], ci["hi"]], "ci_coverage": ci["coverage"]}


def judge(ratio: Dict[str, Any], aa: Optional[Dict[str, Any]], bound: float, at_most: bool = True) -> Dict[str, Any]:
    """Whether a latency target ``ratio <= bound`` (``at_most``) or ``ratio >= bound`` is met, from a
    :func:`ratio_stats` of the ratio and one of its A/A control (the same thing timed twice, same run).

    The A/A control shows how far this run can misread a ratio that is really 1, so the ratio's
    interval is widened by the A/A's largest deviation from 1 (``interval_with_aa``). ``met`` /
    ``missed``: that interval lies wholly on one side of the bound; ``undecided``: it straddles it;
    ``untrusted``: the ratio or its control spread above the rule, there is no control or only one
    round: nothing is concluded."""
    why = []
    if ratio["n"] < 2:
        why.append("one round only")
    if ratio.get("untrusted"):
        why.append("ratio spread {:.0%}".format(ratio["spread"]))
    if aa is None:
        why.append("no A/A control")
    elif aa.get("untrusted"):
        why.append("A/A spread {:.0%}".format(aa["spread"]))
    deviation = max(abs(1.0 - aa["ci"][0]), abs(aa["ci"][1] - 1.0)) if aa is not None else 0.0
    lo, hi = ratio["ci"][0] * (1 - deviation), ratio["ci"][1] * (1 + deviation)
    if why:
        verdict = "untrusted"
    elif (hi <= bound) if at_most else (lo >= bound):
        verdict = "met"
    elif (lo > bound) if at_most else (hi < bound):
        verdict = "missed"
    else:
        verdict = "undecided"
    return {"target": "{} {}".format("<=" if at_most else ">=", bound), "verdict": verdict, "why": "; ".join(why),
            "interval_with_aa": [lo, hi]}


def verdict_text(j: Dict[str, Any]) -> str:
    return j["verdict"].upper() + (" ({})".format(j["why"]) if j["why"] else
                                   " ([{:.3f}, {:.3f}] with the A/A)".format(*j["interval_with_aa"]))


def ratio_cell(r: Dict[str, Any], fmt: str = "{:.3f}") -> str:
    """``median [interval] spread S%`` with UNTRUSTED where the rule says so (a results-table cell)."""
    if r.get("ci") is None:  # a ratio recorded before intervals were: its range only
        return (fmt + " [" + fmt + ", " + fmt + "] (range)").format(r["median"], r["min"], r["max"])
    text = (fmt + " [" + fmt + ", " + fmt + "]").format(r["median"], *r["ci"])
    return text + " spread {:.0%}{}".format(r["spread"], " UNTRUSTED" if r["untrusted"] else "")


# -- paired differences over seeds ------------------------------------------------------------------
def paired_interval(diffs: Sequence[float], level: float = LEVEL) -> Dict[str, Any]:
    """Mean of paired differences with its t interval (``lo``, ``hi``, and as ``ci95`` for claim markers
    at the default level) and the two-sided one-sample t-test p against 0
    (None where n < 2; where every difference is equal, p is 1 if they are 0 and 0 otherwise)."""
    from scipy import stats
    n = len(diffs)
    mean = statistics.mean(diffs) if n else None
    out: Dict[str, Any] = {"n": n, "mean": mean, "std": None, "lo": None, "hi": None, "p": None, "values": list(diffs)}
    if n < 2:
        return out
    sd = statistics.stdev(diffs)
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    if sd == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        p = float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))
    out.update(std=sd, lo=mean - half, hi=mean + half, ci95=[mean - half, mean + half], p=p)
    return out


def holm(pvalues: Sequence[Optional[float]]) -> List[Optional[float]]:
    """Holm's step-down adjusted p-values (family-wise error), in the input order; None stays None
    and does not count in the family."""
    idx = sorted((i for i, p in enumerate(pvalues) if p is not None), key=lambda i: pvalues[i])  # type: ignore[arg-type,return-value]
    m = len(idx)
    out: List[Optional[float]] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))  # type: ignore[operator]
        out[i] = running
    return out


def holm_table(rows: Sequence[Dict[str, Any]], alpha: float = 1 - LEVEL) -> None:
    """Add ``p_holm``, ``family`` and a ``reading`` to every row (a :func:`paired_interval`) of one
    table: "difference shown" only where the Holm-adjusted p is below ``alpha``."""
    adjusted = holm([r.get("p") for r in rows])
    family = sum(p is not None for p in adjusted)
    for r, p in zip(rows, adjusted):
        r["p_holm"], r["family"] = p, family
        if p is None:
            r["reading"] = "not tested (fewer than 2 seeds)"
        elif p < alpha:
            r["reading"] = "difference shown (Holm p = {:.3f} over {})".format(p, family)
        else:
            r["reading"] = "no difference shown (Holm p = {:.2f} over {})".format(p, family)


# -- rank agreement ---------------------------------------------------------------------------------
def bootstrap_interval(x: Sequence[float], y: Sequence[float], statistic: Callable[[Any, Any], float],
                       resamples: int = 2000, seed: int = 0, level: float = LEVEL) -> Tuple[float, float]:
    """Percentile interval of ``statistic(x, y)`` over the items resampled with replacement (pairs
    kept together; undefined resamples, all of one value, are dropped)."""
    rng = np.random.default_rng(seed)
    xs, ys = np.asarray(x), np.asarray(y)
    values = []
    for _ in range(resamples):
        i = rng.integers(0, len(xs), len(xs))
        v = statistic(xs[i], ys[i])
        if np.isfinite(v):
            values.append(v)
    if not values:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def fisher_z_tau_interval(tau: float, n: int, level: float = LEVEL) -> Tuple[Optional[float], Optional[float]]:
    """Interval for Kendall's tau from atanh(tau) ~ normal with variance 0.437 / (n - 4); None below 5 items."""
    from scipy import stats
    if n < 5:
        return None, None
    z = math.atanh(max(-0.999999, min(0.999999, tau)))
    half = stats.norm.ppf(0.5 + level / 2) * math.sqrt(0.437 / (n - 4))
    return math.tanh(z - half), math.tanh(z + half)
