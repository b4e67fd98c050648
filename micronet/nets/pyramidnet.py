"""PyramidNet for CIFAR (Han et al. 2017) with ShakeDrop (Yamada et al. 2018), as the Wave Computing
submission trained it: pre-activation bottlenecks, additive widening by alpha, zero-padded channel
shortcuts, 2x2 average-pool downsampling on the shortcut, no bias in any conv."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from micronet.nets import NumClasses, Probability, register_model


Gate = Literal["batch", "image"]


class _ShakeDropFn(torch.autograd.Function):
    """Forward scales a dropped branch by alpha ~ U[-1, 1] per image, backward by an independent beta ~ U[0, 1]
    per image. gate "batch" (Wave's code: one Bernoulli draw for the whole batch, mhariat/MicroNet@611cfb1
    Pruning/models/shakedrop.py L14-L21): the batch is either untouched or every image scaled by its own alpha;
    "image": one gate per image (the ShakeDrop paper's formulation). Neither syncs with the host."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, drop_prob: float, per_image: bool = False) -> torch.Tensor:
        shape = (x.size(0),) + (1,) * (x.dim() - 1)
        gate_shape = shape if per_image else (1,) * x.dim()
        keep = torch.empty(gate_shape, device=x.device, dtype=x.dtype).bernoulli_(1.0 - drop_prob)
        alpha = torch.empty(shape, device=x.device, dtype=x.dtype).uniform_(-1.0, 1.0)
        ctx.save_for_backward(keep)
        ctx.n = x.size(0)
        return x * (keep + (1.0 - keep) * alpha)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        beta = torch.rand((ctx.n,) + (1,) * (grad.dim() - 1), device=grad.device, dtype=grad.dtype)
        return grad * (keep + (1.0 - keep) * beta), None, None


class ShakeDrop(nn.Module):
    """Stochastic residual perturbation; at eval the branch is scaled by its expectation (1 - p)."""

    def __init__(self, drop_prob: float, gate: Gate = "batch"):
        super().__init__()
        if gate not in ("batch", "image"):
            raise ValueError(f"ShakeDrop gate must be 'batch' or 'image', got {gate!r}")
        self.drop_prob = float(drop_prob)
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob <= 0.0:
            return x
        if self.training:
            return _ShakeDropFn.apply(x, self.drop_prob, self.gate == "image")
        return x * (1.0 - self.drop_prob)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.4f}, gate={self.gate}"


def pad_channels(shortcut: torch.Tensor, channels: int) -> torch.Tensor:
    """Zero-pad the channel dimension up to `channels` (PyramidNet's parameter-free shortcut)."""
    extra = channels - shortcut.size(1)
    return F.pad(shortcut, (0, 0, 0, 0, 0, extra)) if extra > 0 else shortcut


class PyramidBottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, drop_prob: float, gate: Gate = "batch"):
        super().__init__()
        out_channels = width * self.expansion
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(out_channels)
        self.shake_drop = ShakeDrop(drop_prob, gate)
        self.downsample = nn.AvgPool2d(2, stride=2, ceil_mode=True) if stride != 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        out = self.shake_drop(self.bn4(out))
        return out + pad_channels(self.downsample(x), out.size(1))


class PyramidNet(nn.Module):
    def __init__(
        self,
        depth: int = 272,
        alpha: float = 200,
        num_classes: int = 100,
        shakedrop: float = 0.5,
        stem_channels: int = 16,
        shakedrop_gate: Gate = "batch",
    ):
        super().__init__()
        if (depth - 2) % 9:
            raise ValueError(f"bottleneck PyramidNet depth must be 9n+2, got {depth}")
        blocks_per_stage = (depth - 2) // 9
        total_blocks = 3 * blocks_per_stage
        add_rate = alpha / total_blocks

        self.conv1 = nn.Conv2d(3, stem_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels)

        in_channels, width_float, index = stem_channels, float(stem_channels), 0
        stages = []
        for stride in (1, 2, 2):
            blocks = []
            for b in range(blocks_per_stage):
                width_float += add_rate
                width = int(round(width_float))
                drop_prob = shakedrop * (index + 1) / total_blocks
                blocks.append(PyramidBottleneck(in_channels, width, stride if b == 0 else 1, drop_prob,
                                                shakedrop_gate))
                in_channels = width * PyramidBottleneck.expansion
                index += 1
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages

        self.bn_final = nn.BatchNorm2d(in_channels)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.bn_final(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


@register_model
def pyramidnet(depth: Annotated[int, Field(ge=11)] = 272, alpha: Annotated[float, Field(ge=0)] = 200,
               num_classes: NumClasses = 100, shakedrop: Probability = 0.5,
               shakedrop_gate: Gate = "batch") -> PyramidNet:
    """Bottleneck PyramidNet of any depth 9n+2 and widening alpha; shakedrop_gate batch (Wave) or image."""
    return PyramidNet(depth=depth, alpha=alpha, num_classes=num_classes, shakedrop=shakedrop,
                      shakedrop_gate=shakedrop_gate)


@register_model
def pyramidnet272(num_classes: NumClasses = 100, shakedrop: Probability = 0.5,
                  shakedrop_gate: Gate = "batch") -> PyramidNet:
    """PyramidNet-272, alpha 200: the Wave Computing submission's network (26,288,692 parameters)."""
    return PyramidNet(depth=272, alpha=200, num_classes=num_classes, shakedrop=shakedrop,
                      shakedrop_gate=shakedrop_gate)
