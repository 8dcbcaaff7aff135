"""The cleanup paths of irep_deploy._io: a failed atomic write and a failed run leave nothing behind.

(A SIGTERM or kill -9 inside a write is tested end to end in tests/test_bad_input.py.)
"""
from __future__ import annotations

import errno
import os

import pytest

from irep_deploy._io import (append_jsonl, atomic_write, escaped_os_error, os_cause, os_error, run_directory,
                             write_json)
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
