"""Encoders (randomly initialised torchvision networks) and the Dirichlet head.

`resnet_detectron` is ResNet-50 in detectron2's (and the original MSRA) layout: each stage's first
bottleneck puts its stride on the first 1x1 convolution. torchvision's ResNet-50 ("v1.5") puts it on
the 3x3 convolution, which costs more compute and is slightly more accurate on ImageNet. Both are
built from torchvision's modules; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision import models as tv

from zoobot_hpc.errors import InputError


class ModelError(InputError):
    """An unknown architecture or an invalid model setting."""


def _efficientnet_b0(channels: int) -> tuple[nn.Module, int]:
    net = tv.efficientnet_b0(weights=None)
    stem = net.features[0][0]
    net.features[0][0] = nn.Conv2d(
        channels, stem.out_channels, stem.kernel_size, stem.stride, stem.padding, bias=False
    )
    return nn.Sequential(net.features, net.avgpool, nn.Flatten()), net.classifier[1].in_features


def _resnet50(channels: int) -> nn.Module:
    net = tv.resnet50(weights=None)
    net.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.fc = nn.Identity()
    return net


def _resnet_torchvision(channels: int) -> tuple[nn.Module, int]:
    return _resnet50(channels), 2048


def _resnet_detectron(channels: int) -> tuple[nn.Module, int]:
    net = _resnet50(channels)
    for stage in (net.layer2, net.layer3, net.layer4):
        first = stage[0]
        first.conv1.stride, first.conv2.stride = first.conv2.stride, (1, 1)
    return net, 2048


ENCODERS: dict[str, Callable[[int], tuple[nn.Module, int]]] = {
    "efficientnet": _efficientnet_b0,
    "resnet_torchvision": _resnet_torchvision,
    "resnet_detectron": _resnet_detectron,
}


def build_encoder(architecture: str, channels: int) -> tuple[nn.Module, int]:
    """(encoder, number of output features) for an architecture name and 1 or 3 input channels."""
    if architecture not in ENCODERS:
        raise ModelError(f"model_architecture={architecture!r} is unknown; use one of {', '.join(ENCODERS)}")
    if channels not in (1, 3):
        raise ModelError(f"{channels} input channels: use 1 (grey, color=False) or 3 (color=True)")
    return ENCODERS[architecture](channels)


class DirichletHead(nn.Module):
    """Dropout → linear → concentrations in (1, 101), one per answer.

    Dropout is applied when asked, not when `self.training` says: prediction samples the posterior
    by calling the head several times with dropout on (MC dropout) on one set of encoder features.
    """

    def __init__(self, in_features: int, answers: int, dropout_rate: float) -> None:
        super().__init__()
        if not 0 <= dropout_rate < 1:
            raise ModelError(f"dropout_rate={dropout_rate}: use a value in [0, 1)")
        self.dropout_rate = dropout_rate
        self.linear = nn.Linear(in_features, answers)

    def forward(self, features: torch.Tensor, dropout: bool) -> torch.Tensor:
        features = nn.functional.dropout(features, self.dropout_rate, training=dropout)
        return 1.0 + 100.0 * torch.sigmoid(self.linear(features).float())
