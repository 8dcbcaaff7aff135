"""`irep-deploy fuse` and `show` end to end, through the real entry point and files."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torchvision
from safetensors.torch import load_file

from irep_deploy import ArchCode, build_model, load_checkpoint, save_checkpoint
from irep_deploy.cli import main

from conftest import randomize_arch_params, randomize_bn, rel_err


@pytest.fixture
def trained(tmp_path):
    torch.manual_seed(0)
    code = ArchCode.random("resnet18", ratio=2 / 3, seed=5)
    model = randomize_arch_params(randomize_bn(build_model("resnet18", arch=code, width=0.125, num_classes=10)))
    code.save(tmp_path / "arch.bin")
    save_checkpoint(tmp_path / "ckpt.pt", model)
    return tmp_path, model.eval(), code


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_fuse_writes_a_verified_deploy_checkpoint(trained, capsys):
    tmp, model, code = trained
    rc, out, err = run(capsys, "fuse", tmp / "ckpt.pt", tmp / "arch.bin", "--input-size", 64)
    assert rc == 0, err
    assert "relative error" in out and "wrote {}".format(tmp / "ckpt.deploy.pt") in out
    plain = load_checkpoint(tmp / "ckpt.deploy.pt").build().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(model(x), plain(x)) < 1e-5


def test_fuse_torchvision_output(trained, capsys):
    tmp, model, _ = trained
    rc, out, err = run(capsys, "fuse", tmp / "ckpt.pt", tmp / "arch.bin", "-o", tmp / "d.pt",
                       "--torchvision", tmp / "tv.pt", "--input-size", 64)
    assert rc == 0, err
    tv = torchvision.models.resnet18(weights=None, num_classes=10)
    # the width-0.125 network is not torchvision's shape: load into a matching one
    state = load_file(str(tmp / "tv.pt"))  # a plain safetensors state dict, as torchvision users load it
    assert set(state) == set(tv.state_dict())
    assert state["layer1.0.bn1.running_mean"].shape == (8,)


def one_line_error(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_fuse_error_paths_leave_no_output(trained, capsys):
    tmp, _, code = trained
    out = tmp / "out.pt"
    other = tmp / "other.bin"
    ArchCode.random("resnet18", ratio=2 / 3, seed=6).save(other)
    malformed = tmp / "bad.bin"
    malformed.write_text(code.dumps().replace("version: 1", "version: one"))
    notckpt = tmp / "notes.txt"
    notckpt.write_text("hello")
    cases = [
        (("fuse", tmp / "missing.pt", tmp / "arch.bin"), ("missing.pt", "no such file")),
        (("fuse", notckpt, tmp / "arch.bin"), ("notes.txt", "not a readable checkpoint")),
        (("fuse", tmp / "ckpt.pt", other), ("other.bin", "does not match the code", "ckpt.pt")),
        (("fuse", tmp / "ckpt.pt", malformed), ("bad.bin:2:", "unsupported version")),
        (("fuse", tmp / "ckpt.pt", tmp / "arch.bin", "-o", notckpt / "x.pt"), ("x.pt", "not a directory")),
        (("fuse", tmp / "ckpt.pt", tmp / "arch.bin", "-o", tmp), ("is a directory",)),
        (("fuse", tmp / "ckpt.pt", tmp / "arch.bin", "-o", out, "--torchvision", notckpt / "tv.pt"), ("tv.pt",)),
    ]
    for argv, words in cases:
        rc, _, err = run(capsys, *argv)
        assert rc == 1, (argv, err)
        one_line_error(err, *words)
    assert not out.exists() and not (tmp / "ckpt.deploy.pt").exists()


def test_fuse_refuses_a_checkpoint_of_another_backbone(tmp_path, capsys):
    save_checkpoint(tmp_path / "vgg.pt", build_model("vgg16_cifar", width=0.125))
    ArchCode.empty("resnet18_cifar").save(tmp_path / "arch.bin")
    rc, _, err = run(capsys, "fuse", tmp_path / "vgg.pt", tmp_path / "arch.bin")
    assert rc == 1
    one_line_error(err, "backbone vgg16_cifar vs resnet18_cifar")


def test_fuse_accepts_any_code_of_a_supernet(tmp_path, capsys):
    save_checkpoint(tmp_path / "super.pt", build_model("resnet18_cifar", supernet=True, width=0.125))
    code = ArchCode.random("resnet18_cifar", ratio=0.5, seed=1)
    code.save(tmp_path / "sub.bin")
    rc, out, err = run(capsys, "fuse", tmp_path / "super.pt", tmp_path / "sub.bin", "-o", tmp_path / "d.pt")
    assert rc == 0, err
    assert load_checkpoint(tmp_path / "d.pt").arch == code


def test_verification_failure_exits_3_and_writes_nothing(trained, capsys):
    tmp, _, _ = trained
    rc, _, err = run(capsys, "fuse", tmp / "ckpt.pt", tmp / "arch.bin", "--tolerance", "0", "--input-size", 64)
    assert rc == 3
    one_line_error(err, "relative error", "nothing written")
    assert "first differs" in err  # the first fused layer beyond tolerance is named
    assert not (tmp / "ckpt.deploy.pt").exists()


def test_debug_shows_the_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "irep_deploy", "--debug", "show", str(tmp_path / "x.bin")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_show_prints_matrix_counts_and_budget(trained, capsys):
    tmp, _, code = trained
    rc, out, _ = run(capsys, "show", tmp / "arch.bin")
    assert rc == 0
    rows = out.splitlines()
    assert rows[0].split()[:3] == ["layer", "conv1x3", "conv3x1"]
    assert rows[1].split()[0] == "layer1.0.conv1" and int(rows[1].split()[-1]) == sum(code.bits[0])
    assert "{} of 112 available branches kept".format(code.count()) in out


def test_console_script_and_module_entry_points(tmp_path):
    for cmd in (["irep-deploy"], [sys.executable, "-m", "irep_deploy"]):
        exe = cmd if cmd[0] != "irep-deploy" else [str(__import__("pathlib").Path(sys.executable).with_name("irep-deploy"))]
        proc = subprocess.run(exe + ["--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "fuse" in proc.stdout and "show" in proc.stdout


def test_a_check_batch_too_large_for_memory_is_refused_before_it_is_allocated(trained, capsys):
    tmp, _, _ = trained
    rc, out, err = run(capsys, "fuse", tmp / "ckpt.pt", tmp / "arch.bin", "-o", tmp / "d.pt",
                       "--batch", 4096, "--input-size", 4096)
    assert rc == 2
    one_line_error(err, "--batch 4096 --input-size 4096", "more than the limit")
    assert not (tmp / "d.pt").exists()


def test_a_header_input_size_too_large_is_the_files_fault(tmp_path, capsys):
    """An 8x8 network whose header says 4096: the check batch at that size would take minutes and
    gigabytes; refused naming the file, and checked at a size the user gives instead."""
    code = ArchCode.random("resnet18_cifar", ratio=2 / 3, seed=3)
    code.save(tmp_path / "arch.bin")
    net = build_model("resnet18_cifar", arch=code, width=0.125, num_classes=10, in_channels=1, input_size=4096)
    save_checkpoint(tmp_path / "big.pt", net.eval())
    rc, out, err = run(capsys, "fuse", tmp_path / "big.pt", tmp_path / "arch.bin", "-o", tmp_path / "d.pt")
    assert rc == 1
    one_line_error(err, str(tmp_path / "big.pt"), "input_size 4096")
    assert not (tmp_path / "d.pt").exists()
    rc, out, err = run(capsys, "fuse", tmp_path / "big.pt", tmp_path / "arch.bin", "-o", tmp_path / "d.pt",
                       "--input-size", 8)
    assert rc == 0, err
