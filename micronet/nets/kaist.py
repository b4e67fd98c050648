"""KAIST's MicroNet ver1 / ver2 (NeurIPS 2019 MicroNet Challenge, 2nd place on CIFAR-100): MobileNetV3-like
inverted residuals with squeeze-and-excitation and h-swish, as their `Models/MicroNet.py` computes them.

Module names are theirs (`conv1`, `bn1`, `layers.{i}.{conv1,bn1,conv2,bn2,conv3,bn3,shortcut.{0,1},fc1,fc2}`,
`linear`), so their state_dicts map key for key (micronet.importers.import_kaist).

Their HSwish module computes x * relu6(x + 3) / 6; nn.Hardswish is the same function (equal up to float
rounding) and the counter sees it as one `hardswish` op at their cost, 4 mults + 1 add per element.

Two things in their code a reader would not expect, both kept:
- the expansion multiplies the block's *input* width: planes = int(expansion * in_planes);
- stride-2 blocks have no shortcut and no SE: their forward computes the SE gate and then discards it
  (`out * w + shortcut(x) if stride == 1 else out`). The SE layers of those blocks still exist (they are in
  the checkpoints and in the dense weight count) but are not run here, which gives the same outputs.
  They get no gradient from the task loss, only from regularizers that read weights directly (SRIP);
  under DDP without SRIP they are unused parameters.
"""

from __future__ import annotations


import torch
import torch.nn as nn

from micronet.nets import Momentum, NumClasses, fan_out_normal_, register_model, with_bn_momentum

# Rows: (expansion, out channels, blocks, stride of the first block).
CFG_V1 = [(3, 16, 2, 1), (3, 32, 1, 2), (3, 32, 1, 1), (3, 48, 3, 1), (3, 72, 1, 2), (3, 72, 4, 1),
          (3, 80, 1, 2), (3, 88, 2, 1), (3, 106, 1, 1)]
CFG_V2 = [(2.5, 20, 2, 1), (2.5, 36, 1, 2), (2.5, 36, 1, 1), (2.5, 56, 3, 1), (2.5, 80, 1, 2), (2.5, 80, 4, 1),
          (2.5, 88, 1, 2), (2.5, 96, 2, 1), (2.5, 114, 1, 1)]
STEM_CHANNELS = 32
BN_MOMENTUM = 0.01  # Keras' 0.99
SE_RATIO = 0.25


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=BN_MOMENTUM)


class MicroBlock(nn.Module):
    """1x1 expand -> 3x3 depthwise (stride) -> 1x1 project, h-swish between; SE on the projected output and
    a shortcut (identity, or 1x1 conv + BN when the width changes) on stride-1 blocks only."""

    def __init__(self, in_planes: int, out_planes: int, expansion: float, stride: int):
        super().__init__()
        planes = int(expansion * in_planes)
        self.stride = stride
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = _bn(planes)
        self.act1 = nn.Hardswish()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, groups=planes, bias=False)
        self.bn2 = _bn(planes)
        self.act2 = nn.Hardswish()
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = _bn(out_planes)
        if stride != 1:
            self.shortcut: nn.Module | None = None
        elif in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, bias=False), _bn(out_planes))
        else:
            self.shortcut = nn.Identity()
        squeezed = int(out_planes * SE_RATIO)
        self.avg_se = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(out_planes, squeezed, 1)
        self.act_se = nn.Hardswish()
        self.fc2 = nn.Conv2d(squeezed, out_planes, 1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.shortcut is None:  # stride 2: their SE result is discarded, so it is not computed
            return out
        gate = self.sigmoid(self.fc2(self.act_se(self.fc1(self.avg_se(out)))))
        return out * gate + self.shortcut(x)


class MicroNet(nn.Module):
    """Stem conv3x3 -> BN -> h-swish at full resolution, the cfg's blocks, GAP -> dropout 0.3 -> linear."""

    def __init__(self, cfg: list[tuple[float, int, int, int]], num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, 3, padding=1, bias=False)
        self.bn1 = _bn(STEM_CHANNELS)
        self.act = nn.Hardswish()
        blocks, in_planes = [], STEM_CHANNELS
        for expansion, out_planes, num_blocks, stride in cfg:
            for b in range(num_blocks):
                blocks.append(MicroBlock(in_planes, out_planes, expansion, stride if b == 0 else 1))
                in_planes = out_planes
        self.layers = nn.Sequential(*blocks)
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.3)
        self.linear = nn.Linear(in_planes, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Their init: conv N(0, sqrt(2 / (k*k*out))) (depthwise and SE convs included, biases 0),
        linear N(0, 0.01) with bias 0, BN 1 / 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out_normal_(m)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.avg(self.layers(out))
        return self.linear(self.dropout(torch.flatten(out, 1)))


@register_model
def kaist_micronet_v1(num_classes: NumClasses = 100, bn_momentum: Momentum = BN_MOMENTUM) -> MicroNet:
    """KAIST MicroNet ver1 (expansion 3; 450,456 dense weights), their submitted network."""
    return with_bn_momentum(MicroNet(CFG_V1, num_classes), bn_momentum)


@register_model
def kaist_micronet_v2(num_classes: NumClasses = 100, bn_momentum: Momentum = BN_MOMENTUM) -> MicroNet:
    """KAIST MicroNet ver2 (expansion 2.5; 471,184 dense weights)."""
    return with_bn_momentum(MicroNet(CFG_V2, num_classes), bn_momentum)
