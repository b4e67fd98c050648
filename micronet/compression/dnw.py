"""Discovering Neural Wirings (Wortsman et al. 2019) at a fixed per-layer density, as micro-net-dnw trained
its sparse ResNet-50: every forward uses each layer's top `density` fraction of |w|, and the gradient goes
straight through to all weights, pruned ones included, so a dormant weight that grows re-enters the top-k.

It is a `torch.nn.utils.parametrize` parametrization of each conv/linear weight, so the training loop,
DDP and the optimizer see ordinary parameters and need not know. While it is on, `model.state_dict()` holds
the dense weights under `<layer>.parametrizations.weight.original` (dormant weights included, which a resume
needs): load such a file into a model that `apply_dnw` has been called on with the same layers. `bake_dnw`
removes the parametrizations and leaves exact zeros in plain `<layer>.weight` tensors: the checkpoint format,
and what the MicroNet counter charges (nonzeros plus a 1-bit mask per element).

Kept count per layer: `numel - int((1 - density) * numel)`, DNW's training code (`ChooseTopEdges` zeroes the
`int(prune_rate * numel)` smallest), so the weights trained are the weights counted. DNW's profiler used
`int(density * numel)`, one fewer in layers where `density * numel` is not an integer (e.g. 410 vs 409 of
4,096); its reported 2,558,732 parameters follow the profiler, the model it evaluated follows the former.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from micronet.compression import check_layer_names
from micronet.errors import MicronetError

SPARSE_TYPES = (nn.Conv2d, nn.Linear)  # BatchNorm and biases stay dense


def kept_count(numel: int, density: float) -> int:
    """Weights a layer keeps: DNW's `numel - int(prune_rate * numel)` with prune_rate = 1 - density."""
    return numel - int((1.0 - density) * numel)


class TopKStraightThrough(torch.autograd.Function):
    """Forward: `weight` with all but its `k` largest |w| set to zero. Backward: the gradient unchanged, to
    every weight (DNW's ChooseTopEdges)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, k: int) -> torch.Tensor:
        flat = weight.detach().abs().flatten()
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.topk(k, sorted=False).indices] = True
        return weight.masked_fill(~keep.view_as(weight), 0.0)  # +0.0, exact

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_output, None


class DnwTopK(nn.Module):
    """The parametrization: weight -> its per-layer top-k by magnitude, recomputed on every forward."""

    def __init__(self, density: float) -> None:
        super().__init__()
        if not 0.0 < density <= 1.0:
            raise MicronetError(f"DNW density must be in (0, 1], got {density}")
        self.density = float(density)  # an attribute, not a buffer: the state_dict gains no keys

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return TopKStraightThrough.apply(weight, kept_count(weight.numel(), self.density))

    def extra_repr(self) -> str:
        return f"density={self.density}"


def _dnw_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name: m
        for name, m in model.named_modules()
        if parametrize.is_parametrized(m, "weight") and any(isinstance(p, DnwTopK) for p in m.parametrizations.weight)
    }


def apply_dnw(model: nn.Module, density: float, exclude: list[str] = ()) -> list[str]:
    """Make every Conv2d/Linear weight except the `exclude` layers DNW-sparse at `density`; returns the
    names of the layers made sparse. Call it before the optimizer is built and before a resume file is
    loaded (its keys are the parametrized ones)."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, SPARSE_TYPES)}
    check_layer_names(exclude, layers, "train.dnw.exclude", kind="conv/linear layer")
    if _dnw_layers(model):
        raise MicronetError("apply_dnw: the model is already DNW-sparse (bake_dnw it first to re-apply)")
    sparse = [name for name in layers if name not in exclude]
    for name in sparse:
        parametrize.register_parametrization(layers[name], "weight", DnwTopK(density))
    return sparse


@torch.no_grad()
def bake_dnw(model: nn.Module) -> list[str]:
    """Replace each DNW parametrization by the weight it produces (exact zeros outside the top-k), in place:
    the state_dict becomes plain `<layer>.weight` keys and the dormant weights are gone. Returns the layers."""
    layers = _dnw_layers(model)
    for m in layers.values():
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return list(layers)


@torch.no_grad()
def density_report(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per conv/linear layer, the weight the forward uses (DNW-masked or baked): numel, nonzero, density."""
    report = {}
    for name, m in model.named_modules():
        if isinstance(m, SPARSE_TYPES):
            w = m.weight
            nonzero = int(torch.count_nonzero(w))
            report[name] = {"numel": w.numel(), "nonzero": nonzero, "density": nonzero / w.numel()}
    return report
