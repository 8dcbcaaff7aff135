"""The second bad-input table (issue 21): faults of the environment, hostile files, two writers.

The cases live in benchmarks/hostile_cases/ (one file per area) and run through benchmarks/hostile.py,
which also writes results/hostile.md; here each case is one test: documented exit code, one stderr
line naming the file or flag, no traceback, every pre-existing file unchanged (sha256), no leftover,
no module named by a file imported. A case this machine cannot stage (a tmpfs without root) skips
with its reason.
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("hostile", str(ROOT / "benchmarks" / "hostile.py"))
hostile = importlib.util.module_from_spec(_spec)
sys.modules["hostile"] = hostile  # dataclasses resolve annotations through sys.modules
_spec.loader.exec_module(hostile)  # type: ignore[union-attr]

CASES = hostile.all_cases()


@pytest.fixture(scope="module")
def hostile_env(tmp_path_factory):
    work = tmp_path_factory.mktemp("hostile")
    d = work / "w"
    d.mkdir()
    f = hostile.make_fixtures(d)
    pristine = work / "pristine"
    shutil.copytree(str(d), str(pristine), symlinks=True)
    return f, d, pristine


def test_the_table_is_large_enough():
    assert len(CASES) >= 150
    assert len({c.category for c in CASES}) >= 10


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile(case, hostile_env):
    f, d, pristine = hostile_env
    outcome = hostile.run_case(case, f, d)
    shutil.rmtree(str(d / "case"), ignore_errors=True)
    if outcome.problems:
        hostile.restore(f, d, pristine)
    if outcome.skipped:
        pytest.skip(outcome.skipped)
    assert outcome.problems == [], "exit {}; stderr:\n{}".format(outcome.rc, outcome.stderr[-3000:])


def test_the_totals_count_each_case_under_its_worst_problem_and_changed_inputs_apart():
    bad_input = hostile._bad_input()
    verdicts = ["one-line error", "clean", "skipped", "traceback", "input destroyed", "hang", "import", "leftover"]
    changed = [False, False, False, True, True, False, False, False]
    count = bad_input.totals(verdicts, changed)
    assert count == {"cases": 8, "one-line errors": 1, "clean successes": 1, "skipped": 1, "tracebacks": 1,
                     "wrong successes": 0, "changed inputs": 2, "hangs": 1, "imports": 1, "other problems": 1}
