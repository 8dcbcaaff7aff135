"""Finer tracing in irepify: a module torch.fx cannot trace does not blind its callers (it becomes a
leaf of their graph and is scanned on its own), the convs it calls directly are settled by one real
forward, shared convs and train-only paths are handled, and every skip names the module to blame.

Real networks: small ones defined here, torchvision's googlenet and detectors (built without weights;
nothing is downloaded), each irepified, compared with the original in eval mode, fused and compared
again.
"""
from __future__ import annotations

from typing import Callable, Dict, List

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.models import detection

from irep_deploy import ArchCode, fuse_model, irepify
from irep_deploy.block import IrepConv
from irep_deploy.models import apply_arch
from irep_deploy.surgery import ineligible_reason, scan_conv_bn

from conftest import randomize_bn, rel_err

TOL = 1e-5
SOME_OPS = ("conv1x3", "conv1x1_avg", "dil2x1")  # three kinds of branch keep ssd300's 300-pixel runs short


class Odd(nn.Module):
    """Shape-dependent control flow: torch.fx cannot trace this forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if y.shape[-1] > 4:
            y = torch.relu(y)
        return self.head(y)


class Toy(nn.Module):
    """Two convs of its own (one with a BN) around a submodule that fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.odd = Odd()
        self.b = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.odd(torch.relu(self.bn(self.a(x))))))


def _same_after_fuse(original: nn.Module, net: nn.Module, x: torch.Tensor, seed: int) -> nn.Module:
    """net equals original in eval mode; with a random code and random BNs, fused equals multi-branch."""
    original.eval()
    net.eval()
    with torch.no_grad():
        assert rel_err(original(x), net(x)) <= TOL
    apply_arch(net, ArchCode.random(net.irep_config["backbone"], seed=seed), create=True)
    randomize_bn(net.eval(), seed)  # the new branches were made in train mode
    fused = fuse_model(net)
    with torch.no_grad():
        assert rel_err(net(x), fused(x)) <= TOL
    return fused


def test_a_submodule_fx_cannot_trace_does_not_blind_its_caller():
    torch.manual_seed(0)
    model = randomize_bn(Toy())
    net = irepify(model, input_size=16)
    report = net.irep_report
    # the caller's convs are traced around the leaf "odd": "a" absorbs its BN
    assert report.rewritten == ["a", "odd.head", "b"]
    assert isinstance(net.bn, nn.Identity) and net.a.conv.bn is not None
    # a BN takes odd.conv's output inside the untraceable forward: skipped, naming the module
    (path, reason), = report.skipped
    assert path == "odd.conv"
    assert reason.startswith("its output feeds odd.bn, which cannot be proven its only user because odd (Odd) "
                             "cannot be traced by torch.fx: TraceError: ")
    assert report.bn_pairs == []  # not proven: fuse_model must not fold odd.bn into odd.conv
    fused = _same_after_fuse(model, net, torch.randn(2, 3, 16, 16), seed=1)
    assert isinstance(fused.odd.bn, nn.BatchNorm2d)


def test_an_untraceable_module_deep_inside_blinds_none_of_its_ancestors():
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Sequential(Toy()), nn.Conv2d(8, 8, 3, padding=1, bias=False),
                                       nn.BatchNorm2d(8)))
    net = irepify(model, input_size=16)
    assert net.irep_report.rewritten == ["0.0.a", "0.0.odd.head", "0.0.b", "1"]
    assert isinstance(net[2], nn.Identity) and isinstance(net[0][0].bn, nn.Identity)  # both BNs absorbed
    assert [p for p, _ in net.irep_report.skipped] == ["0.0.odd.conv"]
    assert "because 0.0.odd (Odd) cannot be traced by torch.fx: " in net.irep_report.skipped[0][1]
    _same_after_fuse(model, net, torch.randn(2, 3, 16, 16), seed=3)


def test_a_failing_example_forward_is_named_in_the_reason():
    net = irepify(Toy(), example_input=torch.zeros(1, 5, 8, 8))  # 5 channels: the forward raises
    reasons = dict(net.irep_report.skipped)
    assert net.irep_report.rewritten == ["a", "b"]
    assert reasons["odd.head"].startswith("the BN after it is unknown because odd (Odd) cannot be traced by torch.fx: ")
    assert ", and a forward on the example input failed (RuntimeError: " in reasons["odd.head"]


class Shared(nn.Module):
    """One conv used twice, each time followed by one shared BN; another used twice, once with a BN."""

    def __init__(self) -> None:
        super().__init__()
        self.same = nn.Conv2d(4, 4, 3, padding=1, bias=True)
        self.same_bn = nn.BatchNorm2d(4)
        self.mixed = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.mixed_bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.same_bn(self.same(x)) + self.same_bn(self.same(x.flip(-1)))
        return self.mixed_bn(self.mixed(x)) + self.mixed(x)


