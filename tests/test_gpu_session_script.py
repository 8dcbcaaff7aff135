"""benchmarks/gpu_session.sh, the one script a session with a GPU runs through the device tool
(docs/testing.md, "A session with a GPU"): its dry run (GPU_SESSION_DRY=1) prints every step it would
run, each under its own `timeout`, writing into $OUT, within the tool's 10 minutes per call; it
finds carried Fashion-MNIST; without $OUT it refuses in one line. Its real run needs the GPU machine."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Dict, Optional

import pytest

from irep_deploy.data import FASHION_MNIST_ROOT

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
         "t10k-labels-idx1-ubyte.gz")
STEP = re.compile(r"^\+ \[(\w+)\] timeout -k \d+ (\d+) (.+) >> (\S+)$")


def run(out: Optional[Path], **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("GPU_SESSION_") and k != "OUT"}
    full.update(env, GPU_SESSION_DRY="1")
    if out is not None:
        full["OUT"] = str(out)
    return subprocess.run(["bash", str(SCRIPT)], cwd=str(ROOT), env=full, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60)


def steps(stdout: str) -> Dict[str, re.Match]:
    return {m.group(1): m for m in map(STEP.match, stdout.splitlines()) if m}


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_the_dry_run_prints_every_step_with_its_limit_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    proc = run(out, GPU_SESSION_FMNIST=str(tmp_path / "absent"))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    found = steps(proc.stdout)
    assert list(found) == ["install", "gpu", "suite", "speed"], proc.stdout
    install, gpu, suite, speed = (found[k].group(3) for k in found)
    assert "-m pip install" in install and "--no-index" in install and "--no-deps" in install and install.endswith("-e .")
    assert gpu == "nvidia-smi -L"
    assert "-m pytest" in suite and "-m cuda" in suite and "--junitxml {}/cuda_suite.xml".format(out) in suite
    assert found["suite"].group(4) == "{}/cuda_suite.txt".format(out)
    assert "benchmarks/gpu_speed.py --out {} --budget-s".format(out) in speed and "--data-root" not in speed
    assert found["speed"].group(4) == "{}/gpu_speed.txt".format(out)
    assert found["install"].group(4) == found["gpu"].group(4) == "{}/session.txt".format(out)
    limits = {k: int(m.group(2)) for k, m in found.items()}
    assert sum(limits.values()) <= 9 * 60  # one device call (10 minutes at most) with a minute to spare
    budget = float(re.search(r"--budget-s (\S+)", speed).group(1))
    assert 0 < budget < limits["speed"]  # gpu_speed.py ends its last section inside the step's limit
    assert "fashion-mnist: not carried" in proc.stdout
    assert not out.exists()  # a dry run writes nothing


def test_limits_can_be_set_and_keep_the_budget_inside_the_speed_step(tmp_path):
    proc = run(tmp_path, GPU_SESSION_SUITE_S="100", GPU_SESSION_SPEED_S="200")
    found = steps(proc.stdout)
    assert found["suite"].group(2) == "100" and found["speed"].group(2) == "200"
    assert "--budget-s 170" in found["speed"].group(3)


@pytest.mark.skipif(not all((Path(FASHION_MNIST_ROOT) / f).is_file() for f in FILES),
                    reason="Fashion-MNIST is not at {}".format(FASHION_MNIST_ROOT))
def test_carried_fashion_mnist_becomes_the_data_root_of_the_speed_step(tmp_path):
    carried = tmp_path / "fashion-mnist"
    carried.mkdir()
    for name in FILES[:3]:
        (carried / name).symlink_to(Path(FASHION_MNIST_ROOT) / name)
    partial = steps(run(tmp_path / "out", GPU_SESSION_FMNIST=str(carried)).stdout)
    assert "--data-root" not in partial["speed"].group(3)  # three files of four are not the data set
    (carried / FILES[3]).symlink_to(Path(FASHION_MNIST_ROOT) / FILES[3])
    proc = run(tmp_path / "out", GPU_SESSION_FMNIST=str(carried))
    assert steps(proc.stdout)["speed"].group(3).endswith("--data-root {}".format(carried))
    assert "fashion-mnist: {}".format(carried) in proc.stdout


def test_without_out_it_refuses_in_one_line():
    proc = run(None)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "gpu_session: OUT is not set (the device tool sets it: the folder whose files come back)"]
