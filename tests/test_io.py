"""The cleanup paths of irep_deploy._io: a failed atomic write and a failed run leave nothing behind.

(A SIGTERM or kill -9 inside a write is tested end to end in tests/test_bad_input.py.)
"""
from __future__ import annotations

import os

import pytest

from irep_deploy._io import atomic_write, run_directory, trim_jsonl, write_json
from irep_deploy.errors import IrepError


def test_a_write_that_fails_midway_keeps_the_old_file_and_removes_its_temp_file(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"version": 1})
    before = target.read_bytes()
    with pytest.raises(ZeroDivisionError):
        with atomic_write(target, "w") as handle:
            handle.write("{\"version\": 2, ")
            handle.flush()
            1 / 0  # the producer fails after part of the new file is on disk
    assert target.read_bytes() == before
    assert os.listdir(str(tmp_path)) == ["out.json"]


def test_a_failed_run_removes_every_directory_it_created(tmp_path):
    run = tmp_path / "runs" / "new" / "run"
    with pytest.raises(RuntimeError):
        with run_directory(run, keep=lambda p: (p / "state.pt").exists()) as d:
            (d / "log.jsonl").write_text("{}\n")  # written, but nothing resumable
            raise RuntimeError("diverged")
    assert os.listdir(str(tmp_path)) == []


def test_a_failed_run_keeps_a_resumable_run_and_directories_it_did_not_create(tmp_path):
    resumable = tmp_path / "resumable"
    with pytest.raises(RuntimeError):
        with run_directory(resumable, keep=lambda p: (p / "state.pt").exists()) as d:
            (d / "state.pt").write_bytes(b"state")
            raise RuntimeError("interrupted")
    assert (resumable / "state.pt").read_bytes() == b"state"

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("the user's")
    with pytest.raises(RuntimeError):
        with run_directory(existing / "run", keep=lambda p: False):
            raise RuntimeError("failed")
    assert os.listdir(str(existing)) == ["notes.txt"]


def test_trim_jsonl_keeps_records_drops_cut_lines_and_refuses_what_the_run_did_not_write(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_bytes(b'{"epoch": 1}\n[1, 2]\n5\n{"epoch": 2}\n{"epoch": 3, "cut sh')
    trim_jsonl(log, lambda r: r["epoch"] <= 2)  # records that are not objects never reach ``keep``
    assert log.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'
    log.write_bytes(b'{"epoch": 1}\n\xff\xfe\n')
    with pytest.raises(IrepError, match=r"log\.jsonl: not a log of this run \(not UTF-8 text at byte 13\)"):
        trim_jsonl(log, lambda r: True)
    assert log.read_bytes() == b'{"epoch": 1}\n\xff\xfe\n'  # refused before anything is written
    log.unlink()
    log.mkdir()
    with pytest.raises(IrepError, match=r"log\.jsonl: cannot read the run's log \(Is a directory\)"):
        trim_jsonl(log, lambda r: True)
    trim_jsonl(tmp_path / "missing.jsonl", lambda r: True)  # nothing to trim
