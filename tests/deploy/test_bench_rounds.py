"""`bench --compare` rounds: interleaved, per-round ratios, and the spread that flags an untrustworthy ratio.

Real runs of real (tiny) torch modules at tiny durations; one module sleeps in chosen rounds so that a
round is really slower, instead of a timing that depends on the machine.
"""
from __future__ import annotations

import json
import time
from typing import List, Set

import numpy as np
import pytest
import torch
import torch.nn as nn

from irep_deploy.bench.latency import (DEFAULT_ROUNDS, Variant, build_jobs, ratio_warnings, ratios, run_rounds,
                                       spread, summarise)

from .conftest import cli

SHAPE = {"in_channels": 3, "input_size": 8}


class Conv(nn.Module):
    """A small conv net that logs its calls and sleeps (really) in the rounds listed in ``slow``."""

    def __init__(self, name: str, log: List[str], slow: Set[int] = frozenset(), sleep_s: float = 0.05) -> None:
        super().__init__()
        self.name, self.log, self.slow, self.sleep_s = name, log, set(slow), sleep_s
        self.round = 0
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append(self.name)
        if self.round in self.slow:
            time.sleep(self.sleep_s)
        return self.conv(x)


# one torch thread (tests/conftest.py): a thread pool's barrier would swamp a 0.05 ms convolution
pytestmark = pytest.mark.usefixtures("one_thread")


def _run(models, rounds: int, iters: int = 5):
    variants = [Variant(m.name, m.eval()) for m in models]
    jobs, _ = build_jobs(variants, ["torch"], [1], SHAPE, None, torch.device("cpu"), [])
    for m in models:  # build_jobs ran each once, at batch 1 and a small size (its memory estimate's probe)
        m.log.clear()

    def on_round(r: int) -> None:
        for m in models:
            m.round = r

    samples = run_rounds(jobs, rounds, warmup_ms=0, duration_s=0, min_iters=rounds * iters, on_round=on_round)
    return summarise(jobs, samples)


def _runs(log: List[str]) -> List[str]:
    """Consecutive calls of one model collapsed: the order in which the models took turns."""
    return [name for i, name in enumerate(log) if i == 0 or log[i - 1] != name]


def test_rounds_interleave_the_models():
    log: List[str] = []
    results = _run([Conv("fused", log), Conv("plain", log)], rounds=3)
    assert _runs(log) == ["fused", "plain"] * 3
    assert all(len(r.round_medians) == 3 for r in results)


def test_a_round_that_is_slower_for_one_model_flags_the_ratio():
    log: List[str] = []
    results = _run([Conv("fused", log, slow={1}), Conv("plain", log)], rounds=4)
    (row,) = ratios(results, spread_warn=0.10)
    fused, plain = results
    per_round = [a / b for a, b in zip(fused.round_medians, plain.round_medians)]
    assert row["fused_over_plain_rounds"] == per_round
    assert row["fused_over_plain_spread"] == pytest.approx((max(per_round) - min(per_round)) / np.median(per_round))
    assert max(per_round) == per_round[1]  # the round in which fused slept
    assert row["untrusted"] == ["fused_over_plain"]
    (warning,) = ratio_warnings([row])
    assert warning.startswith("fused/plain (torch batch 1) moved between rounds") and "too wide to trust" in warning


def test_spread_is_range_over_median():
    assert spread([1.0, 1.2, 0.9, 1.0]) == pytest.approx(0.3)
    assert spread([2.0, 2.0]) == 0.0


def test_one_round_has_no_spread():
    log: List[str] = []
    (row,) = ratios(_run([Conv("fused", log), Conv("plain", log)], rounds=1))
    assert "fused_over_plain_rounds" not in row and row["untrusted"] == []


def test_compare_runs_rounds_by_default_and_reports_the_spread(ckpts, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc, text, err = cli(capsys, "bench", ckpts["deploy"], "--compare", "--backend", "torch", "--warmup", "0",
                        "--duration", "0", "--iterations", "5", "--json", out)
    assert rc == 0, err
    data = json.loads(out.read_text())
    assert data["config"]["rounds"] == DEFAULT_ROUNDS > 1
    (row,) = data["ratios"]
    assert len(row["fused_over_plain_rounds"]) == DEFAULT_ROUNDS
    assert row["untrusted"] == [n for n in ("fused_over_plain", "multi_branch_over_fused")
                                if row[n + "_spread"] > data["config"]["spread_warn"]]
    assert "spread" in text and ("UNTRUSTED" in text) == bool(row["untrusted"])
    assert all(len(r["round_medians"]) == DEFAULT_ROUNDS for r in data["results"])
