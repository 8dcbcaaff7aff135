"""irepify: IREPS for any CNN. Real torchvision networks, a detector's backbone and a network defined
here, trained a few steps on real Fashion-MNIST images, fused, and checked equal; exact start; codes
refused on the wrong network; checkpoints that never import code.

Sizes are small on purpose (64x64 inputs, 8 images, 2 SGD steps; vgg16_bn at 32x32 with its big
classifier frozen) so the whole file runs in well under a minute on one CPU thread.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.ops import FrozenBatchNorm2d
from safetensors.torch import save_file

from irep_deploy import ArchCode, build_model, fuse_model, load_checkpoint, load_model, save_checkpoint
from irep_deploy.tensorfile import load_tree, save_tree
from irep_deploy.arch import HEADER, backbone_info
from irep_deploy.block import IrepConv
from irep_deploy.errors import ArchFormatError, ArchMismatchError, CheckpointError
from irep_deploy import irepify
from irep_deploy.surgery import BiasAsBN, scan_conv_bn
from irep_deploy.models import apply_arch, current_arch
from irep_deploy.models.external import load_weights

from conftest import as_rgb, fashion_mnist, randomize_bn, rel_err

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5  # fused vs multi-branch, eval mode: float32 rounding of the folded kernels


class UserNet(nn.Module):
    """A user's CNN: convs in a ModuleList, a 3x3 conv with bias and no BN, a bias before a BN, a
    depthwise conv, and a 5x5 and a dilated 3x3 conv that irepify must leave alone."""

    def __init__(self, num_classes: int = 10, stride: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1, bias=True)  # no BN after it
        self.convs = nn.ModuleList([
            nn.Conv2d(16, 16, 3, padding=1, bias=True),  # its bias moves into the BN's running mean
            nn.Conv2d(16, 16, 3, padding="same", groups=16, bias=False),  # depthwise
            nn.Conv2d(16, 32, 3, stride=stride, padding=1, bias=False),
        ])
        self.bns = nn.ModuleList([nn.BatchNorm2d(16), nn.BatchNorm2d(16), nn.BatchNorm2d(32)])
        self.big = nn.Conv2d(32, 32, 5, padding=2)
        self.dilated = nn.Conv2d(32, 32, 3, padding=2, dilation=2, bias=False)
        self.dbn = nn.BatchNorm2d(32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        for conv, bn in zip(self.convs, self.bns):
            x = F.relu(bn(conv(x)))
        x = F.relu(self.big(x))
        x = F.relu(self.dbn(self.dilated(x)))
        return self.head(x.mean((2, 3)))


class BodyProbe(nn.Module):
    """A detector's backbone body (a dict of feature maps) with a linear probe, to train it on labels."""

    def __init__(self, body: nn.Module, channels: int, num_classes: int = 10) -> None:
        super().__init__()
        self.body = body
        self.probe = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.probe(list(self.body(x).values())[-1].mean((2, 3)))


def _torchvision(name: str) -> nn.Module:
    return torchvision.models.get_model(name, num_classes=10)


def _detector_body() -> nn.Module:
    det = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    return BodyProbe(det.backbone.body, 2048)


# name -> (factory, input size, RGB?, modules to freeze for speed)
NETWORKS = {
    "resnet18": (lambda: _torchvision("resnet18"), 64, True, None),
    "resnet50": (lambda: _torchvision("resnet50"), 64, True, None),
    "vgg16_bn": (lambda: _torchvision("vgg16_bn"), 32, True, "classifier"),  # 120M of its 134M params
    "mobilenet_v2": (lambda: _torchvision("mobilenet_v2"), 64, True, None),
    "regnet_x_400mf": (lambda: _torchvision("regnet_x_400mf"), 64, True, None),  # 32x32 diverges in 2 steps
    "fasterrcnn_body": (_detector_body, 64, True, None),
    "user": (UserNet, 28, False, None),
}


def _inputs(size: int, rgb: bool, count: int = 16):
    images, labels = fashion_mnist(count)
    return (as_rgb(images, size) if rgb else (images - 0.2860) / 0.3530), labels


def _train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 2) -> None:
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    net.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()


