"""The cleanup paths of irep_deploy._io: a failed atomic write and a failed run leave nothing behind;
one writer per run directory; run files written through no link; only regular files read and written.

(A SIGTERM or kill -9 inside a write is tested end to end in tests/test_bad_input.py.)
"""
from __future__ import annotations

import errno
import json
import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from irep_deploy._io import (append_jsonl, atomic_write, check_writable, escaped_os_error, os_cause, os_error,
                             read_bounded, regular_input, run_directory, trim_jsonl, write_json)
from irep_deploy.errors import IrepError

from conftest import cli_env


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
    with pytest.raises(IrepError, match=r"log\.jsonl: is a directory; a run writes only its own regular files"):
        trim_jsonl(log, lambda r: True)
    trim_jsonl(tmp_path / "missing.jsonl", lambda r: True)  # nothing to trim


# -- one writer per run directory; run files are the run's own; only regular files --------------------
ROOT = Path(__file__).resolve().parents[1]
HOLD = ("import sys\nfrom irep_deploy._io import run_directory\n"
        "with run_directory(sys.argv[1], keep=lambda p: True, command='train'):\n"
        "    print('held', flush=True)\n    sys.stdin.read()\n")


def _holder(run):
    """A real process holding the lock of ``run`` until its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT)), universal_newlines=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holders_lock_is_free(tmp_path):
    run = tmp_path / "run"
    proc = _holder(run)
    try:
        with pytest.raises(IrepError, match=r"in use by irep-deploy train \(pid {} on .+, since \d\d:\d\d:\d\d\)"
                           .format(proc.pid)):
            with run_directory(run, keep=lambda p: True, command="search", new=False):
                pytest.fail("entered a run directory another process holds")
        info = json.loads((run / ".lock").read_text())
        assert info["pid"] == proc.pid and info["command"] == "irep-deploy train"
    finally:
        proc.kill()  # SIGKILL: no cleanup runs, the kernel drops the flock
        proc.wait()
    assert (run / ".lock").exists()  # the dead holder's file stays; its lock does not
    with run_directory(run, keep=lambda p: True, command="train", new=False):
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    assert os.listdir(str(run)) == []  # the lock file goes with its holder


def test_the_lock_is_shared_by_nested_runs_of_one_thread_and_refused_to_another_thread(tmp_path):
    run = tmp_path / "run"
    errors = []

    def other():
        try:
            with run_directory(run, keep=lambda p: True, command="train", new=False):
                pass
        except IrepError as exc:
            errors.append(str(exc))
    with run_directory(run, keep=lambda p: True, command="demo"):
        with run_directory(run, keep=lambda p: True, command="train"):  # train --baseline, demo steps
            (run / "state.pt").write_bytes(b"s")
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert len(errors) == 1 and "in use by irep-deploy demo (pid {}".format(os.getpid()) in errors[0]


def test_a_new_run_needs_a_new_or_empty_directory_and_leaves_a_refused_one_as_it_was(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "arch.bin").write_bytes(b"# the user's\r\n")
    with pytest.raises(IrepError, match="not empty \\(holds 'arch.bin'\\)"):
        with run_directory(mine, keep=lambda p: False, command="train"):
            pytest.fail("a new run entered a directory holding the user's files")
    assert os.listdir(str(mine)) == ["arch.bin"] and (mine / "arch.bin").read_bytes() == b"# the user's\r\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RuntimeError):
        with run_directory(empty, keep=lambda p: False, command="train") as d:
            (d / "log.jsonl").write_text("{}\n")
            raise RuntimeError("failed before anything resumable")
    assert empty.is_dir()  # not created by the run: kept (its lock file is gone)
    with pytest.raises(RuntimeError):
        with run_directory(tmp_path / "new", keep=lambda p: False, command="train"):
            raise RuntimeError("failed")
    assert sorted(os.listdir(str(tmp_path))) == ["empty", "mine"]


def test_a_resume_refuses_links_and_special_files_in_the_run_and_does_not_create_a_missing_one(tmp_path):
    outside = tmp_path / "outside.jsonl"
    outside.write_text("{}\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "state.pt").write_bytes(b"s")
    os.symlink(str(outside), str(run / "log.jsonl"))
    with pytest.raises(IrepError, match="log.jsonl: is a symbolic link"):
        with run_directory(run, keep=lambda p: True, command="train", new=False):
            pass
    os.unlink(str(run / "log.jsonl"))
    os.mkfifo(str(run / "log.jsonl"))
    with pytest.raises(IrepError, match="log.jsonl: is a FIFO"):
        with run_directory(run, keep=lambda p: True, command="train", new=False):
            pass
    with run_directory(tmp_path / "none", keep=lambda p: True, command="train", new=False):
        pass
    assert not (tmp_path / "none").exists() and outside.read_text() == "{}\n"


def test_appends_follow_no_link_and_write_no_file_with_other_names(tmp_path):
    outside = tmp_path / "outside.jsonl"
    outside.write_text("{\"theirs\": 1}\n")
    log = tmp_path / "log.jsonl"
    os.symlink(str(outside), str(log))
    with pytest.raises(IrepError, match="log.jsonl: is a symbolic link"):
        append_jsonl(log, {"epoch": 1})
    with pytest.raises(IrepError, match="log.jsonl: is a symbolic link"):
        trim_jsonl(log, lambda r: True)
    os.unlink(str(log))
    os.link(str(outside), str(log))
    with pytest.raises(IrepError, match="has another hard link"):
        append_jsonl(log, {"epoch": 1})
    os.unlink(str(log))
    os.mkfifo(str(log))  # no reader: a blocking open would hang here
    with pytest.raises(IrepError, match="log.jsonl"):
        append_jsonl(log, {"epoch": 1})
    assert outside.read_text() == "{\"theirs\": 1}\n"


def _specials(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(str(fifo))
    sock = tmp_path / "sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))
    s.close()
    out = [(fifo, "a FIFO"), (sock, "a socket"), (tmp_path, "a directory")]
    try:  # a private /dev/null where allowed (root); the real one is never an output of a test
        os.mknod(str(tmp_path / "null"), 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        out.append((tmp_path / "null", "a character device"))
    except OSError:
        pass
    return out


def test_inputs_that_are_not_regular_files_are_refused_unopened(tmp_path):
    for path, kind in _specials(tmp_path) + [(Path("/dev/zero"), "a character device")]:
        with pytest.raises(IrepError, match="{}: is {}, not an architecture code".format(path, kind)):
            read_bounded(path, 1 << 20, "an architecture code")
    regular_input(tmp_path / "missing", "a checkpoint")  # the reader names a missing file itself
    (tmp_path / "ok").write_bytes(b"x")
    assert read_bounded(tmp_path / "ok", 10, "a file") == b"x"


def test_outputs_that_are_not_regular_files_are_refused_before_work_and_stay(tmp_path):
    for path, kind in _specials(tmp_path):
        mode = os.lstat(str(path)).st_mode
        with pytest.raises(IrepError, match="{}: cannot write: it is {}".format(path, kind)):
            check_writable(path)
        if kind != "a directory":
            with pytest.raises(IrepError, match="{}: cannot write".format(path)):
                with atomic_write(path, "wb") as handle:
                    handle.write(b"x")
        assert os.lstat(str(path)).st_mode == mode
# -- OS errors: one line naming the path and the cause, the old file intact ---------------------------
@pytest.fixture()
def full_fs(tmp_path):
    """A tmpfs filled to the last byte (root only; skipped elsewhere)."""
    import subprocess
    where = tmp_path / "full"
    where.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    (where / "out.bin").write_bytes(b"old")
    fd = os.open(str(where / "filler"), os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    yield where
    subprocess.run(["umount", "-l", str(where)])


def test_a_full_disk_is_one_line_naming_the_file_and_the_old_file_survives(full_fs):
    target = full_fs / "out.bin"
    with pytest.raises(IrepError) as info:
        with atomic_write(target, "wb") as handle:
            handle.write(b"new" * 100000)
    assert str(info.value) == "{}: cannot write: disk full (no space left on device)".format(target)
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert target.read_bytes() == b"old" and sorted(os.listdir(str(full_fs))) == ["filler", "out.bin"]


def test_torch_save_on_a_full_disk_is_translated_although_torch_wraps_the_errno(full_fs):
    """torch's zip writer reports ENOSPC as "RuntimeError: unexpected pos"; the OSError is its context."""
    import torch
    target = full_fs / "out.bin"
    with pytest.raises(IrepError, match="disk full"):
        with atomic_write(target, "wb") as handle:
            torch.save({"w": torch.zeros(100000)}, handle)
    assert target.read_bytes() == b"old" and sorted(os.listdir(str(full_fs))) == ["filler", "out.bin"]