def test_a_conv_called_twice_is_rewritten_when_every_call_has_the_same_follower():
    torch.manual_seed(0)
    model = randomize_bn(Shared())
    net = irepify(model)
    assert net.irep_report.rewritten == ["same"] and isinstance(net.same_bn, nn.Identity)
    assert net.irep_report.skipped == [
        ("mixed", "called 2 times in the forward, followed by no BN or by mixed_bn: no one block replaces it")]
    x = torch.randn(2, 4, 8, 8)
    net.train()
    model.train()  # batch statistics: the absorbed BN still runs once per call
    assert rel_err(model(x), net(x)) <= TOL
    _same_after_fuse(model, net, x, seed=2)


class TrainOnlyBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.stem(x))
        return self.bn(y) if self.training else y


def test_a_conv_whose_bn_differs_between_the_modes_is_skipped_and_modes_are_restored():
    model = TrainOnlyBN().train()
    model.bn.eval()  # a frozen BN keeps its own mode
    net = irepify(model)
    assert net.irep_report.skipped == [("conv", "followed by no BN in eval mode but by bn in train mode")]
    assert model.training and not model.bn.training and net.training and not net.bn.training


def test_googlenet_train_only_aux_heads_bns_are_folded():
    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True).train()
    net = irepify(model)
    assert net.training  # the mode it came in
    assert {("aux1.conv.conv", "aux1.conv.bn"), ("aux2.conv.conv", "aux2.conv.bn")} <= set(net.irep_report.bn_pairs)
    eligible = [p for p, m in model.named_modules() if isinstance(m, nn.Conv2d) and ineligible_reason(m) is None]
    assert sorted(net.irep_report.rewritten) == sorted(eligible)
    randomize_bn(net)
    fused = fuse_model(net.eval())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # eval mode skips the aux heads: they are compared on their own input
        assert rel_err(net(x), fused(x)) <= TOL
        for aux, channels in (("aux1", 512), ("aux2", 528)):
            aux_in = torch.randn(1, channels, 4, 4)
            assert rel_err(getattr(net, aux)(aux_in), getattr(fused, aux)(aux_in)) <= TOL


# name -> (builder, input size); small min_size/max_size keep one forward well under a second
DETECTORS: Dict[str, Callable[[], nn.Module]] = {
    "retinanet_resnet50_fpn": lambda: detection.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=64, max_size=64),
    "fcos_resnet50_fpn": lambda: detection.fcos_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=64, max_size=64),
    "ssd300_vgg16": lambda: detection.ssd300_vgg16(weights=None, weights_backbone=None),
    "ssdlite320_mobilenet_v3_large": lambda: detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None),
    "fasterrcnn_resnet50_fpn": lambda: detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=64, max_size=64),
}


def _eligible(model: nn.Module) -> List[str]:
    return [p for p, m in model.named_modules() if isinstance(m, nn.Conv2d) and ineligible_reason(m) is None]


def _dense(det: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """The detector's raw head outputs for a batch (before box decoding and NMS, whose ties may flip)."""
    features = det.backbone(x)
    if det.__class__.__name__ == "FasterRCNN":
        objectness, deltas = det.rpn.head(list(features.values()))
        return objectness + deltas
    feats = list(features.values()) if isinstance(features, dict) else features
    return list(det.head(feats).values())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DETECTORS))
def test_detection_heads_lose_no_eligible_conv_and_fuse_exactly(name):
    torch.manual_seed(0)
    model = DETECTORS[name]().eval()
    net = irepify(model, ops=SOME_OPS, input_size=64)
    assert sorted(net.irep_report.rewritten) == sorted(_eligible(model)), net.irep_report.skipped
    image = torch.rand(3, 64, 64)
    batch = net.transform([image])[0].tensors
    with torch.no_grad():  # at its first rewrite the detector runs whole and computes what it did
        assert len(model([image])[0]["boxes"]) == len(net([image])[0]["boxes"])
        for a, b in zip(_dense(model, batch), _dense(net, batch)):
            assert rel_err(a, b) <= TOL
    apply_arch(net, ArchCode.random(net.irep_config["backbone"], seed=4, ops=SOME_OPS), create=True)
    randomize_bn(net.eval(), 4)  # the new branches were made in train mode
    fused = fuse_model(net)
    assert not any(isinstance(m, (IrepConv, nn.BatchNorm2d)) for m in fused.modules())
    with torch.no_grad():
        for a, b in zip(_dense(net, batch), _dense(fused, batch)):
            assert rel_err(a, b) <= TOL


@pytest.mark.slow
def test_detection_scan_is_the_same_in_either_mode():
    model = DETECTORS["retinanet_resnet50_fpn"]()
    found = [scan_conv_bn(model.train(mode)) for mode in (False, True)]
    assert found[0] == found[1] and not found[0].unknown
    assert "head.classification_head.cls_logits" in found[0].untraced  # the head iterates over its inputs
