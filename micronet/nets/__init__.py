"""Architectures, registered by name (one module per family), built with `create_model(name, **kwargs)`."""

from __future__ import annotations

import math
from typing import Callable

import torch.nn as nn

from micronet.errors import MicronetError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: make a builder available under its function name."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"model {fn.__name__!r} registered twice")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs) -> nn.Module:
    if name not in _REGISTRY:
        raise MicronetError(f"unknown architecture {name!r}; registered: {', '.join(list_models())}")
    return _REGISTRY[name](**kwargs)


def fan_out_normal_(conv: nn.Conv2d) -> None:
    """N(0, sqrt(2 / (k*k*out))) weights and zero bias (depthwise and SE convs alike): the conv init of the
    KAIST and UCI code, which both derive from the same EfficientNet/MobileNet reference."""
    fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / fan_out))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


# Importing the families registers their builders.
from micronet.nets import efficientnet, fastai_wrn, kaist, pyramidnet, resnet_dnw  # noqa: E402,F401


def builder(name: str) -> Callable[..., nn.Module]:
    return _REGISTRY[name]
