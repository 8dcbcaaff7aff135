"""Export of models with several outputs: every tensor a named graph output, every output verified.

A fused detector body (torchvision's Faster R-CNN MobileNetV3-Large FPN backbone, built without weights:
an OrderedDict of FPN maps), a YOLO-style head (a tensor and a nested list) and a dict with nested
containers go through ``export_model``; the detector body also goes through the CLI (`fuse`, `export`
of a checkpoint saved from Python, named by a user's factory), and `bench`/`quantize` of the
multi-output ONNX file run or refuse in one line.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn

from irep_deploy import ArchCode, apply_arch, build_model, current_arch, fuse_model, save_checkpoint
from irep_deploy.compare import compare, compare_outputs
from irep_deploy.engines import ort as ort_helpers
from irep_deploy.engines.onnx import export_model, export_module, output_names, verify
from irep_deploy.errors import IrepError, UsageError, VerificationError

from conftest import randomize_arch_params, randomize_bn, run_cli

BODY = "tests.byon_detector:mobilenet_fpn_body"  # tests/byon_detector.py, importable from the repo root
SIZE = 64


class YoloLike(nn.Module):
    """A raw detection head's shape of output in eval mode: a tensor, then a list (nested here)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> Any:
        y = self.conv(x).relu()
        z = self.head(y)
        return z.flatten(2), [y, [z, z.mean((2, 3))]]


