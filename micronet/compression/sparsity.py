"""Unstructured sparsity: one global magnitude threshold over conv and linear weights (Wave and KAIST both
pruned this way), reached in steps; masks keep pruned weights exactly zero through fine-tuning."""

from __future__ import annotations

import torch
import torch.nn as nn

from micronet.compression import check_layer_names

Masks = dict[str, torch.Tensor]  # parameter name -> {0, 1} tensor of the weight's shape


def prunable_weights(model: nn.Module, exclude: list[str] = ()) -> dict[str, nn.Parameter]:
    """Weights of every Conv2d and Linear, minus the excluded modules and all inside them (e.g. the first conv,
    which after low-rank pruning is three convs under the same name)."""
    check_layer_names(exclude, [name for name, _ in model.named_modules()][1:], "sparsify.exclude")
    return {
        f"{name}.weight": m.weight
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not any(name == e or name.startswith(e + ".") for e in exclude)
    }


def step_rates(rate: float, steps: int, schedule: str = "geometric", min_rate: float = 0.0) -> list[float]:
    """Rate after each step. geometric (Wave): each step removes the same fraction of what remains,
    1-(1-r)^(k/n). linear (KAIST's iterative pruning): r_k = min*(n-k)/n + max*k/n for k = 1..n, e.g.
    0 -> 0.6 in 4 rounds gives 0.15, 0.30, 0.45, 0.60."""
    if schedule == "linear":
        return [min_rate * (steps - k) / steps + rate * k / steps for k in range(1, steps + 1)]
    return [1.0 - (1.0 - rate) ** ((k + 1) / steps) for k in range(steps)]


@torch.no_grad()
def global_magnitude_masks(weights: dict[str, torch.Tensor], rate: float) -> Masks:
    """Zero the `rate` fraction of all listed weights with the smallest |w| (ties broken by order, so the
    count is exact); already-zero weights count towards the rate."""
    flat = torch.cat([w.detach().abs().flatten().float().cpu() for w in weights.values()])
    n_zero = int(round(rate * flat.numel()))
    keep = torch.ones_like(flat, dtype=torch.bool)
    if n_zero:
        keep[torch.argsort(flat, stable=True)[:n_zero]] = False
    masks, offset = {}, 0
    for name, w in weights.items():
        masks[name] = keep[offset : offset + w.numel()].reshape(w.shape).to(w.device, w.dtype)
        offset += w.numel()
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask)


def masks_from_zeros(model: nn.Module, names: list[str]) -> Masks:
    """Masks implied by a checkpoint's exact zeros (how a sparse model is reloaded)."""
    params = dict(model.named_parameters())
    return {name: (params[name] != 0).to(params[name].dtype) for name in names}


def sparsity_report(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per conv/linear weight: size, zeros and zero fraction."""
    report = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight.detach()
            zeros = int((w == 0).sum())
            report[name] = {"numel": w.numel(), "zeros": zeros, "sparsity": zeros / w.numel()}
    return report


def overall_sparsity(report: dict[str, dict[str, float]]) -> float:
    numel = sum(r["numel"] for r in report.values())
    return sum(r["zeros"] for r in report.values()) / numel if numel else 0.0
