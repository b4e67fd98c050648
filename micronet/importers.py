"""Checkpoints of the original submissions, turned into micronet checkpoints so the project's own stages
(score, sparsify, quantize) can take them up.

KAIST (`Kthyeon/KAIST-AI-NeurIPS2019-MicroNet-2nd-place-solution`) saved two layouts, both plain
`torch.save` of tensors that load with `weights_only=True`:
- the shipped pruned models (`micronet_v1_pr_60.t7`, `micronet_v2_pr_{15,30,45,60}.t7`): a bare state_dict of
  `MicroNet_Prune`, whose MaskedConv2d / MaskedLinear layers add a `<layer>.mask` buffer (0/1, the weight's
  shape) beside every >=2-D weight;
- `micronet_main.py`'s output (`micronet_v1.t7`, ...): a dict with `net_init`, `net1`..`net4` (each training
  round's best state_dict; `net4` is the one their pruning and notebooks use) and training curves; the
  ImageNet variant stores `net`.
Their code never wraps the net in DataParallel, but a `module.` prefix on every key is stripped anyway.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from micronet.checkpoint import file_digest, load_model, make_checkpoint, safe_load
from micronet.compression.sparsity import global_magnitude_masks, prunable_weights
from micronet.errors import MicronetError
from micronet.nets import create_model

KAIST_ARCHS = ("kaist_micronet_v1", "kaist_micronet_v2")
KAIST_ENTRIES = ("net4", "net")  # where micronet_main.py puts the final weights (CIFAR-100, ImageNet)
MASK_SUFFIX = ".mask"


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _kaist_state_dict(obj: Any, src: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The state_dict inside one of their files, and the top-level key it came from (None: the file is one)."""
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj), None
    if isinstance(obj, dict):
        for entry in KAIST_ENTRIES:
            if isinstance(obj.get(entry), dict):
                return dict(obj[entry]), entry
        keys = ", ".join(map(str, list(obj)[:8]))
        raise MicronetError(f"{src}: neither a state_dict nor a KAIST training file with "
                            f"{' or '.join(map(repr, KAIST_ENTRIES))} (top-level keys: {keys})")
    raise MicronetError(f"{src}: holds a {type(obj).__name__}, not a KAIST state_dict")


def _apply_masks(state: dict[str, torch.Tensor], src: Path) -> tuple[dict[str, torch.Tensor], int, int]:
    """Fold every `<layer>.mask` into `<layer>.weight` (their forward computes weight * mask) and drop it.

    Returns the weights, the number of masks, and how many weights a mask zeroed that were not zero already
    (0 for the shipped files: they were saved right after `set_masks`)."""
    weights = {k: v for k, v in state.items() if not k.endswith(MASK_SUFFIX)}
    masks = {k: v for k, v in state.items() if k.endswith(MASK_SUFFIX)}
    zeroed = 0
    for key, mask in masks.items():
        weight_key = key[: -len(MASK_SUFFIX)] + ".weight"
        if weight_key not in weights:
            raise MicronetError(f"{src}: mask {key!r} has no weight {weight_key!r} beside it")
        weight = weights[weight_key]
        if _shape(mask) != _shape(weight):
            raise MicronetError(f"{src}: mask {key!r} has shape {_shape(mask)} but {weight_key!r} has "
                                f"{_shape(weight)}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise MicronetError(f"{src}: mask {key!r} holds values other than 0 and 1")
        zeroed += int(((mask == 0) & (weight != 0)).sum())
        weights[weight_key] = weight * mask.to(weight.dtype)
    return weights, len(masks), zeroed


def _check_keys(theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], src: Path, arch: str) -> None:
    """Every key of theirs used and every key of ours filled, shapes equal; else one line on the first problem."""
    problems = []
    for key in ours:
        if key not in theirs:
            problems.append(f"key {key!r} is missing (shape {_shape(ours[key])} in {arch})")
        elif _shape(theirs[key]) != _shape(ours[key]):
            problems.append(f"key {key!r} has shape {_shape(theirs[key])} but {arch} needs {_shape(ours[key])}")
    for key in theirs:
        if key not in ours:
            problems.append(f"key {key!r} (shape {_shape(theirs[key])}) has no place in {arch}")
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise MicronetError(f"{src}: {problems[0]}{more}; is --arch the network this file was trained as?")


