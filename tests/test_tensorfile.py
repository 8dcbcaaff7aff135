"""The safetensors file format of checkpoints, run states and state dicts (irep_deploy.tensorfile):
round trips that keep every type, the checksum, validation, and the rule that an old pickle file
never reaches an unpickler on torch < 2.10 unless the caller trusts it. Runs in both lanes."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pickle
import struct
import sys
from pathlib import Path
from typing import Iterator, List

import pytest
import torch
from safetensors.torch import load_file, save_file

from irep_deploy import ArchCode, build_model, fuse_model, load_checkpoint, save_checkpoint
from irep_deploy.checkpoint import FORMAT
from irep_deploy.cli import main
from irep_deploy.convert import convert
from irep_deploy.errors import CheckpointError, IrepError, UsageError
from irep_deploy.models.external import load_weights
from irep_deploy.runs import read_run_state, write_run_state
from irep_deploy.tensorfile import load_tree, save_tree, torch_reads_pickle_safely

from test_checkpoint import _RunsCode, tampered  # _RunsCode: unpickling it creates a marker file

NAME = "resnet18_cifar"
SAFE_TORCH = torch_reads_pickle_safely()


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(NAME, arch=ArchCode.random(NAME, seed=2), width=0.125, num_classes=5, in_channels=1).eval()


def same(a, b) -> bool:
    """Equal values of the same types (tensors: dtype and values; dict subclasses count as dicts)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a.detach(), b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(type(k) is type(j) for k, j in zip(a, b)) \
            and all(same(a[k], b[k]) for k in a)
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def sorted_dict(d) -> dict:
    """A plain safetensors file's tensors come back in name order."""
    return dict(sorted(d.items()))


# -- round trips ------------------------------------------------------------------------------------
def test_a_tree_keeps_every_type(tmp_path):
    tree = {"format": "x", 1: "an int key", "1": "a str key", "t": (1, 2.5, None, True, "s"), "nan": float("nan"),
            "inf": -float("inf"), "big": 2 ** 70, "bf16": torch.ones(2, dtype=torch.bfloat16),
            "bool": torch.tensor([True, False]), "empty": torch.zeros(0, 3), "scalar": torch.tensor(7),
            "view": torch.arange(10)[2:5], "nested": [{"a": [torch.randn(2, 2)]}], "u8": torch.arange(4).byte()}
    w = torch.randn(2, 2)
    tree["tied"] = [w, w]  # one storage twice (tied weights): stored as two tensors
    save_tree(tmp_path / "t.pt", tree)
    loaded = load_tree(tmp_path / "t.pt", "test file")
    assert same(tree, loaded.tree) and not loaded.pickled and len(loaded.sha256) == 64


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    lambda p: torch.optim.Adam(p, betas=(0.5, 0.999)),
])
def test_optimizer_state_with_int_keys_round_trips(tmp_path, model, make):
    opt = make(model.parameters())
    model.train()
    model(torch.randn(4, 1, 16, 16)).sum().backward()
    opt.step()
    save_tree(tmp_path / "opt.pt", {"optimizer": opt.state_dict()})
    back = load_tree(tmp_path / "opt.pt", "state").tree["optimizer"]
    assert same(opt.state_dict(), back)
    assert all(isinstance(k, int) for k in back["state"])
    again = make(model.parameters())
    again.load_state_dict(back)  # what a resume does
    assert same(again.state_dict(), opt.state_dict())


@dataclasses.dataclass
class _Settings:
    lr: float = 0.1
    betas: tuple = (0.9, 0.99)
    name: str = "x"
    backbone: str = "resnet18_cifar"  # every run's settings name their network


def test_run_state_round_trip(tmp_path, model):
    rng = torch.get_rng_state()
    write_run_state(tmp_path, "train", _Settings(), epoch=3, model=model.state_dict(), rng={"torch": rng},
                    history=[{"epoch": 1, "loss": 0.5}], scaler=None)
    state, saved = read_run_state(tmp_path, "train", _Settings, _Settings())
    assert saved == _Settings() and state["epoch"] == 3 and state["scaler"] is None
    assert same(dict(model.state_dict()), state["model"]) and torch.equal(state["rng"]["torch"], rng)
    assert state["history"] == [{"epoch": 1, "loss": 0.5}]


