"""No long step without a sign of life (issue 25, item 4): every step that can run past ~10 s on the
README's commands shows a progress bar on stderr, never on stdout, and none with --quiet.

Each row of STEPS runs the real code of that step on a tiny input (a Fashion-MNIST-shaped network of
width 0.125, 64 images), with the bar's delay set to 0 so that a step of milliseconds shows its bar as a
long one does. docs/progress.md lists the same steps; test_the_docs_list_every_step keeps the two equal.
"""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List

import numpy as np
import pytest
import torch

from irep_deploy import ArchCode, build_model, fuse_model, progress, save_checkpoint
from irep_deploy.cli import main
from irep_deploy.data import FASHION_MNIST_ROOT

from conftest import ROOT, randomize_arch_params, randomize_bn

pytestmark = pytest.mark.skipif(not (Path(FASHION_MNIST_ROOT) / "t10k-images-idx3-ubyte.gz").is_file(),
                                reason="Debian package dataset-fashion-mnist not installed (make data)")
FAST_BENCH = ["--warmup", "0", "--duration", "0.01", "--iterations", "1", "--rounds", "2", "--batch", "1"]
DATA = ["--dataset", "fashion-mnist", "--limit", "64"]

# step (as docs/progress.md names it) -> (command line, with {placeholders} from the `files` fixture,
# and the bar descriptions it must show). A command line None: the step is run by a test of its own.
STEPS: Dict[str, tuple] = {
    "fuse: load, fuse, check, write": (["fuse", "{multi}", "{arch}", "-o", "{dir}/deploy.pt"], ["fuse"]),
    "export: load, trace, simplify, check, onnxruntime vs torch, write": (
        ["export", "{deploy}", "-o", "{dir}/model.onnx"], ["export"]),
    "quantize: calibration batches": (["quantize", "{onnx}", "--calib", "fashion-mnist", "--calib-size", "64",
                                       "--min-cosine", "-1", "-o", "{dir}/model.int8.onnx"],
                                      ["quantize: calibrating"]),
    "eval of an ONNX file: batches": (["eval", "{onnx}", *DATA], ["eval"]),
    "eval of a checkpoint: batches": (["eval", "{deploy}", *DATA, "--device", "cpu"], ["eval"]),
    "bench: preparing (export, INT8 calibration) and timing (rounds x jobs)": (
        ["bench", "{deploy}", "--device", "cpu", *FAST_BENCH], ["bench: preparing", "bench: timing"]),
    "train: epochs and the final test evaluation": (
        ["train", "-o", "{dir}/run", "--model", "resnet18_cifar", "--width", "0.125", "--epochs", "1", "--batch-size",
         "32", *DATA, "--device", "cpu"], ["epoch 1/1", "test: multi-branch and fused"]),
    "search: epochs and the scoring of the population": (None, ["search: scoring codes"]),
    "build-trt: INT8 calibration batches and stages (build, verify)": (None, ["build-trt: calibrating"]),
}
# What a tqdm bar looks like: "desc: 100%|####| 3/3 [00:00<00:00, ...]" or "desc: 3it [00:00, ...]".
BAR = re.compile(r"\d+/\d+ \[|\d+\w* \[\d\d:\d\d")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Dict[str, str]:
    d = tmp_path_factory.mktemp("progress")
    torch.manual_seed(0)
    code = ArchCode.random("resnet18_cifar", ratio=2 / 3, seed=3)
    code.save(d / "arch.bin")
    multi = build_model("resnet18_cifar", arch=code, width=0.125, num_classes=10, in_channels=1, input_size=28)
    multi = randomize_arch_params(randomize_bn(multi)).eval()
    save_checkpoint(d / "multi.pt", multi)
    save_checkpoint(d / "deploy.pt", fuse_model(multi))
    assert main(["export", str(d / "deploy.pt"), "-o", str(d / "model.onnx"), "--quiet"]) == 0
    return {"dir": str(d), "multi": str(d / "multi.pt"), "arch": str(d / "arch.bin"),
            "deploy": str(d / "deploy.pt"), "onnx": str(d / "model.onnx")}


