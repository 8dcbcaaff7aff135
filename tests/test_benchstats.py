"""benchmarks/benchstats.py: the statistics every results file is judged by (latency trust rule,
Holm, paired t, Kendall tau intervals), checked against hand-worked examples, scipy and simulated
coverage; and benchmarks/reanalyse.py: the stored results files agree with what their scripts'
analysis functions compute from the data they hold."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import benchstats  # noqa: E402


def test_holm_matches_a_hand_worked_example():
    # sorted: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04 -> raised to 0.06 (monotone)
    assert benchstats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # capped at 1, and a missing p neither counts in the family nor gets one
    assert benchstats.holm([0.5, None, 0.6]) == [pytest.approx(1.0), None, pytest.approx(1.0)]
    assert benchstats.holm([0.02, None]) == [pytest.approx(0.02), None]


def test_holm_table_reads_only_what_survives_the_correction():
    # the 5-seed evidence of README: DES minus all branches has p 0.015 alone, not once six are read together
    rows = [benchstats.paired_interval(d) for d in (
        [0.95, 0.075, 0.80, 0.725, 0.525],              # des - full
        [-0.225, -0.20, -0.25, -0.175, -0.35],          # random - plain
        [1.075, -1.225, 0.20, 0.875, 1.275], [1.30, -1.025, 0.45, 1.05, 1.625],
        [1.40, -1.75, -0.825, 0.25, 1.65], [0.125, -1.30, -0.60, 0.15, 0.75])]
    assert rows[0]["p"] == pytest.approx(stats.ttest_1samp(rows[0]["values"], 0).pvalue)
    assert rows[0]["lo"] > 0  # the unadjusted interval excludes 0 ...
    benchstats.holm_table(rows)
    assert rows[0]["p_holm"] == pytest.approx(5 * rows[0]["p"]) and rows[0]["p_holm"] > 0.05
    assert rows[0]["reading"].startswith("no difference shown")  # ... Holm over six does not
    assert rows[1]["reading"].startswith("difference shown") and rows[1]["family"] == 6


def test_paired_interval_is_the_t_interval():
    d = [0.3, -0.1, 0.8, 0.4]
    r = benchstats.paired_interval(d)
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=np.mean(d), scale=stats.sem(d))
    assert (r["lo"], r["hi"]) == (pytest.approx(lo), pytest.approx(hi))
    assert benchstats.paired_interval([0.0, 0.0, 0.0])["p"] == 1.0
    assert benchstats.paired_interval([1.0])["lo"] is None


def test_median_interval_order_statistics_and_coverage():
    r = benchstats.median_interval(list(range(11, 0, -1)))  # 11 values: x(2), x(10), coverage 1 - 24/2048
    assert (r["lo"], r["hi"]) == (2, 10) and r["coverage"] == pytest.approx(1 - 24 / 2048)
    r = benchstats.median_interval([5.0, 1.0, 3.0, 2.0, 4.0])  # below 6 values: min-max, 1 - 2/32
    assert (r["lo"], r["hi"]) == (1.0, 5.0) and r["coverage"] == pytest.approx(0.9375)
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(400):  # skewed rounds (lognormal, median 1): the interval holds the median as claimed
        r = benchstats.median_interval(list(rng.lognormal(0.0, 0.3, 11)))
        hits += r["lo"] <= 1.0 <= r["hi"]
    assert hits / 400 >= 0.95


def test_ratio_stats_flags_a_wide_spread_with_the_bench_rule():
    calm = benchstats.ratio_stats([1.01, 1.00, 1.02, 1.01, 1.00], [1.0] * 5)
    assert not calm["untrusted"] and calm["spread"] == pytest.approx(0.02 / 1.01)
    noisy = benchstats.ratio_stats([1.2, 0.9, 1.0], [1.0] * 3)
    assert noisy["untrusted"] and noisy["spread"] == pytest.approx(0.3)


def test_judge_needs_the_interval_widened_by_the_aa_control_to_clear_the_target():
    def r(values):
        return benchstats.ratio_stats(values, [1.0] * len(values))

    aa = r([1.00, 0.99, 1.01, 1.00, 1.00])
    assert benchstats.judge(r([0.97, 0.98, 0.99, 0.98, 0.97]), aa, 1.02)["verdict"] == "met"
    assert benchstats.judge(r([1.05, 1.06, 1.07, 1.06, 1.05]), aa, 1.02)["verdict"] == "missed"
    assert benchstats.judge(r([1.00, 1.01, 1.03, 1.02, 1.01]), aa, 1.02)["verdict"] == "undecided"
    # a control that reads 0.95-0.96 (nothing differs, yet the run says 4-5 %): 0.98-0.99 no longer clears 1.02
    biased = r([0.95, 0.96, 0.955, 0.95, 0.96])
    j = benchstats.judge(r([0.98, 0.985, 0.99, 0.98, 0.99]), biased, 1.02)
    assert j["verdict"] == "undecided" and j["interval_with_aa"][1] > 1.02
    # the spread rule: rounds 20-45 % apart conclude nothing, in either the ratio or its control
    assert benchstats.judge(r([1.0, 0.8, 1.2]), aa, 1.02)["verdict"] == "untrusted"
    assert benchstats.judge(r([0.97, 0.98, 0.97]), r([0.8, 1.0, 1.2]), 1.02)["verdict"] == "untrusted"
    assert benchstats.judge(r([6.4, 6.5, 6.3]), aa, 3.0, at_most=False)["verdict"] == "met"
    assert benchstats.judge(r([0.97]), aa, 1.02)["verdict"] == "untrusted"  # one round: no spread to judge by


def test_fisher_z_tau_interval_covers_the_true_tau():
    rng = np.random.default_rng(0)
    rho, n = 0.5, 16
    true_tau = 2 / math.pi * math.asin(rho)  # Kendall's tau of a bivariate normal
    cov = [[1, rho], [rho, 1]]
    hits = 0
    for _ in range(300):
        x, y = rng.multivariate_normal([0, 0], cov, n).T
        lo, hi = benchstats.fisher_z_tau_interval(stats.kendalltau(x, y)[0], n)
        hits += lo <= true_tau <= hi
    assert 0.9 <= hits / 300 <= 0.99
    assert benchstats.fisher_z_tau_interval(0.2, 4) == (None, None)


def test_stored_results_agree_with_their_analysis_functions():
    """The committed files' statistics are what the scripts' analysis functions (the ones reanalyse.py
    and a rerun call) compute from the data the files hold."""
    import ranking
    import reanalyse

    results = ROOT / "benchmarks" / "results"
    for name in ("evidence_fmnist_5seeds.json", "search_phase.json", "search_phase_recal.json"):
        stored = json.loads((results / name).read_text())
        again = json.loads((results / name).read_text())
        fields, _ = reanalyse.FILES[name](again, results)
        assert fields == stored["reanalysed"]["fields"]
        for field in fields:
            assert again[field] == stored[field], (name, field)
    ev = json.loads((results / "evidence_fmnist_5seeds.json").read_text())["summary"]["paired"]
    assert ev["des_minus_full"]["reading"].startswith("no difference shown")
    # the ranking's noise ceiling (the full analysis bootstraps eight statistics: seconds, not needed here)
    rk = json.loads((results / "ranking.json").read_text())
    acc = {(r["index"], r["seed"]): r["test_top1"] for r in rk["runs"]}
    a, b = rk["seeds"]
    ceiling = ranking.tau_with_intervals([acc[i, a] for i in range(len(rk["codes"]))],
                                         [acc[i, b] for i in range(len(rk["codes"]))])
    stored = rk["analysis"]["seed_tau"][0]
    assert ceiling["ci"] == stored["ci"] and ceiling["ci_fisher_z"] == stored["ci_fisher_z"]
    assert stored["ci"][0] < stored["kendall_tau"] < stored["ci"][1]


def test_recorded_latency_verdicts_follow_the_rule_from_their_own_rounds():
    """fusion_cpu, search_cpu and table_models: every judged target is what benchstats.judge says of the
    stored ratio and A/A control, and (where the rounds are stored) those follow from the rounds."""
    results = ROOT / "benchmarks" / "results"
    fusion = json.loads((results / "fusion_cpu.json").read_text())
    for r in fusion["latency"]:
        assert r["target"] == benchstats.judge(r["fused_over_plain_folded"], r["aa_control_plain_over_plain"], 1.02)
    search = json.loads((results / "search_cpu.json").read_text())
    for r in search["step"]:
        s = r["samples_s"]
        assert r["step_over_fwd_bwd"] == benchstats.ratio_stats(s["supernet_step"], s["plain_fwd_bwd"])
        assert r["target"] == benchstats.judge(r["step_over_fwd_bwd"], r["aa_control"], 1.15)
    table = json.loads((results / "table_models.json").read_text())
    judged = 0
    for row in table["fmnist"] + table["imagenet"]:
        rounds = row["latency"].get("round_medians_ms", {})
        for q in row["latency"]["ratios"]:
            if "target" not in q:
                continue
            key = "{}|{}|{}".format
            assert q["fused_over_plain"] == benchstats.ratio_stats(rounds[key("fused", q["backend"], q["batch"])],
                                                                   rounds[key("plain", q["backend"], q["batch"])])
            assert q["target"] == benchstats.judge(q["fused_over_plain"], q["aa_plain_again_over_plain"], 1.02)
            judged += 1
    assert judged == 40


def test_reanalyse_refuses_an_unknown_file_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reanalyse.py"), "--results", str(tmp_path),
                           "nope.json"], cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "nope.json" in proc.stderr
