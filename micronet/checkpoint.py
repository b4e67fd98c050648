"""Checkpoints as plain data (architecture name + args, factorization and channel plans, state_dict, quantization):
written atomically, read with `weights_only=True`, rebuilt without any pruning code or pickled module."""

from __future__ import annotations

import errno
import os
import secrets
import pickle
import sys
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Optional

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from micronet.compression.factorized import apply_factorization_plan, factorization_plan
from micronet.compression.quantize import apply_quantization_spec, quantization_spec
from micronet.errors import MicronetError
from micronet.nets import create_model, validate_args
from micronet.paths import file_digest  # noqa: F401  (re-exported: importers and runner take it from here)

FORMAT = "micronet-checkpoint/1"


DISK_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied"}


def disk_error(exc: OSError, path: Path | str) -> MicronetError:
    """A full, read-only or forbidden disk as one line naming the file (the previous outputs stay in place)."""
    why = DISK_ERRORS.get(exc.errno, exc.strerror or type(exc).__name__)
    return MicronetError(f"{exc.filename or path}: cannot write ({why}); the previous outputs are left in place")


def temporary_beside(path: Path) -> Path:
    """A fresh name in the target's folder (same file system, so the rename is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def write_temporary(path: Path, write: Any) -> Path:
    """`write(file)` into a new temporary beside `path`, fsynced; returns its name. Created with open(), so it gets
    the user's umask (mkstemp's would be 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(path)
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_save(obj: Any, path: Path | str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a crash never leaves half a file."""
    path = Path(path)
    try:
        os.replace(write_temporary(path, lambda f: torch.save(obj, f)), path)
    except OSError as exc:
        raise disk_error(exc, path) from None


def safe_load(path: Path | str) -> Any:
    """Load tensors and plain containers only: never unpickles code from an untrusted file."""
    path = Path(path)
    if not path.is_file():
        raise MicronetError(f"{path}: checkpoint not found (run the stage that writes it first, e.g. `dvc repro`)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message goes on to suggest weights_only=False: never for a stranger's file
        raise MicronetError(f"{path}: refused: it pickles objects other than tensors and plain containers, and "
                            f"loading them could run code; re-create it with the stage that writes it") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user-facing problem
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MicronetError(f"{path}: not a readable micronet checkpoint ({first})") from None


def load_resume(path: Path, fingerprint: str, fields: Iterable[str]) -> Optional[dict[str, Any]]:
    """A resume file's state when it belongs to this work (same fingerprint), else None. A corrupt or foreign file
    (unreadable, not a mapping with `fields`) is renamed aside with a one-line warning: the stage then starts from
    the last good state instead of failing on it."""
    if not path.is_file():
        return None
    try:
        state = safe_load(path)
        problem = None if isinstance(state, dict) and set(fields) <= set(state) else "not a micronet resume file"
    except MicronetError as exc:
        state, problem = None, str(exc).removeprefix(f"{path}: ")
    if problem is None:
        return state if state["fingerprint"] == fingerprint else None
    aside = path.with_name(f"{path.name}.corrupt")
    try:
        os.replace(path, aside)
    except FileNotFoundError:  # another process (DDP rank) moved it first and says so
        return None
    print(f"warning: {path}: {problem}; moved it to {aside.name} and starting from the last good state",
          file=sys.stderr)
    return None


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


# ---- the schema: a checkpoint is data, checked before anything is built ---------------------------------

Size = Annotated[int, Field(ge=1)]
Bits = Annotated[int, Field(ge=2, le=32)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


class FactorizedLayer(Strict):
    kind: Literal["conv", "linear"]
    in_channels: Size
    out_channels: Size
    in_rank: Size
    out_rank: Size
    input_bias: bool
    output_bias: bool


class QuantizationSpec(Strict):
    """`weight_bits` is the default width; `layer_weight_bits` the width of every quantized layer (absent in
    checkpoints written before per-layer widths, where every layer has the default)."""

    weight_bits: Bits
    activation_bits: Bits
    folded: list[tuple[str, str]]
    weight_layers: list[str]
    layer_weight_bits: Optional[dict[str, Bits]] = None
    weight_exponents: Literal["per_tensor", "per_channel"] = "per_tensor"
    activation_layers: list[str]


LayerShape = dict[Literal["in_channels", "out_channels", "groups", "in_features", "out_features", "num_features"],
                  Size]


class CheckpointFile(Strict):
    """A micronet checkpoint (FORMAT): builder name and arguments, the plans that reshape the built network, the
    quantization spec and the weights. Extra keys (stage, mlflow_run_id) are provenance."""

    model_config = ConfigDict(extra="allow", arbitrary_types_allowed=True)
    format: Literal["micronet-checkpoint/1"]
    arch: str
    args: dict[str, Any]
    factorization: dict[str, FactorizedLayer] = Field(default_factory=dict)
    channel_plan: dict[str, LayerShape]
    quantization: Optional[QuantizationSpec] = None
    state_dict: dict[str, torch.Tensor]


def validate_checkpoint(ckpt: Any, path: Path | str) -> None:
    """One line naming the file and the first bad field; the builder's own argument ranges included."""
    if not isinstance(ckpt, dict):
        raise MicronetError(f"{path}: not a {FORMAT} file (holds a {type(ckpt).__name__}, not a mapping)")
    try:
        CheckpointFile.model_validate(ckpt)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(map(str, error["loc"]))
        if error["type"] == "missing":
            raise MicronetError(f"{path}: field '{field}' is missing (not a complete {FORMAT} file; re-run the "
                                f"stage that writes it)") from None
        value = repr(error.get("input"))
        value = value if len(value) <= 60 else value[:57] + "..."
        raise MicronetError(f"{path}: field '{field}' = {value}: {error['msg'].lower()}") from None
    try:
        validate_args(ckpt["arch"], ckpt["args"])
    except MicronetError as exc:
        raise MicronetError(f"{path}: field {exc}") from None


def build_from_checkpoint(ckpt: dict[str, Any], path: Path | str = "checkpoint") -> nn.Module:
    validate_checkpoint(ckpt, path)
    try:
        model = create_model(ckpt["arch"], **ckpt["args"])
        # Factorized layers first: the channel plan names the convs inside them.
        if ckpt.get("factorization"):
            apply_factorization_plan(model, ckpt["factorization"])
        apply_channel_plan(model, ckpt["channel_plan"])
        if ckpt.get("quantization"):
            apply_quantization_spec(model, ckpt["quantization"])
    except AttributeError as exc:  # get_submodule: the quantization spec names a layer the network lacks
        raise MicronetError(f"{path}: field 'quantization' names a layer {ckpt['arch']} lacks ({exc})") from None
    except (MicronetError, ValueError) as exc:
        raise MicronetError(f"{path}: {exc}") from None
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise MicronetError(f"{path}: weights do not fit {ckpt['arch']} ({str(exc).splitlines()[0]})") from None
    return model


def load_model(path: Path | str) -> tuple[nn.Module, dict[str, Any]]:
    ckpt = safe_load(path)
    return build_from_checkpoint(ckpt, path), ckpt