class Nested(nn.Module):
    """A dict with a list, a nested dict, a key with a space and a key that is a number."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> Any:
        y = self.conv(x)
        return {"boxes": [y, y.sigmoid()], "class score": {"max": y.amax(1)}, 7: y * 3}


def test_output_names_follow_the_documented_rules():
    t = torch.zeros(2, 3)
    assert output_names(t) == ["logits"]
    assert output_names(t, "features") == ["features"]
    assert output_names((t, [t, [t, t]])) == ["output0", "output1", "output2", "output3"]
    assert output_names([t, t], "feat") == ["feat0", "feat1"]
    assert output_names(OrderedDict([("0", t), ("1", t), ("pool", t)])) == ["output0", "output1", "pool"]
    assert output_names(Nested()(torch.zeros(1, 3, 4, 4))) == ["boxes.0", "boxes.1", "class_score.max", "output7"]
    with pytest.raises(UsageError, match="returns a dict, whose keys name its outputs"):
        output_names({"a": t}, "logits")
    with pytest.raises(IrepError, match="'a b' and 'a_b' would both be named 'a_b'"):
        output_names({"a b": t, "a_b": t})
    with pytest.raises(IrepError, match=r"output '1' is NoneType, not a tensor"):
        output_names((t, None))
    with pytest.raises(IrepError, match="holds no tensor"):
        output_names(())


def test_compare_outputs_measures_each_output_against_its_own_range():
    big = torch.full((2, 3), 1000.0)
    small = torch.full((2, 3), 1e-3)
    off = small + 1e-4  # 10 % off the small output, 1e-7 of the big one's range
    whole = compare_outputs({"boxes": big, "scores": [small]}, {"boxes": big, "scores": [off]}, 1e-4)
    assert not whole.passed and whole.failures[0].startswith("output 'scores.0': relative error")
    assert whole.rel_error == pytest.approx(0.1)
    assert compare_outputs(big, big + 1e-2, 1e-4).passed == compare(big, big + 1e-2, 1e-4).passed
    with pytest.raises(VerificationError, match="differ in structure"):
        compare_outputs({"a": big}, {"b": big})


@pytest.mark.parametrize("fixed_batch", [None, 3])
def test_a_yolo_style_tuple_and_list_exports_with_every_output_named_and_verified(tmp_path, fixed_batch):
    torch.manual_seed(0)
    model = YoloLike().eval()
    report = export_model(model, tmp_path / "yolo.onnx", (3, 16, 16), batch=fixed_batch)
    b = fixed_batch or 1
    assert [(o.name, o.shape) for o in report.outputs] == [
        ("output0", (b, 4, 256)), ("output1", (b, 6, 16, 16)), ("output2", (b, 4, 16, 16)), ("output3", (b, 4))]
    assert [c.batch for c in report.checks] == ([3] if fixed_batch else [1, 4])
    session = ort_helpers.make_session(str(tmp_path / "yolo.onnx"))
    assert [o.name for o in session.get_outputs()] == ["output0", "output1", "output2", "output3"]
    x = torch.randn(3, 3, 16, 16)
    got = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        want = model(x)
    assert compare_outputs(want, (got[0], [got[1], [got[2], got[3]]]), 1e-5).passed


def test_verify_checks_every_output_not_only_the_first(tmp_path):
    torch.manual_seed(0)
    model = YoloLike().eval()
    data = export_module(model, (1, 3, 16, 16)).SerializeToString()
    changed = YoloLike().eval()
    changed.load_state_dict(model.state_dict())

    def second_output_off(module, inputs, output):
        return output * 1.01  # only the list's first tensor (output1) moves

    changed.conv.register_forward_hook(second_output_off)
    changed.head.register_forward_pre_hook(lambda module, inputs: (inputs[0] / 1.01,))  # head output unchanged
    with pytest.raises(VerificationError, match="onnxruntime output 'output1' differs from torch at batch 1"):
        verify(changed, data, (1, 3, 16, 16), [1, 4], 1e-4)
    assert len(verify(model, data, (1, 3, 16, 16), [1, 4], 1e-4)) == 2


def test_a_nested_dict_exports_under_its_keys(tmp_path):
    report = export_model(Nested().eval(), tmp_path / "nested.onnx", (3, 8, 8))
    assert [o.name for o in report.outputs] == ["boxes.0", "boxes.1", "class_score.max", "output7"]
    assert report.output_name == "boxes.0, boxes.1, class_score.max, output7"
    with pytest.raises(UsageError, match="input and output names must differ"):
        export_model(Nested().eval(), tmp_path / "clash.onnx", (3, 8, 8), input_name="output7")
    assert not (tmp_path / "clash.onnx").exists()


def _irepified_body(seed: int = 0) -> nn.Module:
    net = build_model(BODY, include=["body"], input_size=SIZE)
    apply_arch(net, ArchCode.random(net.irep_config["backbone"], seed=seed), create=True)
    return randomize_arch_params(randomize_bn(net)).eval()


@pytest.mark.slow
def test_a_fused_detector_body_exports_every_fpn_map_from_python(tmp_path):
    torch.manual_seed(0)
    fused = fuse_model(_irepified_body())
    report = export_model(fused, tmp_path / "body.onnx", (3, SIZE, SIZE))
    with torch.no_grad():
        want = fused(torch.zeros(1, 3, SIZE, SIZE))
    assert list(want) == ["0", "1", "pool"]
    assert [(o.name, o.shape) for o in report.outputs] == [
        ("output0", tuple(want["0"].shape)), ("output1", tuple(want["1"].shape)), ("pool", tuple(want["pool"].shape))]
    assert all(c.rel_error < 1e-4 for c in report.checks) and report.checks[0].worst in ("output0", "output1", "pool")


@pytest.mark.slow
def test_the_cli_fuses_exports_and_benches_a_detector_body_named_by_a_factory(tmp_path):
    torch.manual_seed(0)
    net = _irepified_body()
    save_checkpoint(tmp_path / "body.pt", net)
    current_arch(net).save(tmp_path / "arch.bin")
    rc, out, err = run_cli(tmp_path, "fuse", "body.pt", "arch.bin", "-o", "body.deploy.pt", "--model", BODY)
    assert rc == 0, err
    rc, out, err = run_cli(tmp_path, "export", "body.deploy.pt", "-o", "body.onnx", "--model", BODY)
    assert rc == 0, err
    assert "outputs output0 256x2x2, output1 256x2x2, pool 256x1x1" in out
    assert out.count(", 3 outputs, worst ") == 2  # batch 1 and 4
    session = ort_helpers.make_session(str(tmp_path / "body.onnx"))
    x = torch.randn(2, 3, SIZE, SIZE)
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x.numpy()})))
    with torch.no_grad():
        want = fuse_model(net)(x)
    for key, name in (("0", "output0"), ("1", "output1"), ("pool", "pool")):
        assert compare(want[key], np.asarray(got[name]), 1e-4).passed, name
    # the dict names its outputs: --output-name is refused before anything is written
    rc, out, err = run_cli(tmp_path, "export", "body.deploy.pt", "-o", "x.onnx", "--model", BODY, "--output-name", "f")
    assert (rc, out) == (2, "") and err.count("\n") == 1 and "keys name its outputs" in err
    assert not (tmp_path / "x.onnx").exists()
    # onnxruntime times a multi-output file; quantize takes one output and says so in one line
    rc, out, err = run_cli(tmp_path, "bench", "body.onnx", "--warmup", "0", "--duration", "0.05",
                           "--iterations", "2", "--rounds", "1")
    assert rc == 0, err
    assert "onnx     ort:CPU      1" in out
    rc, out, err = run_cli(tmp_path, "quantize", "body.onnx", "--calib", "digits", "-o", "q.onnx")
    assert rc == 1 and err.count("\n") == 1, err
    assert "body.onnx: expected one output, the model has 3 ('output0', 'output1', 'pool')" in err
