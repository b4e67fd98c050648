"""Low-rank factorized layers and their plan: what EigenDamage pruning turns every conv and linear into, and
the plain-data description a checkpoint keeps so the model can be rebuilt without any pruning code.

A factorized layer is three plain layers in an nn.Sequential, so everything that walks conv/linear modules
(sparsity masks, BN folding into the last 1x1, the MicroNet counter) sees ordinary layers:

    input  (1x1 conv / linear, cin -> in_rank):   the input rotation, rows = kept input eigen-directions
    core   (k x k conv / linear, in_rank -> out_rank, the original stride/padding/dilation, no bias)
    output (1x1 conv / linear, out_rank -> cout):  the output rotation, carrying the original conv bias

A linear layer's bias is folded into the input rotation as Wave did (K-FAC treats it as a constant-1 input
column): input = Linear(cin, in_rank) whose bias is that column, so it costs (cin + 1) * in_rank parameters.
A conv keeps its bias on the output 1x1 instead: under zero padding a constant input channel is not constant
after the core conv's padding, so folding a conv bias into the input would change the border outputs."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Union

import torch
import torch.nn as nn

from micronet.compression import replace_module
from micronet.errors import MicronetError


class FactorizedConv2d(nn.Sequential):
    """1x1 conv (cin -> in_rank) -> k x k core conv (in_rank -> out_rank) -> 1x1 conv (out_rank -> cout)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        in_rank: int,
        out_rank: int,
        kernel_size: Union[int, tuple[int, int]],
        stride: Union[int, tuple[int, int]] = 1,
        padding: Union[int, tuple[int, int]] = 0,
        dilation: Union[int, tuple[int, int]] = 1,
        padding_mode: str = "zeros",
        input_bias: bool = False,
        output_bias: bool = False,
    ):
        super().__init__(OrderedDict(
            input=nn.Conv2d(in_channels, in_rank, 1, bias=input_bias),
            core=nn.Conv2d(in_rank, out_rank, kernel_size, stride, padding, dilation, bias=False,
                           padding_mode=padding_mode),
            output=nn.Conv2d(out_rank, out_channels, 1, bias=output_bias),
        ))

    @property
    def in_channels(self) -> int:
        return self.input.in_channels

    @property
    def out_channels(self) -> int:
        return self.output.out_channels

    @property
    def in_rank(self) -> int:
        return self.core.in_channels

    @property
    def out_rank(self) -> int:
        return self.core.out_channels


class FactorizedLinear(nn.Sequential):
    """Linear (cin -> in_rank, bias = the folded original bias) -> Linear (in_rank -> out_rank) -> Linear."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        in_rank: int,
        out_rank: int,
        input_bias: bool = False,
        output_bias: bool = False,
    ):
        super().__init__(OrderedDict(
            input=nn.Linear(in_features, in_rank, bias=input_bias),
            core=nn.Linear(in_rank, out_rank, bias=False),
            output=nn.Linear(out_rank, out_features, bias=output_bias),
        ))

    @property
    def in_features(self) -> int:
        return self.input.in_features

    @property
    def out_features(self) -> int:
        return self.output.out_features

    @property
    def in_rank(self) -> int:
        return self.core.in_features

    @property
    def out_rank(self) -> int:
        return self.core.out_features


Factorized = (FactorizedConv2d, FactorizedLinear)


@torch.no_grad()
def set_factors(
    layer: Union[FactorizedConv2d, FactorizedLinear],
    input_weight: torch.Tensor,
    input_bias: torch.Tensor | None,
    core_weight: torch.Tensor,
    output_weight: torch.Tensor,
    output_bias: torch.Tensor | None,
) -> None:
    """Copy 2-D rotations (rank x cin, cout x rank) and the core into `layer`, whose shapes must match."""
    for module, weight, bias in ((layer.input, input_weight, input_bias), (layer.core, core_weight, None),
                                 (layer.output, output_weight, output_bias)):
        module.weight.copy_(weight.reshape(module.weight.shape))
        if (bias is None) != (module.bias is None):
            raise ValueError("factor bias does not match the layer's bias")
        if bias is not None:
            module.bias.copy_(bias)


# ---- plans: the ranks a checkpoint records, enough to rebuild the module tree ---------------------------


def factorization_plan(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per factorized layer: its kind, outer sizes, ranks and which of its rotations carry a bias."""
    plan: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, FactorizedConv2d):
            plan[name] = {"kind": "conv", "in_channels": m.in_channels, "out_channels": m.out_channels}
        elif isinstance(m, FactorizedLinear):
            plan[name] = {"kind": "linear", "in_channels": m.in_features, "out_channels": m.out_features}
        else:
            continue
        plan[name].update(in_rank=m.in_rank, out_rank=m.out_rank, input_bias=m.input.bias is not None,
                          output_bias=m.output.bias is not None)
    return plan


_PLAN_KEYS = ("kind", "in_channels", "out_channels", "in_rank", "out_rank", "input_bias", "output_bias")


def apply_factorization_plan(model: nn.Module, plan: dict[str, dict[str, Any]]) -> nn.Module:
    """Replace each planned layer of a freshly built model by an (untrained) factorized layer of the planned
    ranks; the kernel geometry comes from the architecture, the weights from load_state_dict afterwards."""
    for name, spec in plan.items():
        missing = [k for k in _PLAN_KEYS if k not in spec]
        if missing:
            raise MicronetError(f"factorization plan entry {name!r} lacks {missing}; re-run the prune stage")
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise MicronetError(f"factorization plan names layer {name!r}, which this architecture does not "
                                f"have (was the checkpoint written for another arch?)") from None
        new = _factorized_like(name, old, spec)
        ref = next(old.parameters())
        new.to(device=ref.device, dtype=ref.dtype)
        replace_module(model, name, new)
    return model


def _factorized_like(name: str, old: nn.Module, spec: dict[str, Any]) -> nn.Module:
    sizes = (int(spec["in_channels"]), int(spec["out_channels"]), int(spec["in_rank"]), int(spec["out_rank"]))
    biases = {"input_bias": bool(spec["input_bias"]), "output_bias": bool(spec["output_bias"])}
    if spec["kind"] == "conv" and isinstance(old, (nn.Conv2d, FactorizedConv2d)):
        conv = old.core if isinstance(old, FactorizedConv2d) else old
        return FactorizedConv2d(*sizes, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                                conv.padding_mode, **biases)
    if spec["kind"] == "linear" and isinstance(old, (nn.Linear, FactorizedLinear)):
        return FactorizedLinear(*sizes, **biases)
    raise MicronetError(f"factorization plan says layer {name!r} is a {spec['kind']}, but the architecture has "
                        f"a {type(old).__name__} there")
