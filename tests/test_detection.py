"""Downstream detection, the paper's Table 4 route: a torchvision Faster R-CNN (ResNet-50 + FPN) whose
ResNet body is irepified with a random code, trained a few steps on a tiny real detection set, fused,
checked equal, and its fused body exported to ONNX and run by onnxruntime.

The detection set: real Fashion-MNIST images pasted onto 128x128 canvases, two per canvas (one in
each half), with their true boxes (the box of the nonzero pixels) and class labels (1-10; 0 is
background). The detector is the real fasterrcnn_resnet50_fpn at 128 pixels with fewer proposals
and sampled boxes than its defaults, which keeps a training step near 1-3 s on one CPU thread.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch
import torch.nn as nn

from irep_deploy import ArchCode, fuse_model
from irep_deploy.block import IrepConv
from irep_deploy.engines import ort as ort_helpers
from irep_deploy.engines.onnx import check_model, export_module, op_types
from irep_deploy import irepify
from irep_deploy.models import apply_arch

from conftest import fashion_mnist, rel_err

torchvision = pytest.importorskip("torchvision")
from torchvision.models.detection import fasterrcnn_resnet50_fpn  # noqa: E402

CANVAS = 128
Target = Dict[str, torch.Tensor]


def detection_set(count: int, start: int) -> List[Tuple[torch.Tensor, Target]]:
    """``count`` canvases with two real Fashion-MNIST objects each, their boxes and labels."""
    images, labels = fashion_mnist(2 * count, start)
    gen = torch.Generator().manual_seed(start)
    scenes = []
    for i in range(count):
        canvas = torch.zeros(3, CANVAS, CANVAS)
        boxes, classes = [], []
        for k in range(2):
            img = images[2 * i + k, 0]
            x0 = k * CANVAS // 2 + int(torch.randint(0, CANVAS // 2 - 28 + 1, (1,), generator=gen))
            y0 = int(torch.randint(0, CANVAS - 28 + 1, (1,), generator=gen))
            canvas[:, y0:y0 + 28, x0:x0 + 28] = img
            ys, xs = torch.nonzero(img > 0, as_tuple=True)
            boxes.append([x0 + xs.min().item(), y0 + ys.min().item(), x0 + xs.max().item() + 1, y0 + ys.max().item() + 1])
            classes.append(int(labels[2 * i + k]) + 1)
        scenes.append((canvas, {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(classes)}))
    return scenes


def small_detector() -> nn.Module:
    return fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=11, min_size=CANVAS, max_size=CANVAS,
        rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100,
        rpn_post_nms_top_n_test=50, rpn_batch_size_per_image=64, box_batch_size_per_image=64,
        box_score_thresh=0.0, box_detections_per_img=20)  # threshold 0: untrained scores are small


class Features(nn.Module):
    """The body's feature maps as a tuple (ONNX outputs are positional)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(self.body(x).values())


@pytest.mark.slow
def test_irepified_detector_trains_fuses_equal_and_its_body_exports_to_onnx():
    torch.manual_seed(0)
    original = small_detector()
    det = irepify(original, include="backbone.body", name="byon:fasterrcnn_resnet50_fpn")
    report = det.irep_report
    assert len(report.rewritten) == 16 and all(p.startswith("backbone.body.layer") for p in report.rewritten)
    assert ("backbone.fpn.layer_blocks.0.0", "not matched by include") in report.skipped  # 3x3, left to the FPN
    code = ArchCode.random(det.irep_config["backbone"], seed=3)
    apply_arch(det, code, create=True)
    assert code.count() > 0

    train, held_out = detection_set(6, 0), detection_set(2, 100)
    opt = torch.optim.SGD([p for p in det.parameters() if p.requires_grad], lr=0.005, momentum=0.9)
    det.train()
    for step in range(3):
        batch = train[2 * step:2 * step + 2]
        losses = det([img for img, _ in batch], [target for _, target in batch])
        loss = sum(losses.values())
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    det.eval()
    branch_gammas = [[m for m in b.modules() if isinstance(m, nn.BatchNorm2d)][-1].weight
                     for blk in det.modules() if isinstance(blk, IrepConv) for b in blk.branches.values()]
    assert branch_gammas and all(g.abs().sum() > 0 for g in branch_gammas)  # the branches trained

    fused = fuse_model(det)
    assert not any(isinstance(m, (IrepConv, nn.BatchNorm2d)) for m in fused.backbone.body.modules())
    plain_body = fuse_model(original.backbone.body.eval(), inplace=True)
    assert sum(p.numel() for p in fused.backbone.body.parameters()) == sum(p.numel() for p in plain_body.parameters())

    images = [img for img, _ in held_out]
    with torch.no_grad():
        batch = det.transform(images)[0].tensors
        want, got = det.backbone.body(batch), fused.backbone.body(batch)
        for level in want:
            assert rel_err(want[level], got[level]) <= 1e-5, level
        before, after = det(images), fused(images)
    # The heads are untouched; the body's features agree to float32 rounding (~1e-6 relative).
    # Box decoding (exp of the regression), ROI pooling and NMS pass that on: boxes in pixels on a
    # 128-pixel canvas agree to well under 1e-3 pixel, scores to 1e-4 relative.
    for a, b in zip(before, after):
        assert len(a["boxes"]) == len(b["boxes"]) > 0
        assert torch.equal(a["labels"], b["labels"])
        assert (a["boxes"] - b["boxes"]).abs().max() <= 1e-3
        assert torch.allclose(a["scores"], b["scores"], rtol=1e-4, atol=1e-8)

    # the fused body exports to ONNX: plain convs only, and onnxruntime computes what torch does
    body = Features(fused.backbone.body).eval()
    proto = export_module(body, (1, 3, CANVAS, CANVAS), dynamic_batch=False, output_name="feature0")
    check_model(proto, "fused body")
    ops = op_types(proto)
    assert "BatchNormalization" not in ops
    assert ops["Conv"] == sum(isinstance(m, nn.Conv2d) for m in body.modules())
    session = ort_helpers.make_session(proto.SerializeToString())
    x = batch[:1]
    outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        reference = body(x)
    assert len(outputs) == len(reference) == 4
    for ref, out in zip(reference, outputs):
        assert rel_err(ref, torch.from_numpy(np.asarray(out))) <= 1e-5
