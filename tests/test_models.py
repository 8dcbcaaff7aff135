"""Whole networks: fused == multi-branch for every backbone and code; torchvision compatibility."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from irep_deploy import ArchCode, apply_arch, build_model, current_arch, fuse_model, to_torchvision
from irep_deploy.block import IrepConv
from irep_deploy.errors import ArchMismatchError, IrepError
from irep_deploy.models import MODELS, searchable_layers
from irep_deploy.ops import ConvBN

from conftest import randomize_arch_params, randomize_bn, rel_err

CODES = {
    "full": lambda name: ArchCode.full(name),
    "empty": lambda name: ArchCode.empty(name),
    "random": lambda name: ArchCode.random(name, ratio=2 / 3, seed=7),
}


def input_for(name: str, batch: int = 2) -> torch.Tensor:
    size = 32 if MODELS[name].input_size == 32 else 64
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("code_kind", sorted(CODES))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_fused_network_equals_multi_branch(name, code_kind):
    torch.manual_seed(0)
    code = CODES[code_kind](name)
    model = build_model(name, arch=code, width=0.125, num_classes=7)
    randomize_arch_params(randomize_bn(model))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = fuse_model(model)
    x = input_for(name)
    with torch.no_grad():
        assert rel_err(model(x), plain(x)) < 1e-5
    # the input model is untouched and still multi-branch
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert current_arch(model) == code
    # nothing of the training form is left in the plain network
    kinds = {type(m) for m in plain.modules()}
    assert not kinds & {nn.BatchNorm2d, IrepConv, ConvBN}
    assert all(m.bias is not None for m in plain.modules() if isinstance(m, nn.Conv2d))
    assert plain.irep_config["deploy"] and ArchCode.loads(plain.irep_config["arch"]) == code


def test_every_3x3_conv_is_searchable_and_nothing_else():
    for name in MODELS:
        plain = fuse_model(build_model(name, width=0.125).eval())
        blocks = dict(searchable_layers(build_model(name, width=0.125)))
        for path, m in plain.named_modules():
            if isinstance(m, nn.Conv2d):
                assert (m.kernel_size == (3, 3)) == (path in blocks), (name, path)


def test_supernet_fused_under_a_code_equals_that_subnet():
    name = "resnet18_cifar"
    supernet = randomize_arch_params(randomize_bn(build_model(name, supernet=True, width=0.125))).eval()
    code = ArchCode.random(name, ratio=0.5, seed=3)
    plain = fuse_model(supernet, arch=code)
    assert current_arch(supernet) == ArchCode.full(name)  # fusing another code did not switch it
    apply_arch(supernet, code)
    x = input_for(name)
    with torch.no_grad():
        assert rel_err(supernet(x), plain(x)) < 1e-5


def test_fuse_in_place_converts_the_model_itself():
    model = build_model("vgg16_cifar", arch=ArchCode.full("vgg16_cifar"), width=0.125).eval()
    x = input_for("vgg16_cifar")
    with torch.no_grad():
        want = model(x)
        out = fuse_model(model, inplace=True)
        assert out is model and rel_err(want, model(x)) < 1e-5
    assert not any(isinstance(m, IrepConv) for m in model.modules())
    with pytest.raises(IrepError):
        fuse_model(model)


def test_width_multiplier_scales_channels():
    small = build_model("resnet18", width=0.25)
    assert small.layer4[1].conv2.out_channels == 128 and small.fc.in_features == 128


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "vgg16"])
def test_torchvision_loads_the_fused_state_dict_strictly(name):
    torch.manual_seed(0)
    model = build_model(name, arch=ArchCode.random(name, ratio=1 / 2, seed=1), num_classes=1000)
    randomize_arch_params(randomize_bn(model)).eval()
    plain = fuse_model(model)
    tv = getattr(torchvision.models, name)(weights=None).eval()
    tv.load_state_dict(to_torchvision(plain), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(plain(x), tv(x)) < 1e-5
        assert rel_err(model(x), tv(x)) < 1e-5
    # Table 2: the fused network has the plain backbone's parameters (torchvision's BN
    # weight+bias per channel become one conv bias per channel)
    n_plain = sum(p.numel() for p in fuse_model(build_model(name).eval()).parameters())
    n_fused = sum(p.numel() for p in plain.parameters())
    bn_channels = sum(m.num_features for m in tv.modules() if isinstance(m, nn.BatchNorm2d))
    assert n_fused == n_plain == sum(p.numel() for p in tv.parameters()) - bn_channels


def test_to_torchvision_refuses_what_it_cannot_map():
    with pytest.raises(IrepError, match="no torchvision counterpart"):
        to_torchvision(fuse_model(build_model("resnet18_cifar", width=0.125).eval()))
    with pytest.raises(IrepError, match="fused model"):
        to_torchvision(build_model("resnet18", width=0.125))


def test_a_code_that_does_not_fit_is_refused_naming_the_mismatch():
    model = build_model("resnet18", width=0.125)
    with pytest.raises(ArchMismatchError, match="is for resnet34"):
        apply_arch(model, ArchCode.full("resnet34"))
    other_ops = ArchCode.full("resnet18", ops=["conv1x3", "conv3x1"])
    with pytest.raises(ArchMismatchError, match="ops"):
        apply_arch(model, other_ops)
    with pytest.raises(ArchMismatchError, match="layer1.0.conv1 has no conv1x3 branch"):
        apply_arch(model, ArchCode.full("resnet18"))
    code = ArchCode.full("resnet18")
    shuffled = ArchCode("resnet18", code.ops, code.layers[1:] + code.layers[:1], code.bits)
    with pytest.raises(ArchMismatchError, match="row 1 of the code is layer layer1.0.conv2"):
        apply_arch(model, shuffled)
    # a refused code leaves the model as it was
    assert current_arch(model) == ArchCode.empty("resnet18")


def test_unknown_model_name():
    with pytest.raises(ArchMismatchError, match="unknown model"):
        build_model("resnet19")
