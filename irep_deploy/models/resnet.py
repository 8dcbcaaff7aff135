"""ResNet-18/34/50 in torchvision's layout with every 3x3 conv a searchable block.

Module names follow ``torchvision.models.resnet`` (conv1, layer1.0.conv1, downsample, fc) so that
the fused network's state dict maps onto torchvision's one to one. Conv-BN pairs that are not
searchable (the 7x7 stem, 1x1 bottleneck and shortcut convs) are :class:`~irep_deploy.ops.ConvBN`
modules; searchable 3x3 convs come from ``conv3x3`` (an :class:`~irep_deploy.block.IrepConv`
factory), so BN sits inside each conv module and no separate ``bn1`` exists.
"""
from __future__ import annotations

from typing import List, Optional, Type, Union

import torch
import torch.nn as nn

from ..ops import ConvBN
from .common import ConvFactory, scale_channels, torchvision_init


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: Optional[nn.Module],
                 conv3x3: ConvFactory) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, 1)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.conv1(x))
        out = self.conv2(out)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's v1.5 bottleneck: the stride sits on the 3x3 conv, the only searchable one."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: Optional[nn.Module],
                 conv3x3: ConvFactory) -> None:
        super().__init__()
        self.conv1 = ConvBN(inplanes, planes, 1, 1, 0)
        self.conv2 = conv3x3(planes, planes, stride)
        self.conv3 = ConvBN(planes, planes * self.expansion, 1, 1, 0)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.conv1(x))
        out = self.relu(self.conv2(out))
        out = self.conv3(out)
        return self.relu(out + identity)


Block = Union[Type[BasicBlock], Type[Bottleneck]]


class ResNet(nn.Module):
    """``cifar=True``: searchable 3x3 stem with stride 1 and no max-pool (32x32 inputs)."""

    def __init__(self, block: Block, layers: List[int], conv3x3: ConvFactory, num_classes: int = 1000,
                 width: float = 1.0, in_channels: int = 3, cifar: bool = False) -> None:
        super().__init__()
        self.inplanes = scale_channels(64, width)
        if cifar:
            self.conv1 = conv3x3(in_channels, self.inplanes, 1)
            self.maxpool: Optional[nn.Module] = None  # not nn.Identity: no Identity node in ONNX
        else:
            self.conv1 = ConvBN(in_channels, self.inplanes, 7, 2, 3)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, scale_channels(64, width), layers[0], 1, conv3x3)
        self.layer2 = self._make_layer(block, scale_channels(128, width), layers[1], 2, conv3x3)
        self.layer3 = self._make_layer(block, scale_channels(256, width), layers[2], 2, conv3x3)
        self.layer4 = self._make_layer(block, scale_channels(512, width), layers[3], 2, conv3x3)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.inplanes, num_classes)
        torchvision_init(self)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int,
                    conv3x3: ConvFactory) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = ConvBN(self.inplanes, planes * block.expansion, 1, stride, 0)
        layers = [block(self.inplanes, planes, stride, downsample, conv3x3)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, None, conv3x3) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))
        if self.maxpool is not None:
            x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))
