"""VGG-16 with every 3x3 conv a searchable block.

``features`` keeps torchvision's indices (conv at 0, ReLU at 1, ...; the BN of each conv lives
inside its block), so the fused ImageNet-layout network loads into ``torchvision.models.vgg16()``.
"""
from __future__ import annotations

from typing import List, Union

import torch
import torch.nn as nn

from .common import ConvFactory, scale_channels, torchvision_init

CFG_VGG16: List[Union[int, str]] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                    512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    """``cifar=True``: ceil-mode pools (28x28 and 32x32 inputs both reach 1x1), global average
    pool and a 512-512-classes head, as in ACNet's CIFAR VGG."""

    def __init__(self, conv3x3: ConvFactory, num_classes: int = 1000, width: float = 1.0,
                 in_channels: int = 3, cifar: bool = False, cfg: List[Union[int, str]] = CFG_VGG16) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        channels = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=cifar))
            else:
                out = scale_channels(int(v), width)
                layers += [conv3x3(channels, out, 1), nn.ReLU(inplace=True)]
                channels = out
        self.features = nn.Sequential(*layers)
        if cifar:
            hidden = scale_channels(512, width)
            self.avgpool: nn.Module = nn.AdaptiveAvgPool2d((1, 1))
            self.classifier = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True),
                                            nn.Linear(hidden, num_classes))
        else:
            hidden = scale_channels(4096, width)
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier = nn.Sequential(
                nn.Linear(channels * 7 * 7, hidden), nn.ReLU(True), nn.Dropout(p=0.5),
                nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(p=0.5),
                nn.Linear(hidden, num_classes))
        torchvision_init(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))
