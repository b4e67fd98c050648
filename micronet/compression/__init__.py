"""Compression methods: structured (channels), eigendamage + factorized (low rank), sparsity, dnw, quantize."""

from typing import Iterable

import torch.nn as nn

from micronet.errors import MicronetError


def count_parameters(model: nn.Module) -> int:
    """All parameters, the measure of structured compression (1 - params/params0)."""
    return sum(p.numel() for p in model.parameters())


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where the dotted `name` is: how compression swaps a layer for its smaller or folded form."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def check_layer_names(names: Iterable[str], layers: Iterable[str], key: str, kind: str = "layer") -> None:
    """An exclude list naming no layer is a typo: one line with the key and real names beats compressing all."""
    layers = list(layers)
    if missing := sorted(set(names) - set(layers)):
        raise MicronetError(f"{key} names no {kind} {missing}; layers look like {layers[:3]}")
