"""EfficientNet for 32x32 CIFAR-100 as the UCI/Qualcomm submission built it: the B3 and B0 teachers and the
"ex" (width 0.8, depth 0.8) and "exx" (width 0.8, depth 0.7) students of its distillation chain.

Where it departs from the ImageNet EfficientNet (Tan & Le 2019), and why:
- Stride-1 stem and stage strides 1, 1, 2, 1, 1, 2, 1 (spatial 32 -> 32 -> 16 -> 16 -> 16 -> 8 -> 8): the
  inputs are 32x32, not 224x224.
- TensorFlow-style "same" padding as an explicit ZeroPad2d: the stride-2 5x5 depthwise convs pad 1 before
  and 2 after, which `nn.Conv2d(padding=...)` cannot express.
- Swish (SiLU) everywhere, including the stem the original code calls "ConvBNReLU".
- BatchNorm eps 1e-5, momentum 0.01 in PyTorch's convention (1 % of each batch's statistics).
- The 1x1 projection conv keeps a bias in front of its BatchNorm. It is redundant, but the submission
  trained and counted it; the MicroNet counter folds the BatchNorm into that bias.
- Head: 1x1 ConvBNSwish -> global average pool -> Linear(C, 200) -> cosine classifier. The model outputs
  cos(theta) in [-1, 1]; the training loss owns the scale s (and any margin).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import SqueezeExcitation, StochasticDepth

from micronet.nets import Momentum, NumClasses, Positive, Probability, fan_out_normal_, register_model, with_bn_momentum

# Stages of EfficientNet-B0 for 32x32: (expand ratio, channels, repeats, first stride, kernel)
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 16, 1, 1, 3),
    (6, 24, 2, 1, 3),
    (6, 40, 2, 2, 5),
    (6, 80, 3, 1, 3),
    (6, 112, 3, 1, 5),
    (6, 192, 4, 2, 5),
    (6, 320, 1, 1, 3),
)
EMBEDDING_DIM = 200  # the cosine classifier's input (UCI's "mid_channels")


def round_filters(channels: int, width: float) -> int:
    """Channels scaled by `width`, rounded to a multiple of 8, never below 90 % of the scaled value."""
    if width == 1.0:
        return channels
    scaled = channels * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * scaled else rounded


def round_repeats(repeats: int, depth: float) -> int:
    """Blocks per stage scaled by `depth`, rounded up."""
    if depth == 1.0:
        return repeats
    return max(1, math.ceil(depth * repeats))


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.01)


class ConvBNSwish(nn.Sequential):
    """Zero "same" padding, bias-free conv, BatchNorm, Swish."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        pad = max(kernel_size - stride, 0)
        super().__init__(
            nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)),
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=0, groups=groups, bias=False),
            batch_norm(out_channels),
            nn.SiLU(),
        )


class MBConv(nn.Module):
    """Inverted residual: [1x1 expand] -> kxk depthwise -> squeeze-excitation -> 1x1 projection (with bias) -> BN.

    The SE bottleneck is a quarter of the block's *input* channels. Drop-connect (whole samples of the residual
    branch, training only) applies where there is a residual."""

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: int, kernel_size: int, stride: int,
                 drop_connect: float = 0.0):
        super().__init__()
        hidden = in_channels * expand_ratio
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNSwish(in_channels, hidden, 1))
        layers += [
            ConvBNSwish(hidden, hidden, kernel_size, stride, groups=hidden),
            SqueezeExcitation(hidden, max(1, int(in_channels / 4)), activation=nn.SiLU),
            nn.Conv2d(hidden, out_channels, 1),
            batch_norm(out_channels),
        ]
        self.block = nn.Sequential(*layers)
        self.use_residual = in_channels == out_channels and stride == 1
        self.drop_connect = StochasticDepth(drop_connect, "row") if self.use_residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.drop_connect is None:
            return out
        return x + self.drop_connect(out)


class CosineClassifier(nn.Module):
    """cos(theta) between the L2-normalized embedding and each class's L2-normalized weight column.

    `weight` is (in_features, num_classes), one column per class as in the submission's `Arcface` kernel.
    No bias, no margin, no scale: the loss multiplies by s. The clamp to [-1, 1] guards rounding only."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, num_classes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform in [-1, 1], then every column scaled to unit length."""
        with torch.no_grad():
            self.weight.uniform_(-1.0, 1.0)
            self.weight.div_(self.weight.norm(dim=0, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.normalize(self.weight, dim=0)
        return F.linear(F.normalize(x, dim=1), weight.t()).clamp(-1.0, 1.0)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[0]}, num_classes={self.weight.shape[1]}"


class EfficientNetCifar(nn.Module):
    def __init__(self, width: float, depth: float, num_classes: int = 100, drop_connect: float = 0.0,
                 dropout: float = 0.0):
        super().__init__()
        channels = round_filters(32, width)
        self.stem = ConvBNSwish(3, channels, 3, stride=1)
        blocks = []
        for expand, stage_channels, repeats, stride, kernel in STAGES:
            out_channels = round_filters(stage_channels, width)
            for i in range(round_repeats(repeats, depth)):
                blocks.append(MBConv(channels, out_channels, expand, kernel, stride if i == 0 else 1, drop_connect))
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        head_channels = round_filters(1280, width)
        self.head = ConvBNSwish(channels, head_channels, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.embedding = nn.Linear(head_channels, EMBEDDING_DIM)
        self.classifier = CosineClassifier(EMBEDDING_DIM, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # fan-out normal, as the submission (depthwise included)
                fan_out_normal_(m)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(self.embedding(self.dropout(x)))


@register_model
def efficientnet_b3_cifar(
    num_classes: NumClasses = 100, drop_connect: Probability = 0.2, dropout: Probability = 0.0
) -> EfficientNetCifar:
    """Width 1.2, depth 1.4: the first teacher of the chain."""
    return EfficientNetCifar(1.2, 1.4, num_classes, drop_connect, dropout)


@register_model
def efficientnet_b0_cifar(
    num_classes: NumClasses = 100, drop_connect: Probability = 0.2, dropout: Probability = 0.0
) -> EfficientNetCifar:
    """Width 1.0, depth 1.0: the teacher of ex and exx."""
    return EfficientNetCifar(1.0, 1.0, num_classes, drop_connect, dropout)


@register_model
def efficientnet_ex(
    num_classes: NumClasses = 100, drop_connect: Probability = 0.0, dropout: Probability = 0.0
) -> EfficientNetCifar:
    """Width 0.8, depth 0.8 (B0's repeats): the submitted model, 2,793,064 parameters."""
    return EfficientNetCifar(0.8, 0.8, num_classes, drop_connect, dropout)


@register_model
def efficientnet_exx(
    num_classes: NumClasses = 100, drop_connect: Probability = 0.0, dropout: Probability = 0.0
) -> EfficientNetCifar:
    """Width 0.8, depth 0.7 (one 152-channel block fewer): 2,418,650 parameters."""
    return EfficientNetCifar(0.8, 0.7, num_classes, drop_connect, dropout)


@register_model
def efficientnet_cifar(
    num_classes: NumClasses = 100, width: Positive = 1.0, depth: Positive = 1.0, drop_connect: Probability = 0.0,
    dropout: Probability = 0.0, bn_momentum: Momentum = 0.01,
) -> EfficientNetCifar:
    """Any width/depth of the 32x32 family (thin ones for toy runs of the teacher chain)."""
    return with_bn_momentum(EfficientNetCifar(width, depth, num_classes, drop_connect, dropout), bn_momentum)
