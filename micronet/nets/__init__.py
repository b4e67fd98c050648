"""Architectures, registered by name (one module per family), built with `create_model(name, **kwargs)`."""

from __future__ import annotations

import inspect
import math
import typing
from typing import Annotated, Any, Callable

import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model as pydantic_model

from micronet.errors import MicronetError

# Ranges of builder arguments, in the builders' signatures: `model.args` and a checkpoint's args are checked
# against them before anything is built.
NumClasses = Annotated[int, Field(ge=1)]
Count = Annotated[int, Field(ge=1)]
Positive = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(ge=0, lt=1)]
Momentum = Annotated[float, Field(gt=0, le=1)]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: make a builder available under its function name."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"model {fn.__name__!r} registered twice")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def args_schema(name: str) -> type[BaseModel]:
    """A builder's keyword arguments as a pydantic model: names, types, defaults and ranges from its signature."""
    fn = _REGISTRY[name]
    hints = typing.get_type_hints(fn, include_extras=True)
    fields = {n: (hints.get(n, Any), p.default) for n, p in inspect.signature(fn).parameters.items()}
    return pydantic_model(f"{name}_args", __config__=ConfigDict(extra="forbid", allow_inf_nan=False), **fields)


def validate_args(name: str, args: dict[str, Any], prefix: str = "args") -> dict[str, Any]:
    """`args` checked against builder `name` (unknown names, types, ranges); one line naming the first bad key."""
    if name not in _REGISTRY:
        raise MicronetError(f"'arch' = {name!r}: unknown architecture; registered: {', '.join(list_models())}")
    schema = args_schema(name)
    try:
        return schema.model_validate(args).model_dump(include=set(args))
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join([prefix, *map(str, error["loc"])])
        if error["type"] == "extra_forbidden":
            raise MicronetError(f"'{key}': {name} takes no argument {error['loc'][-1]!r}; it takes "
                                f"{', '.join(schema.model_fields)}") from None
        raise MicronetError(f"'{key}' = {error.get('input')!r}: {error['msg'].lower()}") from None


def create_model(name: str, **kwargs) -> nn.Module:
    kwargs = validate_args(name, kwargs)  # as validated: "10" for an int argument arrives as 10
    try:
        return _REGISTRY[name](**kwargs)
    except ValueError as exc:  # a constraint across arguments, checked by the network itself
        raise MicronetError(f"{name}: {exc}") from None


def fan_out_normal_(conv: nn.Conv2d) -> None:
    """N(0, sqrt(2 / (k*k*out))) weights and zero bias (depthwise and SE convs alike): the conv init of the
    KAIST and UCI code, which both derive from the same EfficientNet/MobileNet reference."""
    fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / fan_out))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def with_bn_momentum(model: nn.Module, momentum: float) -> nn.Module:
    """Every BatchNorm's running-statistics momentum (torch's convention). KAIST's and UCI's 0.01 needs thousands of
    steps to settle, so a toy run of a hundred steps evaluates with the initial statistics (chance accuracy)
    unless it raises this."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum
    return model


# Importing the families registers their builders.
from micronet.nets import efficientnet, fastai_wrn, kaist, pyramidnet, resnet_dnw  # noqa: E402,F401


def builder(name: str) -> Callable[..., nn.Module]:
    return _REGISTRY[name]
