"""`--model`: a network that is not built in, through the CLI as a user runs it, each step its own process.

torchvision's resnet18 on real Fashion-MNIST (28x28 grey images copied into its 3 input channels):
train -> fuse -> export (onnxruntime on real test images equals torch) -> bench --compare -> eval.
A user's own factory (tests/byon_nets.py) with factory arguments, an --exclude pattern and a
state-dict --weights file: search -> train on the searched code -> resume without the weights
file -> fuse -> export -> bench --compare. Bad input for these flags is in the bad-input table
(benchmarks/bad_input.py, tests/test_bad_input.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from irep_deploy import ArchCode, build_model, load_checkpoint
from irep_deploy.data import FASHION_MNIST_ROOT, load_data
from irep_deploy.precision import exact_fp32

from conftest import run_cli

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (Path(FASHION_MNIST_ROOT) / "t10k-images-idx3-ubyte.gz").is_file(),
                       reason="Debian package dataset-fashion-mnist not installed (make data)"),
]
# conftest.run_cli puts the repository root on the path: `tests.byon_nets:small_cnn` is importable,
# as a user's own package
LIMIT = 256  # examples per split: a few steps, and the test images compared below
TV = "torchvision:resnet18"
OWN = "tests.byon_nets:small_cnn"
OWN_KWARGS = {"in_channels": 3, "width": 8}  # a 3-channel network of the user's: grey data is copied in
DATA = ["--dataset", "fashion-mnist", "--limit", str(LIMIT), "--batch-size", "32", "--device", "cpu"]
FAST_BENCH = ["--warmup", "0", "--duration", "0.05", "--iterations", "2", "--rounds", "2"]
Result = Tuple[int, str, str]


def run_steps(d: Path, steps: Dict[str, List[str]]) -> Dict[str, Result]:
    results = {}
    for name, argv in steps.items():
        results[name] = run_cli(d, *argv)
        if results[name][0] != 0:  # later steps need this one's output
            break
    return results


@pytest.fixture(scope="module")
def tv_chain(tmp_path_factory) -> Tuple[Path, Dict[str, Result]]:
    d = tmp_path_factory.mktemp("tv")
    build_model(TV, num_classes=10)  # makes its layer table known here, to draw a code for it
    ArchCode.random(TV, ratio=1 / 3, seed=3).save(d / "arch.bin")
    spec = ["--model", TV]
    return d, run_steps(d, {
        "train": ["train", "-o", "run", "--arch", "arch.bin", *spec, *DATA, "--epochs", "1", "--lr", "0.02",
                  "--no-progress"],
        "fuse": ["fuse", "run/ckpt.pt", "arch.bin", "-o", "deploy.pt", *spec],
        "export": ["export", "deploy.pt", "-o", "model.onnx", *spec],
        "bench": ["bench", "run/ckpt.pt", "--compare", "--json", "bench.json", "--backend", "torch", *spec,
                  *FAST_BENCH],
        "eval": ["eval", "deploy.pt", "--limit", str(LIMIT), "--device", "cpu", *spec],
    })


@pytest.fixture(scope="module")
def own_chain(tmp_path_factory) -> Tuple[Path, Dict[str, Result]]:
    d = tmp_path_factory.mktemp("own")
    from tests.byon_nets import small_cnn

    torch.manual_seed(5)
    save_file(small_cnn(num_classes=10, **OWN_KWARGS).state_dict(), str(d / "init.pt"))  # "pretrained" weights
    spec = ["--model", OWN, "--model-kwargs", json.dumps(OWN_KWARGS), "--exclude", "0.6"]
    results = run_steps(d, {
        "search": ["search", "--run-dir", "search", *spec, *DATA, "--population", "4", "--subnets", "2",
                   "--warmup-epochs", "0", "--rounds", "1", "--quiet"],
        "train": ["train", "-o", "run", "--arch", "search/arch.bin", *spec, "--weights", "init.pt", *DATA,
                  "--epochs", "1", "--lr", "0.02", "--no-progress"],
    })
    if all(r[0] == 0 for r in results.values()):
        os.rename(str(d / "init.pt"), str(d / "init.moved"))  # a resume needs its state, not the weights
        os.rename(str(d / "run" / "metrics.json"), str(d / "metrics.before-resume.json"))
        results.update(run_steps(d, {
            # the run's settings name a spec: a resume runs only when the user names it again
            "resume": ["train", "--resume", "run", "--model", OWN, "--no-progress"],
            "fuse": ["fuse", "run/ckpt.pt", "search/arch.bin", "-o", "deploy.pt", "--model", OWN],
            "export": ["export", "deploy.pt", "-o", "model.onnx", "--model", OWN],
            "bench": ["bench", "deploy.pt", "--compare", "--json", "bench.json", "--model", OWN, *FAST_BENCH],
        }))
    return d, results


def _ok(results: Dict[str, Result], step: str) -> Result:
    assert step in results, "an earlier step failed: {}".format(
        {k: r[2][-500:] for k, r in results.items() if r[0] != 0})
    rc, out, err = results[step]
    assert rc == 0 and "Traceback" not in err, err[-2000:]
    return results[step]


@pytest.mark.parametrize("step", ["train", "fuse", "export", "bench", "eval"])
def test_torchvision_resnet18_steps_succeed(tv_chain, step):
    _ok(tv_chain[1], step)


def test_checkpoints_record_the_spec_and_the_networks_three_channels(tv_chain):
    d, results = tv_chain
    _ok(results, "fuse")
    for name in ("run/ckpt.pt", "deploy.pt"):
        h = load_checkpoint(d / name).header
        assert (h["backbone"], h["in_channels"], h["input_size"], h["num_classes"]) == (TV, 3, 28, 10), name
        assert h["model"]["kwargs"] == {"num_classes": 10}
    assert "random batch 2x3x28x28" in results["fuse"][1]
    assert "input input 3x28x28" in results["export"][1]
    # fusion gives back exactly torchvision's resnet18 with BN folded: its convs and fc, plus a bias per conv
    import torchvision
    tv = torchvision.models.resnet18(num_classes=10)
    conv_biases = sum(m.out_channels for m in tv.modules() if isinstance(m, torch.nn.Conv2d))
    bn_params = sum(p.numel() for m in tv.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters())
    fused = load_checkpoint(d / "deploy.pt").build(TV)
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in tv.parameters()) - bn_params \
        + conv_biases


def test_onnx_of_resnet18_classifies_real_test_images_as_torch_and_training_did(tv_chain):
    import onnxruntime as ort

    d, results = tv_chain
    _ok(results, "export")
    # the same test images `train` scored, grey copied into 3 channels as train did
    test = load_data("fashion-mnist", parts=("test",), limit=LIMIT, in_channels=3).test
    images = torch.stack([test[i][0] for i in range(len(test))])
    labels = np.array([int(test[i][1]) for i in range(len(test))])
    assert images.shape == (LIMIT, 3, 28, 28) and bool((images[:, 0] == images[:, 2]).all())
    session = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    with torch.no_grad(), exact_fp32():
        want = load_checkpoint(d / "deploy.pt").build(TV).eval()(images).numpy()
    assert np.abs(logits - want).max() <= 1e-4 * np.abs(want).max()
    metrics = json.loads((d / "run" / "metrics.json").read_text())
    correct = int((logits.argmax(1) == labels).sum())
    assert abs(correct - metrics["fused_test_top1"] * LIMIT / 100) <= 1
    # eval of the deploy checkpoint feeds the same 3-channel images
    assert "top-1 {:.2f}%".format(metrics["fused_test_top1"]) in _ok(results, "eval")[1]


def test_bench_compare_of_a_spec_runs_multi_branch_fused_and_plain(tv_chain):
    d, results = tv_chain
    _ok(results, "bench")
    report = json.loads((d / "bench.json").read_text())
    assert {r["variant"] for r in report["results"]} == {"multi-branch", "fused", "plain"}
    assert report["config"]["input_size"] == 28
    (row,) = report["ratios"]
    assert row["fused_over_plain"] > 0 and row["multi_branch_over_fused"] > 0


@pytest.mark.parametrize("step", ["search", "train", "resume", "fuse", "export", "bench"])
def test_own_factory_steps_succeed(own_chain, step):
    _ok(own_chain[1], step)


def test_own_factory_settings_are_kept_and_resume_uses_them(own_chain):
    d, results = own_chain
    _ok(results, "resume")
    config = json.loads((d / "run" / "config.json").read_text())
    assert (config["backbone"], config["model_kwargs"], config["exclude"], config["weights"]) == (
        OWN, OWN_KWARGS, ["0.6"], "init.pt")
    search_config = json.loads((d / "search" / "config.json").read_text())
    assert (search_config["backbone"], search_config["width"], search_config["exclude"]) == (OWN, 1.0, ["0.6"])
    h = load_checkpoint(d / "run" / "ckpt.pt").header
    assert h["in_channels"] == 3 and h["model"]["exclude"] == ["0.6"]
    assert h["model"]["kwargs"] == dict(OWN_KWARGS, num_classes=10)
    code = ArchCode.load(d / "search" / "arch.bin")
    # the excluded conv and the 5x5 conv are no rows of the code; the searched code is the one trained
    assert code.layers == ("0.0", "0.3", "0.9")
    assert ArchCode.loads(h["arch"]).first_difference(code) is None
    # the resumed run (weights file gone) rebuilt the network from the saved settings and ends where the run ended
    assert json.loads((d / "run" / "metrics.json").read_text()) == json.loads(
        (d / "metrics.before-resume.json").read_text())


def test_own_factory_exports_and_benches_with_the_users_plain_network(own_chain):
    import onnxruntime as ort

    d, results = own_chain
    _ok(results, "bench")
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad(), exact_fp32():
        want = load_checkpoint(d / "deploy.pt").build(OWN).eval()(x).numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    report = json.loads((d / "bench.json").read_text())
    assert {r["variant"] for r in report["results"]} == {"multi-branch", "fused", "plain"}
