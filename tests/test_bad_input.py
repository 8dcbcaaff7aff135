"""Bad input never loses a file and never crashes (issue 10).

The table of cases lives in benchmarks/bad_input.py (the same table writes results/bad_input.md);
here each case is one test: documented exit code, one stderr line naming the file or flag, no
traceback, every input unchanged (sha256) and no new file. Signals, Ctrl-C during the torch import
and the console entry point run as real subprocesses.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from irep_deploy import build_model, fuse_model, save_checkpoint
from irep_deploy.cli import main

from conftest import cli_env

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bad_input", str(ROOT / "benchmarks" / "bad_input.py"))
bad_input = importlib.util.module_from_spec(_spec)
sys.modules["bad_input"] = bad_input  # dataclasses resolve annotations through sys.modules
_spec.loader.exec_module(bad_input)  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def table_env(tmp_path_factory):
    work = tmp_path_factory.mktemp("bad")
    d = work / "w"
    d.mkdir()
    f = bad_input.make_fixtures(d)
    pristine = work / "pristine"
    shutil.copytree(str(d), str(pristine), symlinks=True)
    return f, bad_input.snapshot(d), d, pristine


def test_the_table_is_large_enough():
    assert len(bad_input.CASES) >= 60
    assert len({c.category for c in bad_input.CASES}) >= 8


@pytest.mark.parametrize("case", bad_input.CASES, ids=[c.id for c in bad_input.CASES])
def test_bad_input(case, table_env):
    if case.argv[0] == "plot":
        pytest.importorskip("matplotlib")  # the [viz] extra; absent from the JetPack (Python 3.8) lane
    if "digits" in case.argv and case.argv[0] in ("train", "search", "demo"):
        pytest.importorskip("sklearn")  # these fail only once the data is loaded
    f, base, d, pristine = table_env
    outcome = bad_input.run_case(case, f, base)
    if outcome.changed or outcome.new:
        bad_input.restore(f, d, pristine)
    assert outcome.problems == [], "exit {}; changed {}; new {}; stderr:\n{}".format(
        outcome.rc, outcome.changed, outcome.new, outcome.stderr[-3000:])


# -- real processes ------------------------------------------------------------------------------------
def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "irep_deploy"] + [str(a) for a in args], env=cli_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout)


_PEAK_RSS = r"""
import resource, subprocess, sys
proc = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
sys.stdout.write("%d %d\n%s" % (proc.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, proc.stderr))
"""


def test_show_dev_zero_answers_in_one_short_line_with_bounded_memory():
    # a fresh parent, so that RUSAGE_CHILDREN holds the CLI's peak RSS alone
    proc = subprocess.run([sys.executable, "-c", _PEAK_RSS, sys.executable, "-m", "irep_deploy", "show", "/dev/zero"],
                          env=cli_env(), stdout=subprocess.PIPE, universal_newlines=True, timeout=60)
    head, _, stderr = proc.stdout.partition("\n")
    rc, peak_kib = map(int, head.split())
    lines = stderr.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and "/dev/zero" in lines[0] and len(lines[0]) < 200, stderr[-2000:]
    # refused before torch loads (about 850 MB RSS); the unbounded reader was OOM-killed at 22.7 GB
    assert peak_kib < 200 * 1024


def test_a_1gb_arch_file_is_refused_without_reading_it(tmp_path):
    big = tmp_path / "big.bin"
    with open(str(big), "wb") as handle:
        handle.truncate(1 << 30)  # sparse: 1 GB of NUL bytes without using the disk
    proc = _cli("show", big, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and str(big) in lines[0] and len(lines[0]) < 300


def test_console_entry_bad_header_is_one_line_without_traceback(table_env):
    f = table_env[0]
    proc = _cli("fuse", f["h_widthabc"], f["arch"], "-o", f["dir"] / "x.pt")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "'width'" in proc.stderr


@pytest.mark.parametrize("delay", [0.3, 1.0, 2.5])
def test_ctrl_c_at_any_moment_is_one_line_and_130(table_env, delay):
    """SIGINT early (0.3 s: while torch imports) and later (while benchmarking): same outcome."""
    f = table_env[0]
    proc = subprocess.Popen([sys.executable, "-m", "irep_deploy", "bench", str(f["deploy"]), "--duration", "60",
                             "--iterations", "1000000"], env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()  # an interrupt that was lost: the bench would run on after the test
        proc.communicate()
        raise
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    # before the parser knows the command (torch still importing) the line says "irep-deploy: interrupted"
    assert "Traceback" not in err and err.strip().splitlines() in (["irep-deploy bench: interrupted"],
                                                                   ["irep-deploy: interrupted"])


def test_import_does_not_load_torch_and_public_names_still_work():
    code = ("import sys, irep_deploy; assert 'torch' not in sys.modules, 'eager'; "
            "from irep_deploy.cli import build_parser; build_parser(); assert 'torch' not in sys.modules, 'parser'; "
            "from irep_deploy import ArchCode, Checkpoint, IrepError, build_model, fuse_model; "
            "print(ArchCode.__name__, sorted(n for n in irep_deploy.__all__ if not n.startswith('_'))[:2])")
    proc = subprocess.run([sys.executable, "-c", code], env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ArchCode")


_SIGTERM_WRITER = r"""
import os, signal, sys
from irep_deploy._io import atomic_write
from irep_deploy.errors import Terminated
target = sys.argv[1]
try:
    with atomic_write(target, "wb") as handle:
        handle.write(b"x" * 100000)
        os.kill(os.getpid(), signal.SIGTERM)   # a real SIGTERM inside the write window
        handle.write(b"never")