@pytest.fixture
def no_delay(monkeypatch):
    """Bars show at once where stderr is not a terminal (a capture), as they do after DELAY_S on a long step."""
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    torch.set_num_threads(1)


def _run(capsys, argv: List[str], files: Dict[str, str], out_dir: Path) -> tuple:
    names = dict(files, dir=str(out_dir))
    rc = main([a.format(**names) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("step", [s for s, (argv, _) in STEPS.items() if argv is not None])
def test_the_step_shows_progress_on_stderr_and_none_with_quiet(step, files, no_delay, tmp_path, capsys):
    argv, bars = STEPS[step]
    (tmp_path / "loud").mkdir()
    rc, out, err = _run(capsys, argv, files, tmp_path / "loud")
    assert rc == 0, err
    for desc in bars:
        assert re.search(re.escape(desc) + r":.*(" + BAR.pattern + ")", err), (desc, err)
    assert not BAR.search(out), out  # stdout: results only
    # a log keeps each bar as lines, not as one line of carriage returns that a pager shows as a blur
    assert all(line.count("\r") <= 2 for line in err.split("\n")), err
    (tmp_path / "quiet").mkdir()
    rc, quiet_out, quiet_err = _run(capsys, argv + ["--quiet"], files, tmp_path / "quiet")
    assert rc == 0, quiet_err
    assert not BAR.search(quiet_err) and not any(desc + ":" in quiet_err for desc in bars), quiet_err


def test_search_scoring_shows_progress_and_none_when_quiet(no_delay, tmp_path, capsys):
    from irep_deploy.runtime import Dist
    from irep_deploy.search.des import _Search, make_config

    config = make_config(None, backbone="resnet18_cifar", dataset="fashion-mnist", width=0.125, population=3,
                         subnets=1, warmup_epochs=0, rounds=1, batch_size=32, limit=64, eval_batch_size=32, seed=3)
    job = _Search(tmp_path / "run", config, torch.device("cpu"), Dist(), None, progress=True)
    for shown in (True, False):
        job.progress = shown  # what search(progress=...) and --quiet set
        assert len(job.evaluate_population()) == 3
        out, err = capsys.readouterr()
        assert bool(re.search(r"search: scoring codes.*3/3 \[", err)) is shown, err
        assert not BAR.search(out), out


@pytest.mark.parametrize("shown", [True, False])
def test_build_trt_calibration_shows_progress(shown, no_delay, capsys):
    """TensorRT runs here as a stand-in base class (no TensorRT on CI); the calibrator is the real one and
    is driven as TensorRT drives it: get_batch until None."""
    from irep_deploy.engines.tensorrt import entropy_calibrator

    trt = SimpleNamespace(IInt8EntropyCalibrator2=type("IInt8EntropyCalibrator2", (), {}))
    calibrator = entropy_calibrator(trt, np.zeros((96, 1, 28, 28), np.float32), 32, device="cpu", progress=shown)
    fed = 0
    while calibrator.get_batch(["input"]) is not None:
        fed += 1
    assert fed == 3
    err = capsys.readouterr().err
    assert bool(re.search(r"build-trt: calibrating.*3/3 \[", err)) is shown, err


def test_the_docs_list_every_step():
    text = (ROOT / "docs" / "progress.md").read_text(encoding="utf-8")
    rows = [line.split("|")[1].strip() for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| step") and not set(line) <= set("|- ")]
    assert rows == list(STEPS), rows


@pytest.mark.parametrize("value, off", [("1", True), ("yes", True), ("0", False), ("", False)])
def test_the_environment_variable_turns_every_bar_off(value, off, no_delay, monkeypatch, capsys):
    monkeypatch.setenv(progress.QUIET_ENV, value)
    with progress.bar(range(3), desc="step", enabled=True) as shown:
        list(shown)
    assert (capsys.readouterr().err == "") is off
