"""Ctrl-C that a library swallowed still stops the work, and the CLI still exits 130.

The SIGINT handler's KeyboardInterrupt can die inside library code (torch's C++ calling back into
Python, an import that reports it as ImportError). The CLI remembers the interrupt; the long loops
raise it again at their next step, and the exit status stays 130 even when CPython itself recorded
the swallowed interrupt (it would otherwise kill the process with SIGINT at exit).
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.nn as nn

from irep_deploy import build_model, fuse_model, save_checkpoint
from irep_deploy.bench.latency import measure_samples
from irep_deploy.cli import main
from irep_deploy.errors import forget_interrupts, note_interrupt, note_terminate
from irep_deploy.evaluation import evaluate_models
from irep_deploy.runtime import Dist
from irep_deploy.steps import run_epoch

from conftest import cli_env


@pytest.fixture()
def noted():
    """An interrupt the SIGINT handler noted but whose KeyboardInterrupt never arrived."""
    note_interrupt()
    yield
    forget_interrupts()


def _batches(n: int = 64):
    """What the loops see matters here, not what the images show: 4 batches of 8x8 images."""
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    return [(images[i:i + 16], labels[i:i + 16]) for i in range(0, n, 16)]


def _counting_net():
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    calls = []
    net.register_forward_hook(lambda *_: calls.append(1))
    return net, calls


def test_the_loops_run_when_no_interrupt_was_noted():
    net, calls = _counting_net()
    evaluate_models([net], _batches(), torch.device("cpu"))
    host, _ = measure_samples(lambda: net(_batches()[0][0]), lambda: None, warmup_ms=0, duration_s=0, min_iters=3)
    assert len(calls) == 4 + 1 + 3 and len(host) == 3


def test_timing_loop_stops_at_its_next_step(noted):
    steps = []
    with pytest.raises(KeyboardInterrupt):
        measure_samples(lambda: steps.append(1), lambda: None, warmup_ms=1000, duration_s=60, min_iters=10 ** 6)
    assert len(steps) == 1  # the first call, before the loops; none of the 60 s of timing


def test_evaluation_stops_before_its_first_batch(noted):
    net, calls = _counting_net()
    with pytest.raises(KeyboardInterrupt):
        evaluate_models([net], _batches(), torch.device("cpu"))
    assert calls == []


def test_training_epoch_stops_before_its_first_step(noted):
    net, calls = _counting_net()
    weight = net[1].weight.detach().clone()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)

    def loss_of(x, y):
        logits = net(x)
        return nn.functional.cross_entropy(logits, y), logits

    with pytest.raises(KeyboardInterrupt):
        run_epoch(net, _batches(), loss_of, [optimizer], None, torch.device("cpu"), Dist())
    assert calls == [] and torch.equal(net[1].weight, weight)


def test_cli_bench_swallowed_interrupt_is_one_line_and_130(tmp_path, capsys):
    """The Ctrl-C is noted while the bench times (as a swallowing library leaves it): main returns
    130 at the next step instead of timing on for 60 s and returning 0."""
    model = fuse_model(build_model("resnet18_cifar", width=0.125, num_classes=10))
    path = tmp_path / "deploy.pt"
    save_checkpoint(path, model)
    timer = threading.Timer(2.0, note_interrupt)
    timer.start()
    try:
        code = main(["bench", str(path), "--duration", "60", "--iterations", "10", "--backend", "torch"])
    finally:
        timer.cancel()
        forget_interrupts()
    err = capsys.readouterr().err
    assert code == 130 and err.strip().splitlines() == ["irep-deploy bench: interrupted"], err


_RECORDED_BY_CPYTHON = r"""
import sys
from irep_deploy.cli import main
from irep_deploy.errors import note_interrupt
main(["show", sys.argv[1]])  # a first run imports what the command needs (their dataclasses exec strings too)
note_interrupt()
# Ctrl-C landing in code run from source text, as it does in the functions dataclasses and torch build
# with exec while torch imports: caught here, yet CPython records it as unhandled
try:
    exec("raise KeyboardInterrupt", {})
except KeyboardInterrupt:
    pass
sys.exit(main(["show", sys.argv[1]]))
"""


def test_exit_status_is_130_when_cpython_recorded_a_swallowed_interrupt(tmp_path):
    """Run with ``-m``, as ``python -m irep_deploy`` is: CPython acts on its record on that path
    (without the fix the status is -2, death by SIGINT)."""
    (tmp_path / "swallowed.py").write_text(_RECORDED_BY_CPYTHON)
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join((str(tmp_path), env["PYTHONPATH"]))
    proc = subprocess.run([sys.executable, "-m", "swallowed", str(tmp_path / "none.pt")], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert proc.returncode == 130, (proc.returncode, proc.stderr[-1000:])
    assert proc.stderr.strip().splitlines()[-1] == "irep-deploy: interrupted"


# -- SIGTERM: at any moment one line and 143, nothing half-written -------------------------------------
@pytest.fixture(scope="module")
def deploy_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("term") / "deploy.pt"
    save_checkpoint(path, fuse_model(build_model("resnet18_cifar", width=0.125, num_classes=10)))
    return path


@pytest.mark.parametrize("delay", [0.3, 1.0, 2.5])
def test_sigterm_at_any_moment_is_one_line_and_143(deploy_ckpt, tmp_path, delay):
    """Early (Python importing the CLI, then torch) and late (timing): the same outcome, and the
    --json report is not written. The delays only spread the moments; nothing is timed."""
    out = tmp_path / "report.json"
    proc = subprocess.Popen([sys.executable, "-m", "irep_deploy", "bench", str(deploy_ckpt), "--duration", "60",
                             "--iterations", "1000000", "--backend", "torch", "--json", str(out)], env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    time.sleep(delay)
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    assert proc.returncode == 143, (proc.returncode, err[-2000:])
    assert "Traceback" not in err and err.strip().splitlines() in (["irep-deploy bench: terminated (SIGTERM)"],
                                                                   ["irep-deploy: terminated (SIGTERM)"]), err
    assert os.listdir(str(tmp_path)) == []


def test_a_swallowed_sigterm_still_stops_the_work(tmp_path, capsys, deploy_ckpt):
    """A library that swallowed the Terminated (as one may swallow a KeyboardInterrupt): the noted
    SIGTERM stops the timing loop at its next step, 143."""
    timer = threading.Timer(2.0, note_terminate)
    timer.start()
    try:
        code = main(["bench", str(deploy_ckpt), "--duration", "60", "--iterations", "10", "--backend", "torch"])
    finally:
        timer.cancel()
        forget_interrupts()
    err = capsys.readouterr().err
    assert code == 143 and err.strip().splitlines() == ["irep-deploy bench: terminated (SIGTERM)"], err
