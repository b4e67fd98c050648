"""Parameters: one pydantic model per params.yaml section; unknown keys and out-of-range values are errors."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from micronet.errors import MicronetError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AugmentConfig(Section):
    """Training-time augmentation, applied in Wave's order: FAA (PIL) -> crop -> flip -> normalize -> cutout."""

    autoaugment: Optional[str] = Field(None, description="Fast AutoAugment policy name, or null for none")
    crop_padding: int = Field(4, ge=0, le=16)
    hflip: bool = True
    normalize: bool = True
    cutout: int = Field(0, ge=0, le=32, description="side of the zeroed square after normalization; 0 = off")


class DataConfig(Section):
    dataset: Literal["cifar100"] = "cifar100"
    root: str = "data/cifar100"
    download: bool = False
    val_size: int = Field(5000, ge=0)
    split_seed: int = 0
    batch_size: int = Field(128, ge=1, description="global batch size, split across processes")
    eval_batch_size: int = Field(256, ge=1)
    workers: int = Field(4, ge=0)
    augment: AugmentConfig = AugmentConfig()


class ModelConfig(Section):
    arch: str = Field(..., description="registered architecture name (micronet.nets.list_models())")
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the builder")

    @model_validator(mode="after")
    def _builder_accepts_args(self) -> "ModelConfig":
        from micronet import nets

        if self.arch not in nets.list_models():
            raise ValueError(f"unknown arch {self.arch!r}; registered: {', '.join(nets.list_models())}")
        params = inspect.signature(nets.builder(self.arch)).parameters
        unknown = sorted(set(self.args) - set(params))
        if unknown:
            raise ValueError(f"{self.arch} takes no argument(s) {unknown}; it takes {sorted(params)}")
        return self


class ScheduleConfig(Section):
    """Learning-rate multiplier per epoch (set once per epoch, like the submissions' schedulers)."""

    kind: Literal["constant", "step", "cosine", "pyramid"] = "constant"
    milestones: list[float] = Field(default_factory=list, description="step: fractions of the epochs")
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: int = Field(0, ge=0)


class OptimConfig(Section):
    """One fine-tuning/training recipe: SGD (Nesterov optional), schedule, clipping, label smoothing."""

    epochs: int = Field(1, ge=0)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    schedule: ScheduleConfig = ScheduleConfig()
    grad_clip: Optional[float] = Field(None, gt=0, description="max global grad norm; null = off")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    batch_size: Optional[int] = Field(None, ge=1, description="global batch; null = data.batch_size")
    augment: Optional[AugmentConfig] = Field(None, description="null = data.augment")
    max_steps_per_epoch: Optional[int] = Field(None, ge=1, description="cap for smoke runs; null = full epoch")


class TrainConfig(OptimConfig):
    enabled: bool = True
    seed: int = 0
    checkpoint: Optional[str] = Field(
        None, description="micronet checkpoint to start from; with enabled: false it is passed on as is"
    )

    @model_validator(mode="after")
    def _disabled_needs_checkpoint(self) -> "TrainConfig":
        if not self.enabled and not self.checkpoint:
            raise ValueError("train.enabled is false, so train.checkpoint must name the model to pass on")
        return self


class PruneConfig(Section):
    enabled: bool = True
    rate: float = Field(0.5, ge=0, lt=1, description="target 1 - params_after/params_before")
    steps: int = Field(1, ge=1)
    criterion: Literal["magnitude", "taylor", "hessian"] = "taylor"
    importance_batches: int = Field(8, ge=1, description="validation batches for taylor/hessian importance")
    global_pruning: bool = True
    max_layer_rate: float = Field(0.9, gt=0, lt=1, description="most of one layer's channels removed")
    round_to: Optional[int] = Field(None, ge=1, description="keep channel counts multiples of this")
    finetune: OptimConfig = OptimConfig()


class SparsifyConfig(Section):
    enabled: bool = True
    rate: float = Field(0.5, ge=0, lt=1, description="fraction of prunable conv/linear weights set to zero")
    steps: int = Field(1, ge=1)
    exclude: list[str] = Field(default_factory=list, description="module names kept dense, e.g. conv1")
    finetune: OptimConfig = OptimConfig()


class QuantizeConfig(Section):
    enabled: bool = True
    weight_bits: int = Field(9, ge=2, le=32)
    activation_bits: int = Field(12, ge=2, le=32)
    fold_bn: bool = True
    range: Literal["sigmamax", "max"] = "sigmamax"
    weight_sigmas: float = Field(10.0, gt=0, description="sigmamax: |mean| + k*std bounds the weights")
    activation_sigmas: float = Field(18.0, gt=0, description="sigmamax: |mean| + k*std bounds activations")
    calibration_batches: int = Field(20, ge=1)
    momentum: float = Field(0.01, gt=0, le=1, description="EMA factor of calibration statistics")


class ScoreConfig(Section):
    task: Literal["cifar100", "imagenet"] = "cifar100"
    freebie: bool = Field(True, description="claim 16-bit params/mults when nothing is quantized")


class DistributedConfig(Section):
    nproc_per_node: int = Field(1, ge=1, description="processes (GPUs) per node; >1 relaunches under torchrun")
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    threads: Optional[int] = Field(None, ge=1, description="torch CPU threads per process; null = default")


class SynthConfig(Section):
    """Size of the synthetic CIFAR-100 the demo pipeline's data stage writes."""

    train: int = Field(2000, ge=100)
    test: int = Field(500, ge=100)
    seed: int = 0


class TrackingConfig(Section):
    experiment: str = "micronet"
    enabled: bool = True


class Params(Section):
    """The whole params.yaml: validated at once, so a typo in `quantize` fails before training starts."""

    data: DataConfig = DataConfig()
    model: ModelConfig
    train: TrainConfig = TrainConfig()
    prune: PruneConfig = PruneConfig()
    sparsify: SparsifyConfig = SparsifyConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    score: ScoreConfig = ScoreConfig()
    distributed: DistributedConfig = DistributedConfig()
    tracking: TrackingConfig = TrackingConfig()
    synth: Optional[SynthConfig] = None


def _describe(error: dict, raw: Any) -> str:
    key = ".".join(str(p) for p in error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"unknown key '{key}' (remove it or fix its spelling)"
    if kind == "missing":
        return f"missing key '{key}'"
    message = error["msg"].removeprefix("Value error, ")
    return f"key '{key}' = {error.get('input')!r}: {message}"


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate a params file; every problem becomes one MicronetError line naming file and key."""
    path = Path(path)
    if not path.is_file():
        raise MicronetError(f"{path}: params file not found (run from the pipeline folder or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise MicronetError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise MicronetError(f"{path}: expected a mapping of sections at top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_describe(e, raw) for e in exc.errors())
        raise MicronetError(f"{path}: {problems}") from None
