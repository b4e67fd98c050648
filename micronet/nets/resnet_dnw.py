"""ResNet-50 v1.5 as the DNW submission built it: torchvision's ResNet-50 (stride on the 3x3 conv of the
bottleneck, 1x1 stride-2 conv + BN downsample) with the classifier a bias-free 1x1 conv on the pooled
features, so DNW can sparsify it like every other conv. 25,556,032 parameters at 1000 classes."""

from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.models.resnet import Bottleneck, ResNet

from micronet.nets import NumClasses, register_model


class ResNetConvClassifier(ResNet):
    """torchvision's ResNet whose `fc` is a 1x1 Conv2d applied before flattening (N, C, 1, 1) -> (N, classes)."""

    def __init__(self, layers: list[int], num_classes: int) -> None:
        super().__init__(Bottleneck, layers, num_classes=num_classes)
        self.fc = nn.Conv2d(512 * Bottleneck.expansion, num_classes, kernel_size=1, bias=False)
        # DNW's init: He-normal with fan_in (torchvision uses fan_out), the classifier included; BN 1/0
        # (torchvision's, kept: DNW does not zero the last BN of a block).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.fc(self.avgpool(x)), 1)


@register_model
def resnet50_dnw(num_classes: NumClasses = 1000) -> ResNetConvClassifier:
    """ResNet-50 v1.5 with a 1x1-conv classifier (DNW's micro-net-dnw `resnet50`)."""
    return ResNetConvClassifier([3, 4, 6, 3], num_classes)