def test_checkpoints_are_safetensors_files_other_tools_read(tmp_path, model):
    save_checkpoint(tmp_path / "ckpt.pt", model)
    tensors = load_file(str(tmp_path / "ckpt.pt"))  # identified by content, whatever the name
    assert set(tensors) == {"state_dict." + k for k in model.state_dict()}


# -- integrity --------------------------------------------------------------------------------------
def _offsets(path: Path, name: str) -> int:
    """Where the bytes of tensor ``name`` start in the file."""
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    return 8 + size + json.loads(data[8:8 + size])[name]["data_offsets"][0]


def test_one_flipped_bit_in_a_tensor_is_a_one_line_error(tmp_path, model):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model)
    data = bytearray(path.read_bytes())
    data[_offsets(path, "state_dict.fc.weight") + 5] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value).startswith(str(path) + ": checksum mismatch") and "\n" not in str(info.value)


def test_a_plain_safetensors_state_dict_reads_without_checksum(tmp_path, model):
    save_file(dict(model.state_dict()), str(tmp_path / "plain.safetensors"))
    loaded = load_tree(tmp_path / "plain.safetensors", "state dict")
    assert loaded.sha256 is None and same(sorted_dict(model.state_dict()), sorted_dict(loaded.tree))
    net = build_model(NAME, arch=ArchCode.random(NAME, seed=2), width=0.125, num_classes=5, in_channels=1)
    load_weights(net, tmp_path / "plain.safetensors")  # the --weights path
    assert same(dict(model.state_dict()), dict(net.state_dict()))
    with pytest.raises(CheckpointError, match="bare state dict"):
        load_checkpoint(tmp_path / "plain.safetensors")


def _raw_safetensors(path: Path, header: dict, body: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)
    return path


@pytest.mark.parametrize("header, body, message", [
    ({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8), "dtype 'C64'"),
    ({"a": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}, bytes(1), "dtype 'F8_E4M3'"),
    ({"a": {"dtype": "F32", "shape": [1 << 30], "data_offsets": [0, 1 << 32]}}, bytes(8), "truncated"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), "overlap"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4), "shape"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 4]}}, bytes(4), "needs 12 bytes"),
    ({"__metadata__": {"irep-deploy": "1", "irep-deploy.tree": "{not json", "irep-deploy.sha256": "0" * 64}},
     b"", "checksum mismatch"),
])
def test_forged_safetensors_headers_are_refused_before_parsing(tmp_path, header, body, message):
    path = _raw_safetensors(tmp_path / "x.pt", header, body)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_structure_that_is_not_json_is_refused(tmp_path):
    from irep_deploy.tensorfile import checksum
    text = "{not json"
    header = {"__metadata__": {"irep-deploy": "1", "irep-deploy.tree": text, "irep-deploy.sha256": checksum({}, text)}}
    with pytest.raises(CheckpointError, match="structure is not valid JSON"):
        load_checkpoint(_raw_safetensors(tmp_path / "x.pt", header, b""))


def test_special_files_are_refused_unread(tmp_path):
    with pytest.raises(CheckpointError, match="/dev/zero: is a character device, not a checkpoint"):
        load_checkpoint("/dev/zero")
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(str(fifo))  # no writer: a blocking open would hang
    with pytest.raises(CheckpointError, match="fifo.pt: is a FIFO, not a checkpoint"):
        load_checkpoint(fifo)
    (tmp_path / "zeros.pt").write_bytes(bytes(10 << 20))
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "zeros.pt")


