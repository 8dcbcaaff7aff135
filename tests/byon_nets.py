"""A user's own network for the `--model package.module:factory` tests (tests/test_cli_model.py).

Named on the command line as ``tests.byon_nets:small_cnn`` (the repository root on PYTHONPATH). It has
what a real user's CNN has: 3x3 convs with BN (rewritten), a strided one, a depthwise one, a 3x3 conv
with a bias and no BN (rewritten with its bias kept), and a 5x5 conv (left alone).
"""
from __future__ import annotations

import torch.nn as nn


def small_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 8) -> nn.Module:
    w = width
    features = nn.Sequential(
        nn.Conv2d(in_channels, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
        nn.Conv2d(w, 2 * w, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
        nn.Conv2d(2 * w, 2 * w, 3, 1, 1, groups=2 * w, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
        nn.Conv2d(2 * w, 2 * w, 3, 1, 1, bias=True), nn.ReLU(inplace=True),
        nn.Conv2d(2 * w, 2 * w, 5, 1, 2, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
    )
    return nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, num_classes))