def _outputs(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net(x)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_irepify_random_code_train_fuse_equals_multi_branch(name):
    factory, size, rgb, frozen = NETWORKS[name]
    torch.manual_seed(0)
    model = factory()
    if frozen:
        model.get_submodule(frozen).requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    net = irepify(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input is untouched
    code = ArchCode.random(net.irep_config["backbone"], seed=1)
    apply_arch(net, code, create=True)
    assert code.count() > 0 and current_arch(net) == code
    x, y = _inputs(size, rgb)
    _train(net, x[:8], y[:8])
    # training moved the zero-initialised branches: fusion has real branches to fold
    last_bns = [[m for m in b.modules() if isinstance(m, nn.BatchNorm2d)][-1]
                for blk in net.modules() if isinstance(blk, IrepConv) for b in blk.branches.values()]
    assert last_bns and all(bn.weight.abs().sum() > 0 for bn in last_bns)
    fused = fuse_model(net)
    assert not any(isinstance(m, (IrepConv, nn.BatchNorm2d, BiasAsBN)) for m in fused.modules())
    assert rel_err(_outputs(net, x[8:]), _outputs(fused, x[8:])) <= TOL
    # the fused network has exactly the original's parameters with BN folded
    folded = fuse_model(model.eval(), inplace=True)  # the original is not needed any more
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in folded.parameters())


def test_user_module_convs_left_alone_are_reported_and_untouched():
    torch.manual_seed(0)
    model = UserNet()
    net = irepify(model)
    report = net.irep_report
    assert report.rewritten == ["stem", "convs.0", "convs.1", "convs.2"]
    assert dict(report.skipped) == {"big": "kernel 5x5, not 3x3", "dilated": "dilation (2, 2), not 1"}
    assert report.bn_pairs == [("dilated", "dbn")]  # not rewritten, but fuse_model folds it
    for path in ("big", "dilated", "dbn"):
        mine, theirs = net.get_submodule(path), model.get_submodule(path)
        assert type(mine) is type(theirs)
        assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), theirs.state_dict().values()))
    assert isinstance(net.stem.conv.bn, BiasAsBN)  # no normalisation appears where there was none
    assert isinstance(net.bns[0], nn.Identity) and net.convs[0].conv.conv.bias is None
    assert net.convs[1].groups == 16


def test_identity_only_where_stride_1_and_in_equals_out():
    net = irepify(_torchvision("resnet18"), name="byon:resnet18-identity")
    full = ArchCode.full(net.irep_config["backbone"])
    col = full.ops.index("identity")
    seen = set()
    for spec, row in zip(full.layer_specs(), full.bits):
        shaped = spec.stride == 1 and spec.in_channels == spec.out_channels
        assert row[col] == int(shaped), spec
        seen.add(shaped)
    assert seen == {True, False}
    with pytest.raises(ValueError, match="not available"):
        net.layer2[0].conv1.add_branches(["identity"])  # stride 2, 64 -> 128
    # depthwise layers of mobilenet_v2: identity where stride 1, none at stride 2
    mobile = irepify(_torchvision("mobilenet_v2"), name="byon:mobilenet_v2-identity")
    depthwise = [(s, row) for s, row in zip(ArchCode.full(mobile.irep_config["backbone"]).layer_specs(),
                                            ArchCode.full(mobile.irep_config["backbone"]).bits)
                 if s.groups == s.in_channels > 1]
    assert {s.stride for s, _ in depthwise} == {1, 2}
    assert all(row[col] == (s.stride == 1) for s, row in depthwise)


# -- exact start -------------------------------------------------------------------------------------
def _pretrained_style(tmp_path: Path) -> Path:
    """A resnet18 state dict that is not torchvision's init (BN statistics and weights moved), saved."""
    torch.manual_seed(3)
    model = randomize_bn(_torchvision("resnet18"), seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.0 + 0.1 * torch.randn_like(p))
    path = tmp_path / "resnet18_weights.pt"
    save_file(model.state_dict(), str(path))  # a plain safetensors state dict
    return path


def test_irepify_at_initialisation_equals_the_pretrained_network(tmp_path):
    weights = _pretrained_style(tmp_path)
    reference = _torchvision("resnet18")
    load_weights(reference, weights)  # strict, no pickle
    reference.eval()
    x, _ = _inputs(64, True, 8)
    want = _outputs(reference, x)
    built = build_model("torchvision:resnet18", weights=str(weights), num_classes=10).eval()
    assert built.irep_config["model"]["weights"] == str(weights)
    direct = irepify(reference)
    apply_arch(direct, ArchCode.random(direct.irep_config["backbone"], seed=4), create=True)  # zero-start branches
    for net in (built, direct.eval()):
        assert rel_err(want, _outputs(net, x)) <= 1e-6
    # train mode (batch statistics) too: the fixed op is the user's own conv and BN
    reference.train()
    direct.train()
    assert rel_err(_outputs(reference, x), _outputs(direct, x)) <= 1e-6