# -- validation of checkpoint contents -----------------------------------------------------------------
@pytest.mark.parametrize("version", [-5, 0, "1", True, 1.0, None])
def test_a_format_version_that_is_not_a_positive_int_is_refused(tmp_path, model, version):
    path = tampered(tmp_path, model, lambda t: t.__setitem__("format_version", version))
    with pytest.raises(CheckpointError, match="format version .* is not a positive integer"):
        load_checkpoint(path)


def test_complex_and_sparse_tensors_are_refused(tmp_path, model):
    with pytest.raises(CheckpointError, match="dtype complex64"):
        save_tree(tmp_path / "c.pt", {"x": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(CheckpointError, match="sparse"):
        save_tree(tmp_path / "s.pt", {"x": torch.eye(3).to_sparse()})
    assert not (tmp_path / "c.pt").exists() and not (tmp_path / "s.pt").exists()
    # the old format can hold them: refused after a (trusted) read
    for name, tensor, message in (("c", torch.zeros(2, dtype=torch.complex64), "complex64"),
                                  ("s", torch.eye(3).to_sparse(), "sparse")):
        torch.save({"format": FORMAT, "state_dict": {"w": tensor}}, str(tmp_path / (name + ".old")))
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(tmp_path / (name + ".old"), trust_pickle=True)


def test_header_faults_are_named(tmp_path, model):
    path = tampered(tmp_path, model, lambda t: t["header"].__setitem__("ops", ["conv3x3", "evil_op"]))
    with pytest.raises(CheckpointError, match="unknown op 'evil_op'"):
        load_checkpoint(path)
    assert main(["fuse", str(path), str(tmp_path / "arch.bin")]) == 1  # a bad file: 1, not a usage error

    key = next(k for k in model.state_dict() if k.endswith("running_var"))
    path = tampered(tmp_path, model, lambda t: t["state_dict"][key].fill_(-1.0))
    with pytest.raises(CheckpointError, match=r"tensor '{}' \(a BatchNorm running variance\) holds negative".format(
            key.replace(".", r"\."))):
        load_checkpoint(path)

    path = tampered(tmp_path, model, lambda t: t["header"].__setitem__("backbone", "vgg16_cifar"))
    with pytest.raises(CheckpointError, match="header names the network 'vgg16_cifar' but its architecture code "
                                              "and tensors are of 'resnet18_cifar'"):
        load_checkpoint(path)


# -- old pickle files ---------------------------------------------------------------------------------
@contextlib.contextmanager
def unpickler_calls() -> Iterator[List[str]]:
    """Records every Python function called in torch's serialization, its weights_only unpickler and
    pickle while the block runs: an observation (sys.setprofile), nothing is replaced."""
    seen: List[str] = []
    watched = ("serialization.py", "_weights_only_unpickler.py", os.sep + "pickle.py")

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.endswith(watched):
            seen.append("{}:{}".format(os.path.basename(frame.f_code.co_filename), frame.f_code.co_name))
    sys.setprofile(profile)
    try:
        yield seen
    finally:
        sys.setprofile(None)


def _weights_only(seen: List[str]) -> bool:
    """torch's restricted (pure Python) unpickler did the reading."""
    return any(s.startswith("_weights_only_unpickler.py:") for s in seen)


def _payloads(tmp_path: Path, marker: Path) -> List[Path]:
    """A torch.save zip archive and a bare pickle, each holding the code-running object."""
    archive = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "format_version": 1, "x": _RunsCode(str(marker))}, str(archive))
    bare = tmp_path / "evil_bare.pt"
    bare.write_bytes(pickle.dumps({"x": _RunsCode(str(marker))}, protocol=2))
    return [archive, bare]


