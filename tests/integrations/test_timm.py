"""timm as a user works with it: ``timm:NAME`` specs, and timm's own re-parameterizable networks.

Real timm networks built from timm's configurations with ``pretrained=False``: nothing is
downloaded. RepVGG, MobileOne and FastViT re-parameterize themselves; irepify collapses them with
their own ``reparameterize()`` first, so the fused network is plain (no BN, none of their branches).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from irep_deploy import ArchCode, apply_arch, build_model, fuse_model, irepify, load_checkpoint, load_model
from irep_deploy.block import IrepConv
from irep_deploy.checkpoint import save_checkpoint
from irep_deploy.data import FASHION_MNIST_ROOT
from irep_deploy.errors import CheckpointError, NotAvailableError, UsageError
from irep_deploy.ops import ConvBN
from irep_deploy.precision import exact_fp32

from conftest import randomize_arch_params, randomize_bn, rel_err, run_cli

SIZE = 64  # FastViT downsamples by 32


def _input(channels: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, channels, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _counts(model: nn.Module) -> Tuple[int, int]:
    """(convs, BatchNorms) of ``model``."""
    return (sum(isinstance(m, nn.Conv2d) for m in model.modules()),
            sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()))


# -- without timm -------------------------------------------------------------------------------------
def test_a_timm_spec_without_timm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # what `import timm` meets where timm is not installed
    monkeypatch.delitem(sys.modules, "irep_deploy.integrations.timm", raising=False)
    with pytest.raises(NotAvailableError, match=r"^model spec 'timm:resnet18' needs the timm extra: pip install "
                                         r"irep-deploy\[timm\]$"):
        build_model("timm:resnet18")


# -- timm: specs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, kwargs, message", [
    ("timm:nosuchnet", {}, r"^model spec 'timm:nosuchnet': timm [\d.]+ has no model 'nosuchnet' "
                           r"\(see timm.list_models\(\)\)$"),
    # hub names fetch a configuration even without weights: no registered architecture, refused
    ("timm:hf-hub:timm/resnet18.a1_in1k", {}, r"has no model 'hf-hub:timm/resnet18.a1_in1k'"),
    ("timm:resnet18", {"model_kwargs": {"pretrained": True}},
     r"^model spec 'timm:resnet18': argument 'pretrained' is refused: .*never download"),
    ("timm:resnet18", {"model_kwargs": {"checkpoint_path": "w.pth"}}, r"argument 'checkpoint_path' is refused"),
    ("timm:resnet18", {"weights": "a1_in1k"},
     r"^--weights a1_in1k: no such file \(timm models are built with pretrained=False: a weights name would "
     r"download; give a state-dict file\)$"),
])
def test_timm_specs_refuse_in_one_line(spec, kwargs, message):
    pytest.importorskip("timm")
    with pytest.raises(UsageError, match=message):
        build_model(spec, **kwargs)


def test_timm_spec_builds_timms_network_and_records_it(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    reference = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1)
    save_file(randomize_bn(reference).state_dict(), str(tmp_path / "w.safetensors"))
    net = build_model("timm:resnet18", num_classes=10, model_kwargs={"in_chans": 1},
                      weights=str(tmp_path / "w.safetensors"), input_size=SIZE)
    config = net.irep_config
    assert (config["backbone"], config["in_channels"], config["num_classes"]) == ("timm:resnet18", 1, 10)
    assert config["model"]["kwargs"] == {"in_chans": 1, "num_classes": 10}
    assert len(net.irep_report.rewritten) == 16  # resnet18's 3x3 convs after the 7x7 stem
    x = _input(1)
    with torch.no_grad(), exact_fp32():
        assert torch.equal(net.eval()(x), reference.eval()(x))  # the weights file loaded; the start is exact
    # the checkpoint records the spec; it is rebuilt only when the user names it again
    apply_arch(net, ArchCode.random("timm:resnet18", seed=1), create=True)
    save_checkpoint(tmp_path / "ckpt.pt", net)
    with pytest.raises(CheckpointError, match="timm:resnet18"):
        load_model(tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="timm:resnet18"):
        load_model(tmp_path / "ckpt.pt", "timm:resnet34")
    again = load_model(tmp_path / "ckpt.pt", "timm:resnet18")
    with torch.no_grad(), exact_fp32():
        assert torch.equal(again.eval()(x), net(x))


# -- networks that re-parameterize themselves -------------------------------------------------------------
# (name, the modules' own method); all three meet plain BatchNorm2d / BatchNormAct2d only inside their
# own re-parameterizable blocks, which are collapsed before the scan, except FastViT's 7x7 ConvMlp convs
# (BatchNormAct2d without activation: the norm-act rule decides how that BN is folded)
REPARAM_NETS = ["repvgg_a0", "mobileone_s0", "fastvit_t8"]


@pytest.fixture(scope="module", params=REPARAM_NETS)
def reparam_net(request) -> Dict[str, nn.Module]:
    timm = pytest.importorskip("timm")
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    original = randomize_bn(timm.create_model(request.param, pretrained=False, num_classes=10), seed=1).eval()
    net = irepify(original, name="timm:" + request.param, input_size=SIZE).eval()
    return {"name": request.param, "original": original, "timm_plain": reparameterize_model(original), "net": net}


def test_irepify_collapses_their_branches_with_their_own_code_first(reparam_net):
    original, net = reparam_net["original"], reparam_net["net"]
    calls: List[Tuple[str, str]] = net.irep_report.reparameterized
    assert calls and {method for _, method in calls} == {"reparameterize"}
    own = {path for path, m in original.named_modules() if callable(getattr(m, "reparameterize", None))}
    called = {path for path, _ in calls}
    # every one of them is named in the report, or sat inside one (FastViT's RepMixer collapses its mixer)
    assert called <= own and all(any(p == c or p.startswith(c + ".") for c in called) for p in own)
    # the user's network is untouched (a copy is collapsed), and no branch of theirs is left in ours
    assert any(hasattr(m, "conv_kxk") or hasattr(m, "large_conv") for m in original.modules())
    assert not any(isinstance(getattr(m, "conv_kxk", None), nn.Module) for m in net.modules())


def test_the_start_is_their_eval_network(reparam_net):
    x = _input()
    with torch.no_grad(), exact_fp32():
        want, theirs, ours = reparam_net["original"](x), reparam_net["timm_plain"](x), reparam_net["net"](x)
    # their own deploy form, of which ours is a copy (measured <= 1e-6): training form and deploy form
    # differ by float rounding only
    assert rel_err(ours, theirs) <= 1e-5 and rel_err(ours, want) <= 1e-5


def test_fused_is_plain_and_equals_the_multi_branch_network(reparam_net):
    net = reparam_net["net"]
    multi = irepify(reparam_net["original"], name="timm:" + reparam_net["name"], input_size=SIZE)
    apply_arch(multi, ArchCode.random("timm:" + reparam_net["name"], ratio=0.5, seed=2), create=True)
    randomize_arch_params(randomize_bn(multi, seed=3), seed=4)  # non-zero branches, as after training
    multi.eval()
    fused = fuse_model(multi)
    x = _input(seed=5)
    with torch.no_grad(), exact_fp32():
        want, got = multi(x), fused(x)
    assert rel_err(got, want) <= 1e-5
    assert not any(isinstance(m, (IrepConv, ConvBN, nn.modules.batchnorm._BatchNorm)) for m in fused.modules())
    # as plain as timm's own deploy form: one conv per conv of it, no BN
    assert _counts(fused) == (_counts(reparam_net["timm_plain"])[0], 0)
    assert len(net.irep_report.rewritten) > 0


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0"])
def test_timms_reparameterize_model_on_our_fused_network_changes_nothing(name):
    timm = pytest.importorskip("timm")
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    multi = irepify(randomize_bn(timm.create_model(name, pretrained=False, num_classes=10)), name="timm:" + name)
    apply_arch(multi, ArchCode.random("timm:" + name, ratio=0.5, seed=2), create=True)
    fused = fuse_model(randomize_bn(multi, seed=3).eval())
    again = reparameterize_model(fused)  # their blocks hold a conv already: each call returns at once
    x = _input()
    with torch.no_grad():
        assert torch.equal(again(x), fused(x))


# -- the command line ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not (Path(FASHION_MNIST_ROOT) / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed (make data)")
def test_cli_trains_fuses_and_exports_a_timm_network(tmp_path):
    pytest.importorskip("timm")
    ort = pytest.importorskip("onnxruntime")
    import numpy as np

    spec = ["--model", "timm:resnet18", "--model-kwargs", json.dumps({"in_chans": 1})]  # grey data fed directly
    build_model("timm:resnet18", num_classes=10, model_kwargs={"in_chans": 1})  # its layer table, for the code
    ArchCode.random("timm:resnet18", ratio=1 / 3, seed=3).save(tmp_path / "arch.bin")
    steps = {
        "train": ["train", "-o", "run", "--arch", "arch.bin", *spec, "--dataset", "fashion-mnist", "--limit", "64",
                  "--batch-size", "32", "--device", "cpu", "--epochs", "1", "--lr", "0.02", "--no-progress"],
        "fuse": ["fuse", "run/ckpt.pt", "arch.bin", "-o", "deploy.pt", "--model", "timm:resnet18"],
        "export": ["export", "deploy.pt", "-o", "model.onnx", "--model", "timm:resnet18"],
    }
    for step, argv in steps.items():
        rc, out, err = run_cli(tmp_path, *argv)
        assert rc == 0 and "Traceback" not in err, (step, err[-2000:])
    header = load_checkpoint(tmp_path / "deploy.pt").header
    assert (header["backbone"], header["in_channels"], header["kind"]) == ("timm:resnet18", 1, "deploy")
    assert header["model"]["kwargs"] == {"in_chans": 1, "num_classes": 10}
    fused = load_checkpoint(tmp_path / "deploy.pt").build("timm:resnet18").eval()
    assert _counts(fused)[1] == 0
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad(), exact_fp32():
        want = fused(x).numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    # a file never decides what is imported: the checkpoint alone is refused
    rc, _, err = run_cli(tmp_path, "export", "deploy.pt", "-o", "again.onnx")
    assert rc != 0 and "(--model timm:resnet18)" in err and "Traceback" not in err
