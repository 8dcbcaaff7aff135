"""Errors: one line for the user, the whole cause (torch's message and frames) under --debug."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from irep_deploy import errors
from irep_deploy.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def unsafe_ckpt(tmp_path_factory) -> Path:
    """A torch archive holding a pickled object: weights_only=True refuses it with a long, multi-line message."""
    path = tmp_path_factory.mktemp("err") / "unsafe.pt"
    torch.save({"format": "irep-deploy-checkpoint", "x": argparse.Namespace(a=1)}, str(path))
    return path


def _cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "irep_deploy"] + list(argv), cwd=str(cwd), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=300)


def test_debug_shows_the_chained_cause(unsafe_ckpt):
    # --trust-pickle: the unpickler is reached on every torch (without it torch < 2.10 refuses unread)
    plain = _cli("fuse", str(unsafe_ckpt), "arch.txt", "--trust-pickle", cwd=unsafe_ckpt.parent)
    assert plain.returncode == 1 and len(plain.stderr.strip().splitlines()) == 1, plain.stderr
    assert "refused" in plain.stderr and "Traceback" not in plain.stderr
    assert "argparse.Namespace" not in plain.stderr  # torch names the class on a later line of its message
    debug = _cli("--debug", "fuse", str(unsafe_ckpt), "arch.txt", "--trust-pickle", cwd=unsafe_ckpt.parent)
    assert debug.returncode != 0
    assert "The above exception was the direct cause of the following exception" in debug.stderr
    assert "UnpicklingError" in debug.stderr and "argparse.Namespace" in debug.stderr  # the whole cause
    assert "torch/serialization.py" in debug.stderr.replace("\\", "/")  # and torch's frames
    assert debug.stderr.rstrip().splitlines()[-1].startswith("irep_deploy.errors.CheckpointError: ")


def test_in_process_error_is_chained_and_one_line(unsafe_ckpt, capsys):
    with pytest.raises(errors.CheckpointError) as info:
        main(["--debug", "fuse", str(unsafe_ckpt), str(unsafe_ckpt.parent / "arch.txt"), "--trust-pickle"])
    assert type(info.value.__cause__).__name__ == "UnpicklingError"
    assert main(["fuse", str(unsafe_ckpt), str(unsafe_ckpt.parent / "arch.txt"), "--trust-pickle"]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_error_types_live_in_errors_and_keep_their_old_paths():
    from irep_deploy.bench.devices import DeviceMismatchError
    from irep_deploy.data import DataError
    from irep_deploy.engines.tensorrt import EngineMismatchError
    from irep_deploy.train import TrainingDiverged
    from irep_deploy.viz import PlotError

    for cls in (DataError, TrainingDiverged, PlotError, EngineMismatchError, DeviceMismatchError):
        assert getattr(errors, cls.__name__) is cls and issubclass(cls, errors.IrepError)
    assert TrainingDiverged.exit_code == 2 and errors.VerificationError.exit_code == 3


def test_argument_errors_are_usage_errors_and_still_value_errors():
    from irep_deploy import build_model
    from irep_deploy.arch import budget_count
    from irep_deploy.ops import check_ops

    for call in (lambda: check_ops(["nope"]), lambda: budget_count(10, 1.5),
                 lambda: build_model("resnet18_cifar", width=0)):
        with pytest.raises(errors.UsageError) as info:
            call()
        assert isinstance(info.value, ValueError) and info.value.exit_code == 2


@pytest.mark.parametrize("message, want", [("", "KeyError"), ("\n\n  first  \nsecond", "first"),
                                           ("x" * 300, "x" * 197 + "...")])
def test_first_line(message, want):
    assert errors.first_line(RuntimeError(message) if message else KeyError()) == want


@pytest.mark.parametrize("text, want", [
    ("plain", "plain"),
    ("a\nb", "a\\nb"),
    ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
    ("tab\there", "tab\\there"),
    ("rtl\u202eevil", "rtl\\u202eevil"),
    ("not utf-8 \udcff", "not utf-8 \\udcff"),
    ("ünïcödé ok", "ünïcödé ok"),
])
def test_printable_escapes_what_a_terminal_would_act_on(text, want):
    assert errors.printable(text) == want


def test_an_error_line_with_a_newline_in_a_file_name_is_one_escaped_line(tmp_path, capsys):
    bad = tmp_path / "evil\nname\x1b[2J.bin"
    bad.write_text("nonsense\n")
    assert main(["show", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err
    assert "evil\\nname\\x1b[2J.bin" in err


def test_an_argparse_error_is_escaped_too(capsys):
    assert main(["show", "a", "--bogus\x1b[2J"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err and "--bogus\\x1b[2J" in err


def test_an_os_error_nothing_translated_is_one_line_not_a_traceback(tmp_path, capsys):
    """The CLI's last resort: an OSError with a file name that escaped a command (here a Path.exists
    that raises for a name longer than the kernel accepts) names the file and the cause."""
    long = tmp_path / ("n" * 300 + ".pt")
    rc = main(["fuse", str(tmp_path / "m.pt"), str(tmp_path / "a.bin"), "-o", str(long)])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "file name too long" in err


def test_stdout_errors_are_told_apart(capsys):
    from irep_deploy._io import guarded_stdout

    class Closed:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    old = sys.stdout
    sys.stdout = Closed()
    try:
        with guarded_stdout():
            with pytest.raises(errors.StdoutError) as info:
                print("x")
    finally:
        sys.stdout = old
    assert info.value.broken_pipe and str(info.value) == "stdout: broken pipe (the reader is gone)"


@pytest.mark.parametrize("argv, flag", [
    (["train", "--dataset", "digits", "--backbone", "resnet18_cifar"], "-o RUN_DIR"),
    (["train", "--resume", "nowhere", "--epochs", "5"], "--epochs"),
    (["search", "--resume", "nowhere", "--preset", "cpu"], "--preset"),
])
def test_flag_conflicts_are_usage_errors(argv, flag, capsys):
    assert main(argv) == 2
    assert flag in capsys.readouterr().err
