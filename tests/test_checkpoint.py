"""Checkpoints: round trips, atomic writes, and refusal of tampered or unsafe files."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from irep_deploy import ArchCode, build_model, current_arch, fuse_model, load_checkpoint, save_checkpoint
from irep_deploy.checkpoint import FORMAT
from irep_deploy.errors import CheckpointError, IrepError
from irep_deploy.tensorfile import load_tree, save_tree

from conftest import cli_env, randomize_arch_params, randomize_bn, rel_err

NAME = "resnet18_cifar"


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = build_model(NAME, arch=ArchCode.random(NAME, seed=2), width=0.125, num_classes=5, in_channels=1)
    return randomize_arch_params(randomize_bn(m)).eval()


def test_multi_branch_round_trip(tmp_path, model):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, extra={"epoch": 3})
    ck = load_checkpoint(path)
    assert ck.kind == "multi-branch" and not ck.supernet
    assert ck.header["num_classes"] == 5 and ck.header["in_channels"] == 1 and ck.header["extra"] == {"epoch": 3}
    assert ck.arch == current_arch(model)
    again = ck.build().eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_supernet_and_deploy_round_trips(tmp_path, model):
    supernet = build_model(NAME, supernet=True, width=0.125)
    save_checkpoint(tmp_path / "super.pt", supernet)
    ck = load_checkpoint(tmp_path / "super.pt")
    assert ck.supernet and ck.arch == ArchCode.full(NAME)
    assert set(ck.build().state_dict()) == set(supernet.state_dict())

    plain = fuse_model(model)
    save_checkpoint(tmp_path / "deploy.pt", plain)
    ck = load_checkpoint(tmp_path / "deploy.pt")
    assert ck.kind == "deploy" and ck.arch == current_arch(model)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert rel_err(plain(x), ck.build().eval()(x)) == 0.0


def test_header_keeps_the_trained_resolution_through_load_fuse_and_save(tmp_path):
    assert build_model(NAME).irep_config["input_size"] == 32  # the backbone's default
    model = build_model(NAME, width=0.125, in_channels=1, input_size=28)
    save_checkpoint(tmp_path / "ckpt.pt", model)
    ck = load_checkpoint(tmp_path / "ckpt.pt")
    assert ck.header["input_size"] == 28
    save_checkpoint(tmp_path / "deploy.pt", fuse_model(ck.build()))
    assert load_checkpoint(tmp_path / "deploy.pt").header["input_size"] == 28
    with pytest.raises(ValueError, match="input size"):
        build_model(NAME, input_size=0)


def test_an_old_checkpoint_with_the_backbone_size_still_loads(tmp_path, model):
    # Checkpoints written before the header took the dataset's size say 32 for 28x28 models.
    path = tampered(tmp_path, model, lambda p: p["header"].__setitem__("input_size", 32))
    ck = load_checkpoint(path)
    assert ck.header["input_size"] == 32
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), ck.build().eval()(x))


def tampered(tmp_path, model, edit):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model)
    payload = load_tree(path, "checkpoint").tree
    edit(payload)
    save_tree(path, payload)
    return path


def test_wrong_shape_missing_and_extra_tensors_are_named(tmp_path, model):
    def reshape(p):
        p["state_dict"]["layer1.0.conv1.conv.conv.weight"] = torch.zeros(3, 3, 3, 3)
    with pytest.raises(CheckpointError, match=r"tensor 'layer1.0.conv1.conv.conv.weight' has shape \(3, 3, 3, 3\)"):
        load_checkpoint(tampered(tmp_path, model, reshape)).build()

    def drop(p):
        del p["state_dict"]["fc.bias"]
    with pytest.raises(CheckpointError, match="missing tensor 'fc.bias'"):
        load_checkpoint(tampered(tmp_path, model, drop)).build()

    def add(p):
        p["state_dict"]["layer9.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="unexpected tensor 'layer9.weight'"):
        load_checkpoint(tampered(tmp_path, model, add)).build()

    def newer(p):
        p["format_version"] = 99
    with pytest.raises(CheckpointError, match="newer than this irep-deploy reads"):
        load_checkpoint(tampered(tmp_path, model, newer))

    def headless(p):
        del p["header"]["backbone"]
    with pytest.raises(CheckpointError, match="header lacks 'backbone'"):
        load_checkpoint(tampered(tmp_path, model, headless))


def test_truncated_file_is_refused(tmp_path, model):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


class _RunsCode:
    """Unpickling this object would create a marker file: a stand-in for malicious code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path, model):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"format": FORMAT, "format_version": 1, "header": {}, "state_dict": {}, "x": _RunsCode(str(marker))}
    torch.save(payload, str(path))
    # torch >= 2.10: its weights_only unpickler refuses the object; older: no unpickler is reached
    with pytest.raises(CheckpointError, match="refused|old pickle-format checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


def test_files_that_are_not_checkpoints(tmp_path, model):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)
    bare = tmp_path / "bare.pt"
    save_file(model.state_dict(), str(bare))  # a plain safetensors state dict, as other tools write
    with pytest.raises(CheckpointError, match="bare state dict"):
        load_checkpoint(bare)
    text = tmp_path / "arch.bin"
    ArchCode.full(NAME).save(text)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(text)


_SAVE_ON_A_FULL_DISK = r"""
import resource, signal, sys
from irep_deploy import load_checkpoint, save_checkpoint
model = load_checkpoint(sys.argv[1]).build()  # the same checkpoint, written again
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    save_checkpoint(sys.argv[1], model)
except Exception as exc:
    print("failed", type(exc).__name__)
"""


@pytest.mark.skipif(importlib.util.find_spec("resource") is None, reason="RLIMIT_FSIZE (a full disk) needs POSIX")
def test_save_is_atomic(tmp_path, model):
    """The disk fills up halfway through the new checkpoint: the old one is intact, no temp file is left.
    (A writer that opened the checkpoint itself would have truncated it before the write failed.)"""
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model)
    before = path.read_bytes()
    proc = subprocess.run([sys.executable, "-c", _SAVE_ON_A_FULL_DISK, str(path), str(len(before) // 2)], env=cli_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert proc.stdout.startswith("failed"), (proc.stdout, proc.stderr)
    assert path.read_bytes() == before
    assert os.listdir(str(tmp_path)) == ["ckpt.pt"]  # the temporary file was removed
    with pytest.raises(IrepError, match="not a directory"):
        save_checkpoint(tmp_path / "ckpt.pt" / "x.pt", build_model(NAME, width=0.125))


def test_written_files_get_the_usual_permissions(tmp_path, model):
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "ckpt.pt", model)
        ArchCode.full(NAME).save(tmp_path / "arch.bin")
    finally:
        os.umask(old)
    for name in ("ckpt.pt", "arch.bin"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
