"""What the built-in backbones share: the searchable-conv factory type, width scaling and
torchvision's initialisation."""
from __future__ import annotations

from typing import Callable, Optional

import torch.nn as nn

ConvFactory = Callable[[int, int, int], nn.Module]  # (in_channels, out_channels, stride) -> module


def scale_channels(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def torchvision_init(model: nn.Module, linear_std: Optional[float] = None) -> None:
    """torchvision's initialisation: Kaiming-normal convs (fan out), unit BN; linear layers N(0, std)
    when ``linear_std`` is given (VGG), else PyTorch's default (ResNet)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0, linear_std)
            nn.init.constant_(m.bias, 0)