def import_kaist(src: Path, arch: str) -> dict[str, Any]:
    """A KAIST .t7 file as a micronet checkpoint of `arch` (kaist_micronet_v1 or kaist_micronet_v2).

    Keys map one to one (the architectures use KAIST's module names); masks are folded into their weights
    and dropped. The class count is read from `linear.weight` (100 for all their CIFAR-100 files)."""
    src = Path(src)
    if arch not in KAIST_ARCHS:
        raise MicronetError(f"--arch {arch!r} is not a KAIST network; choose one of {', '.join(KAIST_ARCHS)}")
    state, entry = _kaist_state_dict(safe_load(src), src)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    state, n_masks, zeroed = _apply_masks(state, src)

    linear = state.get("linear.weight")
    args = {"num_classes": int(linear.shape[0]) if isinstance(linear, torch.Tensor) and linear.dim() == 2 else 100}
    model = create_model(arch, **args)
    _check_keys(state, model.state_dict(), src, arch)
    model.load_state_dict(state, strict=True)

    source = {
        "format": "kaist",
        "file": src.name,
        "sha256": file_digest(src),
        "entry": entry,
        "masks_folded": n_masks,
        "weights_zeroed_by_masks": zeroed,
    }
    return make_checkpoint(model, arch, args, stage="import", source=source)


def import_micronet(src: Path, arch: str) -> dict[str, Any]:
    """A micronet checkpoint (e.g. another pipeline's output) as the start of a pipeline: checked, re-labelled."""
    src = Path(src)
    model, ckpt = load_model(src)
    if ckpt["arch"] != arch:
        raise MicronetError(f"{src}: holds {ckpt['arch']!r}, not the {arch!r} the import arch names")
    source = {"format": "micronet", "file": src.name, "sha256": file_digest(src), "stage": ckpt.get("stage")}
    return make_checkpoint(model, ckpt["arch"], ckpt["args"], stage="import", source=source)


IMPORTERS: dict[str, Callable[[Path, str], dict[str, Any]]] = {"kaist": import_kaist, "micronet": import_micronet}


def import_checkpoint(source: str, src: Path, arch: str) -> dict[str, Any]:
    if source not in IMPORTERS:
        raise MicronetError(f"unknown checkpoint source {source!r}; known: {', '.join(IMPORTERS)}")
    return IMPORTERS[source](src, arch)


# ---- KAIST-layout files without KAIST's release (toy runs, tests) ------------------------------------------


@torch.no_grad()
def randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine terms, so a forward check (or a folded BN) sees every BN."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    return model


@torch.no_grad()
def synthetic_kaist_model(arch: str, rate: float, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A random `arch` as KAIST's pruning leaves it: non-trivial BatchNorm statistics and biases, global magnitude
    masks at `rate` over every conv/linear weight, applied."""
    torch.manual_seed(seed)
    model = randomize_bn(create_model(arch))
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.bias is not None:
            m.bias.uniform_(-0.5, 0.5)
        elif isinstance(m, nn.Linear):  # at its init scale (std 0.01) the global threshold would take it whole
            m.weight.normal_(0.0, 0.1)
            m.bias.uniform_(-0.5, 0.5)
    masks = global_magnitude_masks(prunable_weights(model), rate)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask)
    return model.eval(), masks


def kaist_layout(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`model` saved as their MicroNet_Prune state_dict: each masked layer's `mask` buffer after its parameters."""
    own = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for key, value in own.items():
        state[key] = value.clone()
        layer = key.rsplit(".", 1)[0]
        last = f"{layer}.bias" if f"{layer}.bias" in own else f"{layer}.weight"
        if f"{layer}.weight" in masks and key == last:
            state[f"{layer}.mask"] = masks[f"{layer}.weight"].clone()
    return state
