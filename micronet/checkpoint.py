"""Checkpoints as plain data (architecture name + args, factorization and channel plans, state_dict, quantization):
written atomically, read with `weights_only=True`, rebuilt without any pruning code or pickled module."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from micronet.compression.factorized import apply_factorization_plan, factorization_plan
from micronet.compression.quantize import apply_quantization_spec, quantization_spec
from micronet.errors import MicronetError
from micronet.nets import create_model

FORMAT = "micronet-checkpoint/1"


def file_digest(path: Path) -> str:
    """sha256 of a file read in 1 MiB blocks: checkpoints can be larger than one wants in memory twice."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_save(obj: Any, path: Path | str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def safe_load(path: Path | str) -> Any:
    """Load tensors and plain containers only: never unpickles code from an untrusted file."""
    path = Path(path)
    if not path.is_file():
        raise MicronetError(f"{path}: checkpoint not found (run the stage that writes it first, e.g. `dvc repro`)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user-facing problem
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MicronetError(f"{path}: not a readable micronet checkpoint ({first})") from None


# ---- channel plans: the shapes structured pruning left, enough to rebuild the module tree ----------------


def channel_plan(model: nn.Module) -> dict[str, dict[str, int]]:
    """Shape-defining attributes of every conv, linear and batch-norm layer."""
    plan: dict[str, dict[str, int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            plan[name] = {"in_channels": m.in_channels, "out_channels": m.out_channels, "groups": m.groups}
        elif isinstance(m, nn.Linear):
            plan[name] = {"in_features": m.in_features, "out_features": m.out_features}
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            plan[name] = {"num_features": m.num_features}
    return plan


def _resized(m: nn.Module, shape: dict[str, int]) -> nn.Module:
    if isinstance(m, nn.Conv2d):
        if (m.in_channels, m.out_channels, m.groups) == (shape["in_channels"], shape["out_channels"], shape["groups"]):
            return m
        return nn.Conv2d(
            shape["in_channels"], shape["out_channels"], m.kernel_size, m.stride, m.padding, m.dilation,
            shape["groups"], m.bias is not None, m.padding_mode,
        )
    if isinstance(m, nn.Linear):
        if (m.in_features, m.out_features) == (shape["in_features"], shape["out_features"]):
            return m
        return nn.Linear(shape["in_features"], shape["out_features"], m.bias is not None)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        if m.num_features == shape["num_features"]:
            return m
        return type(m)(shape["num_features"], m.eps, m.momentum, m.affine, m.track_running_stats)
    raise MicronetError(f"channel plan names a {type(m).__name__}, which it cannot resize")


def apply_channel_plan(model: nn.Module, plan: dict[str, dict[str, int]]) -> nn.Module:
    """Replace layers whose shape differs from the plan by fresh layers of the planned shape (weights follow
    from load_state_dict)."""
    modules = dict(model.named_modules())
    for name, shape in plan.items():
        if name not in modules:
            raise MicronetError(f"channel plan names layer {name!r}, which this architecture does not have")
        new = _resized(modules[name], shape)
        if new is modules[name]:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, new)
    return model


# ---- whole checkpoints ------------------------------------------------------------------------------------


def make_checkpoint(model: nn.Module, arch: str, args: dict, **extra: Any) -> dict[str, Any]:
    """Everything needed to rebuild `model`: its builder, the factorization and channel plans and the weights
    (on CPU)."""
    return {
        "format": FORMAT,
        "arch": arch,
        "args": dict(args),
        "factorization": factorization_plan(model),
        "channel_plan": channel_plan(model),
        "quantization": quantization_spec(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }


def build_from_checkpoint(ckpt: dict[str, Any], path: Path | str = "checkpoint") -> nn.Module:
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise MicronetError(f"{path}: not a {FORMAT} file")
    model = create_model(ckpt["arch"], **ckpt["args"])
    # Factorized layers first: the channel plan names the convs inside them.
    if ckpt.get("factorization"):
        apply_factorization_plan(model, ckpt["factorization"])
    apply_channel_plan(model, ckpt["channel_plan"])
    if ckpt.get("quantization"):
        apply_quantization_spec(model, ckpt["quantization"])
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise MicronetError(f"{path}: weights do not fit {ckpt['arch']} ({str(exc).splitlines()[0]})") from None
    return model


def load_model(path: Path | str) -> tuple[nn.Module, dict[str, Any]]:
    ckpt = safe_load(path)
    return build_from_checkpoint(ckpt, path), ckpt
