"""Structured pruning: physically remove channels with Torch-Pruning's dependency graph, so coupled layers
(conv -> BN -> conv, grouped and depthwise convs, residual adds) shrink together.

Layers that write into a residual stream whose shortcut is parameter-free (PyramidNet's zero-padded
channels, identity adds) are kept: their channel index is shared with the shortcut in a way the dependency
graph does not model. Everything between them (the bottleneck widths) is pruned."""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
import torch_pruning as tp

from micronet.compression import count_parameters
from micronet.errors import MicronetError

LossFn = Callable[[nn.Module], torch.Tensor]


def make_importance(criterion: str) -> tp.importance.Importance:
    if criterion == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if criterion == "taylor":
        return tp.importance.GroupTaylorImportance()
    if criterion == "hessian":
        return tp.importance.GroupHessianImportance()
    raise MicronetError(f"unknown pruning criterion {criterion!r} (magnitude, taylor, hessian)")


def residual_writers(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """Convs/linears whose output reaches an addition or the classifier input without passing another
    conv/linear: pruning their outputs would misalign a parameter-free shortcut. Found by tracing once."""
    producers: dict[int, nn.Module] = {}
    writers: list[nn.Module] = []
    alive: list[torch.Tensor] = []  # keeps traced tensors alive so their ids are never reused

    def remember(module: nn.Module, _inputs, output) -> None:
        alive.append(output)
        producers[id(output)] = module

    def pass_on(_module: nn.Module, inputs, output) -> None:
        alive.append(output)
        producers[id(output)] = producers.get(id(inputs[0]))

    layers = (nn.Conv2d, nn.Linear)
    hooks = [m.register_forward_hook(remember) for m in model.modules() if isinstance(m, layers)]
    hooks += [
        m.register_forward_hook(pass_on)
        for m in model.modules()
        if not isinstance(m, layers) and not list(m.children())
    ]

    class AddWatcher(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            alive.append(out)
            if func in (torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__iadd__, torch.Tensor.add_):
                for a in args[:2]:
                    if isinstance(a, torch.Tensor) and producers.get(id(a)) is not None:
                        writers.append(producers[id(a)])
            elif isinstance(out, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
                # Activations, scaling and channel padding pass the producer on.
                if out.dim() == args[0].dim() and id(out) not in producers:
                    producers[id(out)] = producers.get(id(args[0]))
            return out

    model.eval()
    try:
        with torch.no_grad(), AddWatcher():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    unique: list[nn.Module] = []
    for w in writers:
        if all(w is not u for u in unique):
            unique.append(w)
    return unique


def _classifier(model: nn.Module) -> list[nn.Module]:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


def prune_to_rate(
    model: nn.Module,
    example: torch.Tensor,
    target_rate: float,
    params_before: int,
    *,
    criterion: str = "taylor",
    loss_fn: Optional[LossFn] = None,
    global_pruning: bool = True,
    max_layer_rate: float = 0.9,
    round_to: Optional[int] = None,
    ignored: Iterable[nn.Module] = (),
    granularity: int = 200,
) -> float:
    """Remove channels until 1 - params/params_before >= target_rate, in small increments so the result
    lands close to the target. Returns the rate reached."""
    rate = 1.0 - count_parameters(model) / params_before
    if rate >= target_rate:
        return rate
    importance = make_importance(criterion)
    ignored = list(ignored) + _classifier(model) + residual_writers(model, example)
    pruner = tp.pruner.BasePruner(
        model,
        example,
        importance=importance,
        global_pruning=global_pruning,
        pruning_ratio=max_layer_rate,
        max_pruning_ratio=max_layer_rate,
        iterative_steps=granularity,
        ignored_layers=ignored,
        round_to=round_to,
    )
    if criterion in ("taylor", "hessian"):
        if loss_fn is None:
            raise MicronetError(f"prune.criterion {criterion} needs data to score channels")
        # Scored once per call: Torch-Pruning slices .grad together with the weights, so the scores stay
        # aligned with the surviving channels through every increment below.
        _score_with_gradients(model, importance, loss_fn)
    try:
        for _ in range(granularity):
            pruner.step()
            rate = 1.0 - count_parameters(model) / params_before
            if rate >= target_rate:
                break
    finally:
        model.zero_grad(set_to_none=True)
    return rate


def _score_with_gradients(model: nn.Module, importance: tp.importance.Importance, loss_fn: LossFn) -> None:
    """Taylor: the batch gradient. Hessian (OBD): the mean squared per-sample gradient, accumulated here
    because Torch-Pruning 1.6.1's accumulate_grad keeps only the last sample (it tests names against a
    dict keyed by parameters)."""
    model.zero_grad(set_to_none=True)
    if not isinstance(importance, tp.importance.GroupHessianImportance):
        loss_fn(model, per_sample=False).backward()
        return
    squares: dict[nn.Parameter, torch.Tensor] = {}
    samples = 0
    for loss in loss_fn(model, per_sample=True):
        model.zero_grad(set_to_none=True)
        loss.backward()
        samples += 1
        for p in model.parameters():
            if p.grad is not None:
                squares[p] = squares.get(p, 0) + p.grad.detach().pow(2)
    importance.zero_grad()
    importance._accu_grad = squares
    importance._counter = {p: samples for p in squares}
