"""Shared by the whole suite: the CUDA marker rule, the one-thread fixture, and helpers the test
modules import (``from conftest import randomize_bn``; tests/train and tests/deploy are packages so that
their own conftest files never shadow this one)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Tuple

import pytest
import tempfile
import torch
import torch.nn as nn

# Ultralytics reads both when it is first imported, by whichever test module comes first (the
# network matrix or tests/integrations): never online (CI has no network), never the user's home.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="yolo-config-"))


def randomize_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, as after training."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
    return module


def randomize_arch_params(module: nn.Module, seed: int = 0) -> nn.Module:
    """Spread alpha/beta away from their equal initial values so the scales matter."""
    from irep_deploy.block import IrepConv
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, IrepConv):
            with torch.no_grad():
                m.alpha.copy_(torch.randn(m.alpha.shape, generator=gen))
                m.beta.copy_(torch.randn((), generator=gen))
    return module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    from irep_deploy.compare import compare
    return compare(a, b).rel_error


ROOT = Path(__file__).resolve().parents[1]


def cli_env() -> Dict[str, str]:
    """The environment of a CLI run in its own process: one OpenMP thread (2 shared cores), no progress
    bars (a loaded machine stretches a step past their 10 s delay at random, and these tests read
    stderr line by line; tests/test_progress.py checks the bars), the repository root importable
    (``tests.byon_nets``) and Python's default warning filters."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(OMP_NUM_THREADS="1", IREP_DEPLOY_QUIET="1", PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p))
    return env


def run_cli(cwd: Path, *argv: str) -> Tuple[int, str, str]:
    """``python -m irep_deploy ARGV`` in ``cwd``, as a user types it: (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "irep_deploy", *map(str, argv)], cwd=str(cwd), env=cli_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(autouse=True)
def _no_progress_bars_in_captures(monkeypatch):
    """A command run in-process draws no progress bar into the test's capture: where stderr is not a
    terminal a bar shows once its step has run DELAY_S, which a loaded machine reaches at random, and an
    error test counts stderr's lines. tests/test_progress.py sets the delay to 0 to see every bar."""
    from irep_deploy import progress
    monkeypatch.setattr(progress, "DELAY_S", float("inf"))


@pytest.fixture
def one_thread():
    """One torch thread: on a loaded 2-core machine a thread pool waits out whole time slices (~30 ms)
    on its barrier, which swamps tiny models and short timings."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


NO_CUDA = "no CUDA GPU on this machine (torch.cuda.is_available() is False)"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Tests under tests/gpu are the CUDA suite: mark them `cuda`; skip every `cuda` test without a GPU."""
    suite = config.rootpath / "tests" / "gpu"
    have_cuda = torch.cuda.is_available()
    for item in items:
        if suite in item.path.parents:
            item.add_marker(pytest.mark.cuda)
        if item.get_closest_marker("cuda") and not have_cuda:
            item.add_marker(pytest.mark.skip(reason=NO_CUDA))


def fashion_mnist(count: int, start: int = 0, part: str = "test"):
    """``count`` real Fashion-MNIST images (float in [0, 1], 1x28x28) and labels, from ``start``."""
    from irep_deploy.data import raw_dataset
    ds = raw_dataset("fashion-mnist", part)
    return ds.images[start:start + count].float() / 255.0, ds.labels[start:start + count]


def as_rgb(images: torch.Tensor, size: int) -> torch.Tensor:
    """Grey images as the 3-channel, ``size`` x ``size``, normalised input torchvision models take."""
    import torch.nn.functional as F
    x = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return ((x - 0.2860) / 0.3530).repeat(1, 3, 1, 1)
