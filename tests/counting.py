"""Helpers for counter and model tests: single functional ops wrapped as modules so the counter can see them,
and BatchNorms with non-trivial statistics so a forward or fold check sees every one."""

from __future__ import annotations

import torch
import torch.nn as nn

from micronet.scoring import Count


class Fn(nn.Module):
    """Wraps a function of the input so single functional ops can be counted."""

    def __init__(self, fn, *modules: nn.Module):
        super().__init__()
        self.fn = fn
        self.mods = nn.ModuleList(modules)

    def forward(self, x):
        return self.fn(x, *self.mods)


def totals(c: Count) -> tuple[float, float, float]:
    return c.param_bits, c.mults, c.adds


def randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine terms, so a forward check sees every BN."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model
