"""Tiny checkpoints shared by the deploy tests (CIFAR layouts, width 0.125: fast on 2 CPU cores)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import pytest
import torch
import torch.nn as nn

from irep_deploy import ArchCode, build_model, fuse_model, save_checkpoint
from irep_deploy.cli import main

from conftest import randomize_arch_params, randomize_bn


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory) -> Dict[str, Path]:
    d = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    code = ArchCode.random("resnet18_cifar", ratio=2 / 3, seed=3)
    code.save(d / "arch.bin")
    other = ArchCode.random("resnet18_cifar", ratio=1 / 3, seed=9)
    other.save(d / "other.bin")
    ArchCode.full("vgg16_cifar").save(d / "vgg.bin")
    # non-trivial BN statistics and alpha/beta, as after training, so fusion errors would show
    multi = build_model("resnet18_cifar", arch=code, width=0.125, num_classes=10)
    multi = randomize_arch_params(randomize_bn(multi)).eval()
    save_checkpoint(d / "multi.pt", multi)
    save_checkpoint(d / "deploy.pt", fuse_model(multi))
    supernet = build_model("resnet18_cifar", width=0.125, num_classes=10, supernet=True)
    supernet = randomize_arch_params(randomize_bn(supernet)).eval()
    save_checkpoint(d / "supernet.pt", supernet)
    (d / "junk.pt").write_bytes(b"not a checkpoint")
    return dict({p.name.split(".")[0]: p for p in d.iterdir()}, dir=d)


@pytest.fixture(scope="session")
def fused_onnx(ckpts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "deploy.onnx"
    assert main(["export", str(ckpts["deploy"]), "-o", str(out)]) == 0
    return out


def cli(capsys, *argv) -> "tuple[int, str, str]":
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str) -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def leftovers(directory: Path, names: List[str]) -> List[str]:
    """Output files (and temp files of atomic writes) that a failed command must not leave."""
    return sorted(p.name for p in directory.iterdir() if p.name in names or p.name.endswith(".tmp"))


@pytest.fixture(scope="session")
def fmnist(tmp_path_factory) -> Dict[str, Path]:
    """A fused model really trained on Fashion-MNIST (one pass over 2048 images: a tiny ResNet at about
    68 % test top-1) and its ONNX: INT8 checks need real activations on real images."""
    from irep_deploy.data import load_data

    d = tmp_path_factory.mktemp("fmnist")
    torch.manual_seed(0)
    code = ArchCode.random("resnet18_cifar", ratio=2 / 3, seed=3)
    model = build_model("resnet18_cifar", arch=code, width=0.125, num_classes=10, in_channels=1, input_size=28)
    data = load_data("fashion-mnist", augment=False, limit=2048, parts=("train",))
    loader = torch.utils.data.DataLoader(data.train, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for x, y in loader:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    save_checkpoint(d / "deploy.pt", fuse_model(model.eval()))
    assert main(["export", str(d / "deploy.pt"), "-o", str(d / "model.onnx")]) == 0
    return {"dir": d, "deploy": d / "deploy.pt", "onnx": d / "model.onnx"}


@pytest.fixture(scope="session")
def fmnist_qdq(fmnist) -> Path:
    """The trained model's QDQ INT8 ONNX, made with onnxruntime's quantize_static on 256 real
    Fashion-MNIST training images (symmetric, per-channel weights)."""
    from irep_deploy.engines import int8 as int8_tools

    images = int8_tools.calibration_images("fashion-mnist", (1, 28, 28), 256, source="fixture")
    out = fmnist["dir"] / "model.int8.onnx"
    out.write_bytes(int8_tools.quantize_qdq(fmnist["onnx"].read_bytes(), images))
    return out
