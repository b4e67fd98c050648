"""Helpers for counter and model tests: single functional ops wrapped as modules so the counter can see them."""

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
