"""The deploy commands as a user runs them, each in its own process, on a model trained on real data.

train (Fashion-MNIST, 28x28) -> fuse -> export -> bench (the ONNX, and the checkpoint with --compare)
-> build-trt (no TensorRT here: one plain line). Runs in both test lanes; on the Python 3.8 / torch 2.0 lane it is
what shows that torch's own banners and deprecation warnings do not reach the user.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch

from irep_deploy import ArchCode, load_checkpoint
from irep_deploy.data import FASHION_MNIST_ROOT, load_data
from irep_deploy.precision import exact_fp32

from conftest import run_cli

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (Path(FASHION_MNIST_ROOT) / "t10k-images-idx3-ubyte.gz").is_file(),
                       reason="Debian package dataset-fashion-mnist not installed (make data)"),
]
# Each command runs with Python's default warning filters (conftest.run_cli), as on a user's console
# (UserWarnings show, DeprecationWarnings raised outside __main__ do not); the library-level tests in
# test_onnx_export.py see every warning.
LIMIT = 512  # examples per split: one quick epoch, and the test images compared below
FAST_BENCH = ["--warmup", "0", "--duration", "0.1", "--iterations", "3"]
# What torch 2.0 prints on its own: the ONNX exporter's diagnostic summary, TypedStorage deprecation
# warnings from torch.load(weights_only=True), and any other Python warning line.
NOISE = re.compile(r"Diagnostic Run|TypedStorage|\w+Warning:|Traceback")


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Tuple[Path, Dict[str, Tuple[int, str, str]]]:
    d = tmp_path_factory.mktemp("e2e")
    ArchCode.random("resnet18_cifar", ratio=2 / 3, seed=3).save(d / "arch.bin")
    steps: Dict[str, List[str]] = {
        "train": ["train", "-o", "run", "--arch", "arch.bin", "--dataset", "fashion-mnist", "--width", "0.125",
                  "--epochs", "1", "--limit", str(LIMIT), "--batch-size", "64", "--device", "cpu", "--no-progress"],
        "fuse": ["fuse", "run/ckpt.pt", "arch.bin", "-o", "deploy.pt", "--quiet"],
        "export": ["export", "deploy.pt", "-o", "model.onnx", "--quiet"],
        "bench-onnx": ["bench", "model.onnx", "--json", "bench_onnx.json", *FAST_BENCH, "--quiet"],
        "bench-ckpt": ["bench", "run/ckpt.pt", "--compare", "--json", "bench_ckpt.json", *FAST_BENCH,
                       "--quiet"],
        "build-trt": ["build-trt", "model.onnx"],
    }
    results = {}
    for name, argv in steps.items():
        results[name] = run_cli(d, *argv)
    return d, results


@pytest.mark.parametrize("step", ["train", "fuse", "export", "bench-onnx", "bench-ckpt"])
def test_each_command_succeeds_and_prints_only_its_own_output(chain, step):
    _, results = chain
    rc, out, err = results[step]
    assert rc == 0, err
    assert not NOISE.search(out + err), out + err
    assert err == ""


def test_build_trt_without_tensorrt_is_one_plain_line_and_writes_nothing(chain):
    d, results = chain
    rc, out, err = results["build-trt"]
    assert rc == 4 and out == ""  # 4: not available on this machine
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("irep-deploy build-trt: error: TensorRT is not installed"), err
    assert not NOISE.search(err)
    assert not list(d.glob("model.engine*"))


def test_the_header_export_and_bench_take_the_trained_resolution(chain):
    d, results = chain
    assert load_checkpoint(d / "run" / "ckpt.pt").header["input_size"] == 28
    assert load_checkpoint(d / "deploy.pt").header["input_size"] == 28
    assert "random batch 2x1x28x28" in results["fuse"][1]
    assert "input input 1x28x28" in results["export"][1]
    assert json.loads((d / "bench_ckpt.json").read_text())["config"]["input_size"] == 28
    onnx_rows = json.loads((d / "bench_onnx.json").read_text())["results"]
    assert [(r["variant"], r["batch"]) for r in onnx_rows] == [("onnx", 1)]
    ckpt_rows = json.loads((d / "bench_ckpt.json").read_text())["results"]
    assert {(r["variant"], r["backend"].split(":")[0]) for r in ckpt_rows} == {
        (v, b) for v in ("multi-branch", "fused", "plain") for b in ("torch", "ort")}


def test_the_onnx_model_classifies_real_fashion_mnist_test_images_as_trained(chain):
    import onnxruntime as ort

    d, _ = chain
    # The same 512 test images `train` scored (same limit and split seed), at their own 28x28.
    test = load_data("fashion-mnist", parts=("test",), limit=LIMIT).test
    images = torch.stack([test[i][0] for i in range(len(test))])
    labels = np.array([int(test[i][1]) for i in range(len(test))])
    assert images.shape == (LIMIT, 1, 28, 28)
    session = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    with torch.no_grad(), exact_fp32():
        want = load_checkpoint(d / "deploy.pt").build().eval()(images).numpy()
    assert np.abs(logits - want).max() <= 1e-4 * np.abs(want).max()
    metrics = json.loads((d / "run" / "metrics.json").read_text())
    assert metrics["test_examples"] == LIMIT
    # What the deployed file scores is what training reported (one near-tie may flip in float32).
    correct = int((logits.argmax(1) == labels).sum())
    assert abs(correct - metrics["fused_test_top1"] * LIMIT / 100) <= 1
