"""Engine sidecar metadata, mismatch refusal, and `build-trt` on a machine without TensorRT/GPU."""
from __future__ import annotations

import json

import pytest
import torch

from irep_deploy.engines.tensorrt import (EngineMeta, EngineMismatchError, check_compatible, meta_path,
                                          read_meta, sha256_file, write_meta)
from irep_deploy.errors import IrepError

from .conftest import cli, leftovers, one_line_error


def _meta(**kw):
    base = dict(tensorrt_version="8.5.2.2", gpu_name="Xavier", compute_capability="7.2", precision="fp16",
                input_name="input", output_name="logits", min_shape=[1, 3, 32, 32], opt_shape=[4, 3, 32, 32],
                max_shape=[32, 3, 32, 32], onnx_sha256="ab" * 32, onnx_path="model.onnx")
    base.update(kw)
    return EngineMeta(**base)


def test_roundtrip(tmp_path):
    engine = tmp_path / "model.engine"
    path = write_meta(engine, _meta())
    assert path == meta_path(engine) and path.name == "model.engine.json"
    assert read_meta(engine) == _meta()
    raw = json.loads(path.read_text())
    assert raw["format"] == "irep-deploy-engine" and raw["tensorrt_version"] == "8.5.2.2"


def test_sha256_of_onnx(tmp_path):
    f = tmp_path / "m.onnx"
    f.write_bytes(b"abc")
    assert sha256_file(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.parametrize("here, what", [
    (("10.3.0", "Xavier", "7.2"), "TensorRT 8.5.2.2"),
    (("8.5.2.2", "NVIDIA A100-SXM4-80GB", "8.0"), "Xavier"),
    (("8.5.2.2", "Xavier", "8.7"), "compute 7.2"),
])
def test_mismatch_is_refused_with_rebuild_command(here, what):
    with pytest.raises(EngineMismatchError) as info:
        check_compatible(_meta(), "model.engine", *here)
    message = str(info.value)
    assert what in message and "irep-deploy build-trt model.onnx -o model.engine --fp16" in message
    assert "\n" not in message


def test_same_machine_is_accepted():
    check_compatible(_meta(), "model.engine", "8.5.2.2", "Xavier", "7.2")


@pytest.mark.parametrize("content, msg", [
    (None, "no metadata file"),
    ("{not json", "not valid JSON"),
    ('{"format": "other"}', "not irep-deploy engine metadata"),
    ('{"format": "irep-deploy-engine", "format_version": 99}', "newer"),
    ('{"format": "irep-deploy-engine", "format_version": 1}', "lacks"),
])
def test_bad_metadata(tmp_path, content, msg):
    engine = tmp_path / "m.engine"
    if content is not None:
        meta_path(engine).write_text(content)
    with pytest.raises(IrepError, match=msg):
        read_meta(engine)


def _no_trt_or_gpu() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return True
    return not torch.cuda.is_available()


@pytest.mark.skipif(not _no_trt_or_gpu(), reason="TensorRT and a GPU are present: the refusal does not apply")
def test_build_trt_without_tensorrt_or_gpu(fused_onnx, tmp_path, capsys):
    rc, out, err = cli(capsys, "build-trt", fused_onnx, "-o", tmp_path / "m.engine")
    assert rc == 4
    line = one_line_error(err)
    assert "TensorRT is not installed" in line or "no CUDA GPU" in line
    assert leftovers(tmp_path, ["m.engine", "m.engine.json"]) == []


@pytest.mark.parametrize("argv, msg, code", [
    (["{dir}/none.onnx"], "no such file", 1),
    (["{junk}"], "not a readable ONNX model", 1),
    (["{onnx}", "--min-batch", "4", "--max-batch", "2"], "batch range", 2),  # usage: the flags contradict
    (["{fixed}", "--max-batch", "8"], "fixed batch of 2", 1),
    (["{onnx}", "-o", "{junk}/m.engine"], "not a directory", 1),
])
def test_build_trt_input_errors(ckpts, fused_onnx, tmp_path, capsys, argv, msg, code):
    fixed = tmp_path / "fixed.onnx"
    assert cli(capsys, "export", ckpts["deploy"], "-o", fixed, "--batch", 2, "--simplify", "none")[0] == 0
    names = dict({k: str(v) for k, v in ckpts.items()}, onnx=str(fused_onnx), fixed=str(fixed))
    argv = [a.format(**names) for a in argv]
    if "-o" not in argv:
        argv += ["-o", str(tmp_path / "m.engine")]
    rc, _, err = cli(capsys, "build-trt", *argv)
    assert rc == code
    assert msg in one_line_error(err)
    assert leftovers(tmp_path, ["m.engine", "m.engine.json"]) == []
