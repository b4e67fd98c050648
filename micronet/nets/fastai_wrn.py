"""fastai v1's WideResNet (`fastai.vision.models.wrn`), as the fastai MicroNet submission trained it:
WRN-22-6 on CIFAR-100, 9,693,108 parameters.

It is not the canonical WRN of Zagoruyko & Komodakis: the shortcut reads relu(bn(x)) rather than x, the
residual branch is scaled by 0.2, and the stem conv has no BN/ReLU of its own (the first block's BN is it).
Module names follow fastai's (`features.{i}`, `bn`, `conv1`, `conv2.{0,1,2}`, `shortcut`), so a fastai
state_dict loads as is. ReLUs are modules where fastai has modules and functional where it calls F.relu.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from micronet.nets import Count, NumClasses, Probability, register_model


def _conv(ni: int, nf: int, kernel_size: int, stride: int) -> nn.Conv2d:
    """fastai's `conv2d`: 'same' padding, no bias, kaiming-normal (fan_in, gain sqrt 2) weights."""
    conv = nn.Conv2d(ni, nf, kernel_size, stride, padding=kernel_size // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight)
    return conv


class BasicBlock(nn.Module):
    """Pre-activation block; the shortcut (1x1 conv with the block's stride when the width changes) also
    starts from the pre-activated input."""

    def __init__(self, ni: int, nf: int, stride: int, drop_p: float = 0.0):
        super().__init__()
        self.bn = nn.BatchNorm2d(ni)
        self.conv1 = _conv(ni, nf, 3, stride)
        self.drop = nn.Dropout(drop_p, inplace=True) if drop_p else None
        self.conv2 = nn.Sequential(nn.BatchNorm2d(nf), nn.ReLU(inplace=True), _conv(nf, nf, 3, 1))
        self.shortcut = _conv(ni, nf, 1, stride) if ni != nf else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = F.relu(self.bn(x), inplace=True)
        r = self.shortcut(x2)
        x = self.conv1(x2)
        if self.drop is not None:
            x = self.drop(x)
        x = self.conv2(x) * 0.2
        return x.add_(r)


class WideResNet(nn.Module):
    """`num_groups` groups of `N` blocks, widths start_nf * k * 2^i; strides 1, 2, 2, ..."""

    def __init__(self, num_groups: int, N: int, num_classes: int, k: int = 1, drop_p: float = 0.0,
                 start_nf: int = 16):
        super().__init__()
        widths = [start_nf] + [start_nf * (2**i) * k for i in range(num_groups)]
        layers: list[nn.Module] = [_conv(3, widths[0], 3, 1)]
        for g in range(num_groups):
            for b in range(N):
                ni = widths[g] if b == 0 else widths[g + 1]
                stride = (1 if g == 0 else 2) if b == 0 else 1
                layers.append(BasicBlock(ni, widths[g + 1], stride, drop_p))
        layers += [
            nn.BatchNorm2d(widths[-1]),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(widths[-1], num_classes),
        ]
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


@register_model
def fastai_wrn22_6(num_classes: NumClasses = 100) -> WideResNet:
    """WRN-22-6 as fastai builds it (num_groups 3, N 3, k 6, no dropout): the fastai submission's network."""
    return WideResNet(num_groups=3, N=3, num_classes=num_classes, k=6, drop_p=0.0)


@register_model
def fastai_wrn(num_classes: NumClasses = 100, num_groups: Count = 3, n: Count = 3, k: Count = 6,
               drop_p: Probability = 0.0) -> WideResNet:
    """fastai v1's WideResNet of any size (`n` blocks per group, width factor `k`), e.g. thin ones for toy runs."""
    return WideResNet(num_groups=num_groups, N=n, num_classes=num_classes, k=k, drop_p=drop_p)