def test_a_pickle_payload_never_reaches_an_unpickler_unless_trusted(tmp_path):
    marker = tmp_path / "pwned"
    for path in _payloads(tmp_path, marker):
        for read in (lambda p, **k: load_checkpoint(p, **k),
                     lambda p, **k: load_weights(torch.nn.Linear(1, 1), p, **k),
                     lambda p, **k: convert(p, tmp_path / "new.pt", **k)):
            with unpickler_calls() as seen, pytest.raises(CheckpointError) as info:
                read(path)
            message = str(info.value)
            assert str(path) in message and "\n" not in message
            if SAFE_TORCH:  # torch >= 2.10: read by the weights_only unpickler only, and refused
                assert "refused" in message and _weights_only(seen)
            else:
                assert "old pickle-format" in message and "irep-deploy convert" in message
                assert seen == []  # not one function of torch.load or pickle ran
            with unpickler_calls() as seen, pytest.raises(CheckpointError, match="refused"):
                read(path, trust_pickle=True)  # trusted: the weights_only unpickler still refuses it
            assert _weights_only(seen)
            assert not marker.exists()
    assert not (tmp_path / "new.pt").exists()


def test_the_cli_names_the_old_file_and_the_flag(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = _payloads(tmp_path, marker)[0]
    ArchCode.full(NAME).save(tmp_path / "arch.bin")
    assert main(["fuse", str(path), str(tmp_path / "arch.bin")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and not marker.exists()
    assert ("refused" if SAFE_TORCH else "--trust-pickle") in err
    assert "--trust-pickle" in main_help("fuse") and "code" in main_help("fuse")


def main_help(command: str) -> str:
    from irep_deploy.cli import build_parser, subcommand
    return subcommand(build_parser(), command).format_help()


def test_old_files_read_with_trust_pickle_and_convert(tmp_path, model, capsys):
    save_checkpoint(tmp_path / "new.pt", model)
    tree = load_tree(tmp_path / "new.pt", "checkpoint").tree
    old = tmp_path / "old.pt"
    torch.save(tree, str(old))  # a checkpoint as earlier versions wrote it
    if not SAFE_TORCH:
        with pytest.raises(CheckpointError, match="old pickle-format checkpoint"):
            load_checkpoint(old)
    ck = load_checkpoint(old, trust_pickle=True)
    assert ck.sha256 is None and same(dict(model.state_dict()), ck.state_dict)

    out = tmp_path / "converted.pt"
    assert main(["convert", str(old), "-o", str(out), "--trust-pickle"]) == 0
    assert "checkpoint" in capsys.readouterr().out
    again = load_checkpoint(out)
    assert again.header == ck.header and same(ck.state_dict, again.state_dict) and again.sha256
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), again.build().eval()(x))

    with pytest.raises(UsageError, match="is the input"):
        convert(old, old, trust_pickle=True)
    with pytest.raises(IrepError, match="already in the safetensors format"):
        convert(out, tmp_path / "again.pt")
    assert main(["convert", str(old), "-o", str(old), "--trust-pickle"]) == 2
    assert not (tmp_path / "again.pt").exists()


def test_convert_a_run_state_and_a_torchvision_state_dict(tmp_path, model):
    write_run_state(tmp_path, "train", _Settings(), epoch=2, optimizer={"state": {0: {"m": torch.ones(2)}}})
    state = load_tree(tmp_path / "state.pt", "state").tree
    torch.save(state, str(tmp_path / "old_state.pt"))
    report = convert(tmp_path / "old_state.pt", tmp_path / "state2.pt", trust_pickle=True)
    assert report.kind == "training state"
    assert same(state, load_tree(tmp_path / "state2.pt", "state").tree)

    plain = fuse_model(model)
    torch.save({"state_dict": plain.state_dict(), "epoch": 3}, str(tmp_path / "tv.pth"))
    report = convert(tmp_path / "tv.pth", tmp_path / "tv.safetensors", trust_pickle=True)
    assert report.kind == "state dict" and report.tensors == len(plain.state_dict())
    assert same(sorted_dict(plain.state_dict()), sorted_dict(load_file(str(tmp_path / "tv.safetensors"))))

    torch.save([1, 2, 3], str(tmp_path / "list.pt"))
    with pytest.raises(CheckpointError, match="not an irep-deploy checkpoint, run state or state dict"):
        convert(tmp_path / "list.pt", tmp_path / "x.pt", trust_pickle=True)