def test_no_bn_and_bias_before_bn_equal_in_train_and_eval_mode():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 10))
    with_bias_bn = UserNet()
    x, _ = _inputs(28, False, 8)
    for model in (plain, randomize_bn(with_bias_bn)):
        net = irepify(model)
        apply_arch(net, ArchCode.full(net.irep_config["backbone"]), create=True)
        for mode in (True, False):
            model.train(mode)
            net.train(mode)
            err = rel_err(_outputs(model, x), _outputs(net, x))
            # plain: exact; a bias moved into a BN's mean differs only by float32 rounding in train mode
            assert err <= (0.0 if model is plain else 1e-6), (type(model).__name__, mode, err)


def test_fusing_an_untrained_irepified_model_gives_torch_conv_bn_folding(tmp_path):
    original = _torchvision("mobilenet_v2")  # depthwise convs, a conv->BN after every conv
    original.load_state_dict(randomize_bn(_torchvision("mobilenet_v2"), seed=5).state_dict())
    original.eval()
    net = irepify(original)
    apply_arch(net, ArchCode.random(net.irep_config["backbone"], seed=6), create=True)
    fused = fuse_model(net.eval())
    pairs = [(c, b) for c, b in scan_conv_bn(original).bn_after.items() if b is not None]
    assert len(pairs) == sum(isinstance(m, nn.Conv2d) for m in original.modules())
    for conv_path, bn_path in pairs:
        want = fuse_conv_bn_eval(original.get_submodule(conv_path), original.get_submodule(bn_path))
        got = fused.get_submodule(conv_path)
        assert isinstance(fused.get_submodule(bn_path), nn.Identity)
        for a, b in ((want.weight, got.weight), (want.bias, got.bias)):
            assert rel_err(a, b) <= 1e-6, conv_path
    assert torch.equal(fused.classifier[1].weight, original.classifier[1].weight)


