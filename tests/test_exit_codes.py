"""Exit 4, "not available on this machine", through the real CLI (issue 25, item 7): what a command
needs and this machine lacks (TensorRT, a CUDA GPU, an onnxruntime provider, a device profile) is 4,
apart from a bad input file (1) and a usage error (2). The rule (errors.NotAvailableError): 4 when no
other input would help on this machine; an engine built on another GPU is a file that does not fit (1).

Each case runs where the machine really lacks the thing (CI: no TensorRT, no GPU) and skips elsewhere.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from irep_deploy import build_model, fuse_model, save_checkpoint
from irep_deploy.bench import devices
from irep_deploy.cli import main
from irep_deploy.engines.tensorrt import EngineMeta, check_compatible, write_meta
from irep_deploy.errors import EngineMismatchError, IrepError, NotAvailableError

NO_TENSORRT = importlib.util.find_spec("tensorrt") is None
NO_CUDA = not torch.cuda.is_available()
FAST = ["--warmup", "0", "--duration", "0.01", "--iterations", "1", "--rounds", "1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("codes")
    net = build_model("resnet18_cifar", width=0.125, num_classes=10, in_channels=1, input_size=28).eval()
    save_checkpoint(d / "deploy.pt", fuse_model(net))
    assert main(["export", str(d / "deploy.pt"), "-o", str(d / "model.onnx"), "--quiet"]) == 0
    engine = d / "m.engine"
    engine.write_bytes(b"\0" * 16)
    # the sidecar build-trt writes beside every engine, so bench gets past it to TensorRT and the GPU
    write_meta(engine, EngineMeta("10.3.0", "Orin", "8.7", "fp16", "input", "logits", [1, 1, 28, 28],
                                  [1, 1, 28, 28], [8, 1, 28, 28], "ab" * 32, "model.onnx"))
    return {k: str(d / n) for k, n in (("deploy", "deploy.pt"), ("onnx", "model.onnx"), ("engine", "m.engine"))}


def _ort_has(provider: str) -> bool:
    from irep_deploy.engines import ort as ort_helpers
    return provider in ort_helpers.available_providers()


# case -> (command line, code, words of the one error line, runs here)
CASES = {
    "build-trt without TensorRT": (["build-trt", "{onnx}", "-o", "{dir}/m.engine"], 4, "TensorRT is not installed",
                                   NO_TENSORRT),
    "bench of an engine without TensorRT": (["bench", "{engine}", *FAST], 4, "TensorRT is not installed",
                                            NO_TENSORRT),
    "bench --backend trt without a GPU": (["bench", "{engine}", "--backend", "trt", *FAST], 4, "needs a CUDA GPU",
                                          NO_CUDA),
    "bench --backend cudagraph without a GPU": (["bench", "{deploy}", "--backend", "cudagraph", *FAST], 4,
                                                "needs a CUDA GPU", NO_CUDA),
    "bench --device xavier on another machine": (["bench", "{onnx}", "--device", "xavier", *FAST], 4,
                                                 "--device xavier was asked for", devices.detect().kind != "xavier"),
    "bench --device gpu without a GPU": (["bench", "{onnx}", "--device", "gpu", *FAST], 4,
                                         "--device gpu was asked for", NO_CUDA),
    "bench --providers cuda without onnxruntime's CUDA": (["bench", "{onnx}", "--providers", "cuda", *FAST], 4,
                                                          "not available here", True),
    "eval --device cuda without CUDA": (["eval", "{deploy}", "--dataset", "fashion-mnist", "--limit", "8",
                                         "--device", "cuda"], 4, "no CUDA GPU", NO_CUDA),
    # the same commands, where the flags are at fault (2) or the file (1)
    "bench --backend cudagraph with --device cpu": (["bench", "{deploy}", "--backend", "cudagraph", "--device", "cpu",
                                                     *FAST], 2, "drop --device cpu", True),
    "bench --providers of no onnxruntime": (["bench", "{onnx}", "--providers", "warp", *FAST], 2, "unknown", True),
    "eval of an ONNX file without --dataset": (["eval", "{onnx}"], 2, "pass --dataset", True),
    "bench --backend trt of a checkpoint": (["bench", "{deploy}", "--backend", "trt", *FAST], 1, "build-trt", True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exit_code(case, files, tmp_path, capsys):
    argv, code, words, here = CASES[case]
    if case.startswith("bench --providers cuda") and _ort_has("CUDAExecutionProvider"):
        pytest.skip("onnxruntime has its CUDA provider here")
    if not here:
        pytest.skip("this machine has what the case lacks")
    rc = main([a.format(dir=tmp_path, **files) for a in argv])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == code and out == "" and len(lines) == 1, (rc, err)
    assert words in lines[0], lines[0]
    assert not (tmp_path / "m.engine").exists()


def test_an_engine_of_another_gpu_is_a_file_that_does_not_fit():
    """1, not 4: an engine rebuilt here runs (the message says how)."""
    meta = EngineMeta("10.3.0", "Orin", "8.7", "fp16", "input", "logits", [1, 1, 28, 28], [1, 1, 28, 28],
                      [8, 1, 28, 28], "ab" * 32, "model.onnx")
    with pytest.raises(EngineMismatchError) as info:
        check_compatible(meta, "m.engine", "10.3.0", "NVIDIA H100", "9.0")
    assert info.value.exit_code == 1 and not isinstance(info.value, NotAvailableError)
    assert "build-trt" in str(info.value)


def test_not_available_is_its_own_code():
    assert NotAvailableError.exit_code == 4 and issubclass(NotAvailableError, IrepError)
    assert issubclass(devices.DeviceMismatchError, NotAvailableError)