def test_append_jsonl_on_a_full_disk_leaves_no_cut_line(full_fs):
    log = full_fs / "log.jsonl"
    os.truncate(str(full_fs / "filler"), os.stat(str(full_fs / "filler")).st_size - 4096)
    append_jsonl(log, {"epoch": 1})
    with pytest.raises(IrepError, match="log.jsonl: cannot write: disk full"):
        append_jsonl(log, {"epoch": 2, "pad": "x" * 100000})
    assert log.read_text() == '{"epoch": 1}\n'


def test_a_write_past_the_file_size_limit_is_one_line_and_keeps_the_old_file(tmp_path):
    """Under `ulimit -f` with SIGXFSZ ignored (as the CLI does; the process table of
    benchmarks/hostile_cases/oserr.py runs the CLI itself under a limit) the write fails with EFBIG."""
    import subprocess
    import sys
    writer = ("import resource, signal, sys\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "from irep_deploy._io import atomic_write\n"
              "from irep_deploy.errors import IrepError\n"
              "try:\n"
              "    with atomic_write(sys.argv[1], 'wb') as h:\n"
              "        h.write(b'x' * 5000)\n"
              "except IrepError as exc:\n"
              "    print(exc)\n")
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    proc = subprocess.run([sys.executable, "-c", writer, str(target)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, env=cli_env(), timeout=120)
    assert proc.stdout.strip() == "{}: cannot write: file too large (over the file-size limit of this process, " \
                                  "ulimit -f, or of the file system)".format(target), proc.stderr
    assert target.read_bytes() == b"old" and os.listdir(str(tmp_path)) == ["out.bin"]


@pytest.mark.parametrize("err, words", [
    (OSError(errno.ENOSPC, "No space left on device"), "disk full (no space left on device)"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only file system"),
    (OSError(errno.EACCES, "Permission denied"), "permission denied"),
    (OSError(errno.EIO, "Input/output error"), "I/O error (a failing disk or device)"),
    (OSError(errno.EFBIG, "File too large"), "file too large"),
    (OSError(errno.EXDEV, "Invalid cross-device link"), "invalid cross-device link"),
])
def test_os_causes_are_plain_words(err, words):
    assert os_cause(err).startswith(words)
    assert str(os_error(err, "a/b.pt")) == "a/b.pt: cannot write: " + os_cause(err)


def test_an_escaped_os_error_names_its_file_and_a_wrapped_machine_fault_is_found():
    assert str(escaped_os_error(FileNotFoundError(errno.ENOENT, "No such file", "x.pt"))) == \
        "x.pt: no such file or directory"
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")
    except RuntimeError as wrapped:
        assert str(escaped_os_error(wrapped)) == "disk full (no space left on device)"
    try:
        try:
            raise FileNotFoundError(errno.ENOENT, "No such file", "cfg")
        except OSError:
            raise KeyError("a bug while handling it")
    except KeyError as bug:
        assert escaped_os_error(bug) is None  # not a fault of the machine: keeps its traceback
    assert escaped_os_error(ValueError("x")) is None


def test_safetensors_save_file_on_a_full_disk_is_translated_from_its_message(full_fs):
    """safetensors' Rust writer reports ENOSPC only in its message ("os error 28"), without an errno."""
    import torch
    from safetensors.torch import save_file
    target = full_fs / "out.bin"
    with pytest.raises(IrepError, match="out.bin: cannot write: disk full"):
        with atomic_write(target, "wb") as handle:
            side = full_fs / "side.safetensors"
            try:
                save_file({"w": torch.zeros(100000)}, str(side))
            finally:  # space is free again: only the message can tell that the disk was full
                if side.exists():
                    side.unlink()
                os.truncate(str(full_fs / "filler"), 0)
    assert target.read_bytes() == b"old"