def test_frozen_batchnorm_is_absorbed_like_batchnorm():
    """torchvision's detectors with pretrained backbones use FrozenBatchNorm2d (no num_features)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10, norm_layer=FrozenBatchNorm2d).eval()
    net = irepify(model)
    assert isinstance(net.layer1[0].conv1.conv.bn, FrozenBatchNorm2d)
    assert isinstance(net.layer1[0].bn1, nn.Identity)
    assert ("conv1", "bn1") in net.irep_report.bn_pairs
    x, _ = _inputs(64, True, 4)
    fused = fuse_model(net)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in fused.modules())
    assert rel_err(_outputs(model, x), _outputs(fused, x)) <= TOL


# -- codes on the wrong network ------------------------------------------------------------------------
def test_code_of_resnet18_refused_on_resnet34_naming_the_first_difference():
    r18 = build_model("torchvision:resnet18", num_classes=10)
    r34 = build_model("torchvision:resnet34", num_classes=10)
    code = ArchCode.random("torchvision:resnet18", seed=0)
    ours, theirs = code.layers, tuple(n for n, m in r34.named_modules() if isinstance(m, IrepConv))
    row = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
    with pytest.raises(ArchMismatchError) as err:
        apply_arch(r34, code, create=True)
    assert "row {} of the code is layer {}, the model's is {}".format(row + 1, ours[row], theirs[row]) in str(err.value)
    apply_arch(r18, code, create=True)  # and it fits its own network


def test_code_file_with_an_edited_fingerprint_is_refused(tmp_path):
    net = irepify(UserNet(), name="byon:user")
    path = tmp_path / "user.arch"
    ArchCode.random("byon:user", seed=0).save(path)
    text = path.read_text()
    assert "version: 2" in text and "fingerprint:" in text
    apply_arch(net, ArchCode.load(path), create=True)
    assert current_arch(net) == ArchCode.load(path)
    lineno = next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith("fingerprint:"))
    path.write_text(re.sub(r"fingerprint: (\w)", lambda m: "fingerprint: " + ("0" if m.group(1) != "0" else "1"), text))
    with pytest.raises(ArchFormatError, match=r"{}:{}: fingerprint .* does not match the rows".format(
            re.escape(str(path)), lineno)):
        ArchCode.load(path)
    # a geometry edited with the fingerprint kept: the same refusal
    path.write_text(text.replace(" 16:32:2:1 ", " 16:32:1:1 "))
    with pytest.raises(ArchFormatError, match="does not match the rows"):
        ArchCode.load(path)


def test_code_of_a_model_with_one_stride_changed_is_refused(tmp_path):
    code = ArchCode.random(irepify(UserNet(stride=2), name="byon:user-s2").irep_config["backbone"], seed=0)
    other = irepify(UserNet(stride=1), name="byon:user-s1")
    with pytest.raises(ArchMismatchError, match=r"layer convs\.2 is 16->32 channels, stride 2, groups 1 in the code "
                                                r"but 16->32 channels, stride 1, groups 1 in the model"):
        apply_arch(other, code, create=True)
    # the checkpoint of one refuses the user's other module
    torch.manual_seed(0)
    net = irepify(UserNet(stride=2), name="byon:user-s2")
    save_checkpoint(tmp_path / "user.pt", net)
    with pytest.raises(CheckpointError, match=r"does not have the checkpoint's structure: layer convs\.2 .*stride 2"):
        load_checkpoint(tmp_path / "user.pt").build(UserNet(stride=1))
    again = load_checkpoint(tmp_path / "user.pt").build(UserNet(stride=2)).eval()
    x, _ = _inputs(28, False, 4)
    assert torch.equal(_outputs(net.eval(), x), _outputs(again, x))


# -- checkpoints never import code ---------------------------------------------------------------------
_USER_MODULE = '''
import pathlib
import torch.nn as nn

with open(pathlib.Path(__file__).with_suffix(".imported"), "a") as marker:
    marker.write("imported\\n")


def make(num_classes=10, width=8) -> nn.Module:  # a spec names a function annotated to return a network
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(width, num_classes))
'''


@pytest.fixture
def user_packages(tmp_path, monkeypatch):
    """Two importable packages under tmp_path whose import leaves a marker file; sys.path points there."""
    markers = {}
    for package in ("byon_userpkg", "byon_evilpkg"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
        (tmp_path / package / "net.py").write_text(_USER_MODULE)
        markers[package] = tmp_path / package / "net.imported"
    monkeypatch.syspath_prepend(str(tmp_path))
    yield markers
    for name in [n for n in sys.modules if n.split(".")[0] in markers]:
        del sys.modules[name]


def _imports(marker: Path) -> int:
    return len(marker.read_text().splitlines()) if marker.exists() else 0


def test_a_checkpoint_never_imports_code(tmp_path, user_packages):
    spec, user, evil = "byon_userpkg.net:make", user_packages["byon_userpkg"], user_packages["byon_evilpkg"]
    net = build_model(spec, num_classes=5, model_kwargs={"width": 4}).eval()
    assert _imports(user) == 1 and net.irep_config["model"]["kwargs"] == {"width": 4, "num_classes": 5}
    path = tmp_path / "user.pt"
    save_checkpoint(path, net)
    for name in [n for n in sys.modules if n.startswith("byon_userpkg")]:
        del sys.modules[name]  # sys.path still leads there: an import would succeed and be counted
    ck = load_checkpoint(path)
    assert ck.external and ck.header["backbone"] == spec
    for attempt in (ck.build, lambda: load_model(path)):
        with pytest.raises(CheckpointError, match=r"holds a byon_userpkg\.net:make network; name it \(--model "
                                                  r"byon_userpkg\.net:make\).*never imports code"):
            attempt()
    assert _imports(user) == 1 and "byon_userpkg.net" not in sys.modules
    # the user names it: now, and only now, it is imported
    x, _ = _inputs(28, False, 4)
    assert torch.equal(_outputs(net, x), _outputs(ck.build(spec).eval(), x))
    assert _imports(user) == 2

    # a header edited to name another spec: refused, and the other spec is never imported
    raw = load_tree(path, "checkpoint").tree
    raw["header"]["backbone"] = "byon_evilpkg.net:make"
    save_tree(tmp_path / "edited.pt", raw)
    edited = load_checkpoint(tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match=r"holds a byon_evilpkg\.net:make network, not byon_userpkg\.net:make"):
        edited.build(spec)
    with pytest.raises(CheckpointError, match="never imports code"):
        edited.build()
    assert _imports(evil) == 0 and "byon_evilpkg.net" not in sys.modules


# -- version-1 codes -----------------------------------------------------------------------------------
def _v1_codes():
    """Codes written by the version-1 writer and kept in the repository's benchmark results."""
    found = []

    def walk(value):
        if isinstance(value, str) and value.startswith(HEADER + "\nversion: 1\n"):
            found.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    for name in ("budget_sweep.json", "evidence_fmnist.json", "evidence_fmnist_vgg16.json"):
        walk(json.loads((ROOT / "benchmarks" / "results" / name).read_text()))
    return sorted(set(found))


def test_version_1_codes_of_builtin_backbones_still_load():
    codes = _v1_codes()
    assert len(codes) >= 3 and len({ArchCode.loads(t).backbone for t in codes}) >= 2
    for text in codes:
        code = ArchCode.loads(text, source="benchmarks/results")
        assert code.geometry is None and backbone_info(code.backbone).builtin
        assert code.dumps() == text  # written back in version 1, byte for byte
    code = ArchCode.loads(codes[0])
    model = build_model(code.backbone, arch=code, width=0.125)
    assert current_arch(model) == code
