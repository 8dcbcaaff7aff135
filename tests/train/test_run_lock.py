"""Two writers, one run directory, as real processes: the first proceeds, the second exits 1 naming it,
and the run's log holds every record once, in order, whole.

The first writer is given so many epochs (or rounds) that it is still running whatever the machine's
load when the second one reaches the lock; the test then kills it (a kill at any moment leaves a
resumable run).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest

pytest.importorskip("sklearn")  # the digits data ships with scikit-learn

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["--dataset", "digits", "--backbone", "resnet18_cifar", "--width", "0.125", "--batch-size", "32",
         "--limit", "64", "--device", "cpu", "--quiet"]
SEARCH = ["--dataset", "digits", "--backbone", "resnet18_cifar", "--width", "0.125", "--population", "2",
          "--subnets", "1", "--warmup-epochs", "1", "--round-epochs", "1", "--batch-size", "32", "--limit", "64",
          "--device", "cpu", "--quiet"]
FOREVER = "100000"
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _start(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "irep_deploy"] + list(argv), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=ENV, universal_newlines=True)


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    while not path.exists():
        assert proc.poll() is None, "the first writer ended early: " + proc.stderr.read()
        time.sleep(0.05)


def _second(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "irep_deploy"] + list(argv), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=ENV, universal_newlines=True)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _refused_by(res: subprocess.CompletedProcess, run: Path, holder: subprocess.Popen, command: str) -> None:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1, res.stderr
    assert "{}: in use by irep-deploy {} (pid {} on ".format(run, command, holder.pid) in lines[0]


def _epochs(log: Path) -> List[int]:
    """The epoch numbers of log.jsonl's whole lines (the last may be cut by the kill)."""
    text = log.read_text()
    lines = text.split("\n")[:-1]  # a line without its newline is one the kill cut short
    return [json.loads(line)["epoch"] for line in lines if json.loads(line).get("event", "epoch") == "epoch"]


def _wait_epochs(log: Path, n: int, proc: subprocess.Popen) -> None:
    while not log.exists() or len(_epochs(log)) < n:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)


@pytest.mark.slow
def test_two_trains_into_one_run_directory_and_two_resumes_of_the_killed_run(tmp_path):
    run = tmp_path / "run"
    first = _start("train", "-o", str(run), "--epochs", FOREVER, *TRAIN)
    try:
        _wait_for(run / ".lock", first)
        _refused_by(_second("train", "-o", str(run), "--epochs", "1", *TRAIN), run, first, "train")
        _wait_epochs(run / "log.jsonl", 2, first)
    finally:
        _kill(first)
    before = _epochs(run / "log.jsonl")
    assert before == list(range(1, len(before) + 1))

    resumed = _start("train", "--resume", str(run), "--device", "cpu", "--quiet")
    try:
        _wait_epochs(run / "log.jsonl", len(before) + 1, resumed)
        _refused_by(_second("train", "--resume", str(run), "--device", "cpu", "--quiet"), run, resumed, "train")
        _wait_epochs(run / "log.jsonl", len(before) + 2, resumed)
    finally:
        _kill(resumed)
    after = _epochs(run / "log.jsonl")
    assert after == list(range(1, len(after) + 1)) and len(after) > len(before)  # no record twice, none lost


@pytest.mark.slow
def test_two_searches_into_one_run_directory(tmp_path):
    run = tmp_path / "s"
    first = _start("search", "-o", str(run), "--rounds", FOREVER, *SEARCH)
    try:
        _wait_for(run / ".lock", first)
        res = _second("search", "-o", str(run), "--rounds", "1", *SEARCH)
        _refused_by(res, run, first, "search")
        _wait_epochs(run / "log.jsonl", 2, first)
    finally:
        _kill(first)
    epochs = _epochs(run / "log.jsonl")
    assert epochs == list(range(1, len(epochs) + 1))
    assert (run / "state.pt").is_file()  # the first writer's run, resumable