except Terminated:
    print("terminated", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
"""


def test_sigterm_inside_a_write_removes_the_temp_file_and_restores_the_handler(tmp_path):
    target = tmp_path / "out.pt"
    proc = subprocess.run([sys.executable, "-c", _SIGTERM_WRITER, str(target)], env=cli_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert proc.stdout.strip() == "terminated True", proc.stderr
    assert os.listdir(str(tmp_path)) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftover_temp_files_of_killed_runs_are_removed_by_the_next_write(table_env, tmp_path):
    f = table_env[0]
    out = tmp_path / "out.pt"
    dead = tmp_path / ".out.pt.{}.abcd1234.tmp".format(_dead_pid())
    live = tmp_path / ".out.pt.{}.abcd1234.tmp".format(os.getppid())  # a live process: maybe still writing
    old = tmp_path / ".out.pt.zz9_ab12.tmp"  # no PID part (older versions): removed once a minute old
    fresh = tmp_path / ".out.pt.zz9_cd34.tmp"
    other = tmp_path / ".other.pt.{}.abcd1234.tmp".format(_dead_pid())  # another output's: not ours to touch
    for p in (dead, live, old, fresh, other):
        p.write_bytes(b"partial")
    os.utime(str(old), (time.time() - 120, time.time() - 120))
    assert main(["fuse", str(f["multi"]), str(f["arch"]), "-o", str(out)]) == 0
    assert sorted(os.listdir(str(tmp_path))) == sorted(p.name for p in (out, live, fresh, other))


def test_a_killed_writer_leaves_a_temp_file_that_the_next_run_removes(table_env, tmp_path):
    """kill -9 inside the write window (the temp file exists, the rename has not happened)."""
    f = table_env[0]
    target = tmp_path / "deploy.onnx"
    code = ("import os, signal, sys; from irep_deploy._io import atomic_write\n"
            "with atomic_write(sys.argv[1]) as h:\n    h.write(b'half'); h.flush(); os.kill(os.getpid(), 9)\n")
    subprocess.run([sys.executable, "-c", code, str(target)], env=cli_env(), timeout=60)
    left = [n for n in os.listdir(str(tmp_path)) if n.endswith(".tmp")]
    assert len(left) == 1 and not target.exists()
    assert main(["export", str(f["deploy"]), "-o", str(target), "--simplify", "none"]) == 0
    assert os.listdir(str(tmp_path)) == ["deploy.onnx"]


def test_eval_of_a_fused_checkpoint_uses_the_dataset_recorded_at_training(tmp_path, capsys):
    pytest.importorskip("sklearn")
    # as `train` on digits writes it: 8x8 inputs (eval refuses data of another size than the header's)
    model = build_model("resnet18_cifar", width=0.125, num_classes=10, in_channels=1, input_size=8).eval()
    save_checkpoint(tmp_path / "ckpt.pt", model, extra={"dataset": "digits"})
    assert main(["fuse", str(tmp_path / "ckpt.pt"), str(_empty_code(tmp_path)), "-o", str(tmp_path / "d.pt")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "d.pt"), "--limit", "64"]) == 0
    assert capsys.readouterr().out.startswith("digits test split")


def test_eval_of_an_old_checkpoint_without_dataset_says_to_pass_it(tmp_path, capsys):
    save_checkpoint(tmp_path / "old.pt", fuse_model(build_model("resnet18_cifar", width=0.125, in_channels=1).eval()))
    assert main(["eval", str(tmp_path / "old.pt")]) == 1
    err = capsys.readouterr().err
    assert "pass --dataset" in err and len(err.strip().splitlines()) == 1


def _empty_code(d: Path) -> Path:
    from irep_deploy import ArchCode
    ArchCode.empty("resnet18_cifar").save(d / "empty.bin")
    return d / "empty.bin"
