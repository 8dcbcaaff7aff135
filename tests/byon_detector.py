"""A detector body for the `--model package.module:factory` export tests (tests/deploy/test_export_outputs.py).

Named on the command line as ``tests.byon_detector:mobilenet_fpn_body`` (the repository root on
PYTHONPATH): torchvision's Faster R-CNN MobileNetV3-Large FPN backbone, built without weights. It returns
an OrderedDict of FPN maps (keys ``0``, ``1``, ``pool``), which is what a user's factory returns to
reach a detector's body from the CLI: ``torchvision:NAME`` builds the whole detector.
"""
from __future__ import annotations

import torch.nn as nn
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn


def mobilenet_fpn_body() -> nn.Module:
    return fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=3).backbone
