"""Parameters: one pydantic model per params.yaml section; unknown keys and out-of-range values are errors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import (
    BaseModel, ConfigDict, Field, PositiveFloat, PrivateAttr, ValidationError, field_validator, model_validator,
)

from micronet.errors import MicronetError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # lr: .inf would train to NaN


class ResizedCropConfig(Section):
    """torchvision's RandomResizedCrop: a random area fraction and aspect ratio, resized to the image size."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)


class AugmentConfig(Section):
    """Training-time augmentation of one copy of the training set, in this order: Fast AutoAugment (PIL) ->
    colour jitter -> random-resized crop or padded crop -> flip -> affine (rotate, zoom, warp) -> tensor ->
    normalize -> cutout. Wave's order is FAA -> crop -> flip -> normalize -> cutout."""

    autoaugment: Optional[str] = Field(None, description="Fast AutoAugment policy name, or null for none")
    crop_padding: int = Field(4, ge=0, le=64, description="padded random crop back to the image size; 0 = off")
    crop_fill: int = Field(0, ge=0, le=255, description="constant fill of the padded border (KAIST: 128)")
    crop_padding_mode: Literal["constant", "reflect"] = "constant"
    random_resized_crop: Optional[ResizedCropConfig] = Field(None, description="replaces the padded crop")
    hflip: bool = True
    rotate: float = Field(0.0, ge=0, le=180, description="max rotation in degrees (fastai: 10)")
    zoom: float = Field(1.0, ge=1.0, le=4.0, description="max zoom factor (fastai: 1.1)")
    warp: float = Field(0.0, ge=0, lt=1, description="perspective warp magnitude (fastai: 0.2)")
    p_affine: float = Field(0.75, ge=0, le=1, description="probability of each of rotate, zoom, warp")
    brightness: float = Field(0.0, ge=0, le=1, description="colour-jitter brightness strength")
    contrast: float = Field(0.0, ge=0, le=1, description="colour-jitter contrast strength")
    p_lighting: float = Field(1.0, ge=0, le=1, description="probability of the colour jitter (fastai: 0.75)")
    normalize: bool = True
    cutout: int = Field(0, ge=0, le=256, description="side of the zeroed square after normalization; 0 = off")

    @field_validator("autoaugment")
    @classmethod
    def _known_policy(cls, name: Optional[str]) -> Optional[str]:
        from micronet.augment import policy_names

        if name is not None and name not in policy_names():
            raise ValueError(f"unknown Fast AutoAugment policy; choose one of: {', '.join(policy_names())}")
        return name


DIGITS = 1797  # images in scikit-learn's load_digits (micronet.data.digits)
DIGITS_SMALLEST_CLASS = 174  # images of its rarest digit (8): what any k of the 10 classes hold at least, per class


def digits_split_problem(n_train: int, n_test: int, classes: int = 10) -> Optional[str]:
    """Why a digits train/test split of these sizes can't be drawn, or None: one rule for params and the writer."""
    available = DIGITS if classes == 10 else classes * DIGITS_SMALLEST_CLASS
    if not 2 <= classes <= 10:
        return f"digits: classes ({classes}) must be 2 to 10"
    if min(n_train, n_test) < 10 or n_train + n_test > available:
        return (f"digits: train ({n_train}) and test ({n_test}) must be at least 10 each and at most {available} "
                f"together ({classes} classes)")
    return None


class SynthConfig(Section):
    """A stand-in data set in the real on-disk format, for runs without the real data (toy pipelines, tests).
    CIFAR-100: `train`/`test` images, generated (`source: synthetic`), drawn from scikit-learn's digits
    (`source: digits`: real images, 10 classes, 1,797 in all, to show a recipe learns) or a fixed slice of a real
    CIFAR-100 copy (`source: cifar100`: the first `train`/`test` images, in file order, of its first `classes`
    classes). ImageNet: `train`/`test` JPEGs per class (test = the val folder) of `classes` classes, `size` pixels
    square."""

    source: Literal["synthetic", "digits", "cifar100", "digits-folder"] = Field(
        "synthetic", description="cifar100 only. synthetic: generated patterns; digits: scikit-learn's handwritten "
        "digits upscaled to 32x32 (labels 0-9), a seeded stratified train/test split; cifar100: a slice of the real "
        "copy at `copy_of`; digits-folder (`micronet data synth` only): the first `classes` digits as PNG files of "
        "mixed sizes in ImageFolder layout, for data.dataset imagefolder")
    train: int = Field(2000, ge=1)
    test: int = Field(500, ge=1)
    seed: int = 0
    classes: int = Field(10, ge=2, le=1000, description="imagenet, and the cifar100 and digits-folder sources: "
                         "how many classes")
    size: int = Field(64, ge=16, description="imagenet only: side of the written JPEGs")
    copy_of: Optional[str] = Field(None, description="source cifar100: data.root of the real copy to slice")

    @model_validator(mode="after")
    def _source_fits(self) -> "SynthConfig":
        problem = None
        if self.source in ("digits", "digits-folder"):  # digits: all 10 classes, in CIFAR-100's format
            classes = self.classes if self.source == "digits-folder" else 10
            problem = digits_split_problem(self.train, self.test, classes)
        if self.source == "cifar100" and (self.copy_of is None or self.classes > 100):
            problem = "source cifar100 needs copy_of (the real copy's data.root) and at most 100 classes"
        if problem:
            raise ValueError(problem)
        return self


class DataConfig(Section):
    dataset: Literal["cifar100", "imagenet", "imagefolder"] = Field(
        "cifar100", description="imagefolder: your own images, root/train/<class>/*, root/val/<class>/* (val = the "
        "test split), any size and class count, brought to data.image_size square as they are read")
    root: str = "data/cifar100"
    download: bool = False
    synthetic: Optional[SynthConfig] = Field(
        None, description="write a synthetic data set of this size at `root` when it holds none (toy runs)"
    )
    val_size: int = Field(5000, ge=0)
    split_seed: int = 0
    batch_size: int = Field(128, ge=1, description="global batch size, split across processes")
    eval_batch_size: int = Field(256, ge=1)
    workers: int = Field(4, ge=0)
    loader: Literal["workers", "gpu"] = Field(
        "workers", description="workers: DataLoader processes (PIL); gpu: uint8 data on the GPU, batched augmentation"
    )
    augment: AugmentConfig = AugmentConfig()
    copies: list[AugmentConfig] = Field(
        default_factory=list,
        description="the training set repeated once per entry, each copy with its own augmentation "
        "(KAIST: 4 FAA policies, UCI: 3 lists); an epoch is one pass over all copies. Empty: one copy, `augment`",
    )
    mean: Optional[tuple[float, float, float]] = Field(None, description="normalization; null = the dataset's")
    std: Optional[tuple[PositiveFloat, PositiveFloat, PositiveFloat]] = Field(
        None, description="normalization (each > 0: the inputs are divided by it); null = the dataset's")
    image_size: Optional[int] = Field(None, ge=8, description="training crop / evaluation size; null = dataset's")
    eval_resize: Optional[int] = Field(None, ge=8, description="imagenet: resize before the centre crop")

    @model_validator(mode="after")
    def _gpu_loader_is_for_cifar(self) -> "DataConfig":
        if self.loader == "gpu" and self.dataset != "cifar100":
            raise ValueError("data.loader gpu keeps CIFAR-size data on the device; use workers for imagenet")
        if self.synthetic is not None and self.synthetic.source == "digits" and self.dataset != "cifar100":
            raise ValueError("data.synthetic.source digits writes CIFAR-100's format; imagenet takes synthetic only")
        if self.synthetic is not None and self.synthetic.source == "digits-folder":
            raise ValueError("data.synthetic.source digits-folder is written by `micronet data synth --source "
                             "digits-folder` (a data stage), not by data.synthetic; use digits here")
        if self.dataset == "imagefolder" and self.image_size is None:
            raise ValueError("data.dataset imagefolder needs data.image_size: the side every image is brought to "
                             "(32 for the CIFAR nets, 224 for ResNet-50)")
        if self.dataset == "imagefolder" and self.synthetic is not None:
            raise ValueError("data.synthetic writes CIFAR-100 or ImageNet; an imagefolder is read as it is (for a "
                             "toy one: `micronet data synth --source digits-folder`), so remove data.synthetic")
        return self


class ModelConfig(Section):
    arch: str = Field(..., description="registered architecture name (micronet.nets.list_models())")
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the builder")

    @model_validator(mode="after")
    def _builder_accepts_args(self) -> "ModelConfig":
        from micronet import nets

        if self.arch not in nets.list_models():
            raise ValueError(f"arch {self.arch!r} is not registered; choose one of: {', '.join(nets.list_models())}")
        try:
            nets.validate_args(self.arch, self.args)  # names, types and ranges of the builder's signature
        except MicronetError as exc:
            raise ValueError(str(exc)) from None
        return self


class ScheduleConfig(Section):
    """Learning-rate multiplier of `lr`. Per epoch (as the submissions' schedulers) except one-cycle, which
    moves every step as torch's OneCycleLR does."""

    kind: Literal["constant", "step", "cosine", "pyramid", "sgdr", "onecycle", "table"] = "constant"
    milestones: list[float] = Field(default_factory=list, description="step: fractions of the epochs")
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: int = Field(0, ge=0, description="linear warmup (e+1)/W before the schedule")
    eta_min: float = Field(0.0, ge=0, description="cosine/sgdr: the floor, an absolute learning rate")
    rounds: int = Field(1, ge=1, description="sgdr: cosine rounds, each with a fresh optimizer (KAIST: 4)")
    pct_start: float = Field(0.3, gt=0, lt=1, description="onecycle: share of steps rising to lr")
    div_factor: float = Field(25.0, gt=1, description="onecycle: starts at lr / div_factor")
    final_div_factor: float = Field(1e4, gt=1, description="onecycle: ends at lr / div_factor / final_div_factor")
    momentum_range: Optional[tuple[float, float]] = Field(
        (0.85, 0.95), description="onecycle: momentum (or Adam beta1) cycles high-low-high; null = fixed"
    )
    table: dict[int, float] = Field(
        default_factory=dict, description="table: first epoch (1-based) -> multiplier, held until the next entry"
    )

    @model_validator(mode="after")
    def _consistent(self) -> "ScheduleConfig":
        if self.kind == "table" and 1 not in self.table:
            raise ValueError("schedule.table must give the multiplier of epoch 1 (e.g. {1: 1.0, 26: 0.1})")
        if self.kind == "onecycle" and self.warmup_epochs:
            raise ValueError("onecycle warms up itself (pct_start); set schedule.warmup_epochs to 0")
        return self


class LossConfig(Section):
    """Cross-entropy against a target distribution: the labels (optionally smoothed, uniformly or by class
    similarity), mixed like the images, or a teacher's softmax; on `logit_scale` * (logits - margin)."""

    label_smoothing: float = Field(0.0, ge=0, lt=1)
    similarity_smoothing: float = Field(
        0.0, ge=0, lt=1, description="KAIST weighted label smoothing: epsilon spread by classifier-row similarity"
    )
    logit_scale: float = Field(1.0, gt=0, description="s: the angle loss scales cos(theta) by 5 (UCI)")
    margin: float = Field(0.0, ge=0, lt=1, description="m subtracted from the target logit before scaling")
    teacher_mode: Literal["eval", "train"] = Field(
        "eval", description="train: the teacher runs with batch statistics, as UCI's code did"
    )


class MixingConfig(Section):
    """Per-batch mixing of images and targets (timm's Mixup): mixup, or CutMix with lambda from the box area."""

    kind: Literal["none", "mixup", "cutmix"] = "none"
    alpha: float = Field(1.0, gt=0, description="lambda ~ Beta(alpha, alpha)")
    per_sample: bool = Field(False, description="one lambda per image (fastai's mixup), not per batch")
    prob: float = Field(1.0, ge=0, le=1, description="probability that a batch is mixed")


class OptimConfig(Section):
    """One training/fine-tuning recipe: optimizer, schedule, loss, mixing, regularizer, precision. Every stage
    that trains calls the one loop with one of these."""

    epochs: int = Field(1, ge=0)
    lr: float = Field(0.1, gt=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd momentum")
    nesterov: bool = True
    betas: tuple[float, float] = Field((0.9, 0.999), description="adamw betas")
    weight_decay: float = Field(5e-4, ge=0, description="sgd: L2 in the gradient; adamw: decoupled (lr * wd)")
    decay_norm_and_bias: bool = Field(True, description="false: no weight decay on BatchNorm parameters and biases")
    schedule: ScheduleConfig = ScheduleConfig()
    grad_clip: Optional[float] = Field(None, gt=0, description="max global grad norm; null = off")
    loss: LossConfig = LossConfig()
    mixing: MixingConfig = MixingConfig()
    srip: float = Field(0.0, ge=0, description="SRIP coefficient on 1x1 convolutions (KAIST: 0.7); 0 = off")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU")
    channels_last: Optional[bool] = Field(None, description="null: on for CUDA, off on CPU")
    compile: bool = Field(False, description="torch.compile the model for this stage (after pruning: per stage)")
    deterministic: bool = Field(
        False, description="torch.use_deterministic_algorithms(True), cudnn.deterministic and a fixed cuBLAS "
        "workspace, so a resumed run is bit-identical on GPU too; slower (no cudnn autotuning, deterministic "
        "kernels), and an op without a deterministic CUDA kernel raises instead of running")
    batch_size: Optional[int] = Field(None, ge=1, description="global batch; null = data.batch_size")
    augment: Optional[AugmentConfig] = Field(None, description="null = data.augment / data.copies")
    max_steps_per_epoch: Optional[int] = Field(None, ge=1, description="cap for smoke runs; null = full epoch")
    select: Optional[Literal["last", "val", "test"]] = Field(
        None, description="the epoch the stage keeps. last: the final one (train on every image: data.val_size 0); "
        "val: the best on the split held out of train; test: the best on the test split, as the teams did (tagged "
        "in MLflow and the report); null: val when data.val_size > 0, else last"
    )

    def selection(self, val_size: int) -> str:
        """`select` with null resolved: val when a validation split is held out, else last."""
        return self.select or ("val" if val_size else "last")

    @model_validator(mode="after")
    def _rounds_divide_epochs(self) -> "OptimConfig":
        rounds = self.schedule.rounds
        if self.schedule.kind == "sgdr" and self.epochs % rounds:
            raise ValueError(f"schedule.rounds ({rounds}) must divide epochs ({self.epochs})")
        return self


class DnwConfig(Section):
    """Discovering Neural Wirings: each layer keeps its top `density` of |w| in every forward; the gradient
    reaches every weight (straight through), so dormant weights can come back."""

    density: float = Field(0.1, gt=0, le=1)
    exclude: list[str] = Field(default_factory=list, description="layers kept dense, e.g. conv1")


class TrainConfig(OptimConfig):
    enabled: bool = True
    seed: int = 0
    model: Optional[ModelConfig] = Field(None, description="the architecture this section trains; null = `model`")
    dnw: Optional[DnwConfig] = Field(None, description="sparse training with DNW; null = dense")
    checkpoint: Optional[str] = Field(
        None, description="micronet checkpoint to start from; with enabled: false it is passed on as is"
    )
    carry_optimizer: bool = Field(
        False, description="fastai's learn.save/load: the checkpoint keeps the optimizer state of the kept epoch, "
        "and training from a `checkpoint` that holds one continues from it (moments, not the recipe)"
    )

    @model_validator(mode="after")
    def _disabled_needs_checkpoint(self) -> "TrainConfig":
        if not self.enabled and not self.checkpoint:
            raise ValueError("train.enabled is false, so train.checkpoint must name the model to pass on")
        return self


class BatchRule(Section):
    """eigendamage: once a step has left the network more than `above` compressed (1 - params/params0, the
    largest reached so far), fine-tuning uses batch `finetune` and later K-FAC passes batch `kfac` (Wave's
    main_prune.py: loaders rebuilt at compression 0, 0.3 and 0.6)."""

    above: float = Field(ge=-1, lt=1)
    finetune: int = Field(ge=1)
    kfac: int = Field(ge=1)


class PruneConfig(Section):
    """Structured pruning. eigendamage (Wave): every conv and the classifier rotated into its K-FAC eigenbasis and
    truncated to low rank, prune steps (step_rate of the eigen-direction saliencies) until one leaves the network
    smaller than it started, then alternating with bring-back steps (Wave's main_prune.py), until `rate`
    (1 - params/params0) is reached. channels: Torch-Pruning removes channels to `rate` in
    `steps` geometric steps with a magnitude/Taylor/Hessian criterion."""

    enabled: bool = True
    method: Literal["eigendamage", "channels"] = "channels"
    rate: float = Field(0.5, ge=0, lt=1, description="target 1 - params_after/params_before")
    steps: int = Field(1, ge=1, description="channels: steps to the rate; eigendamage: most steps (prune + bring-back)")
    max_layer_rate: float = Field(0.9, gt=0, lt=1, description="most of one layer's channels/directions per step")
    finetune: OptimConfig = OptimConfig()
    # channels
    criterion: Literal["magnitude", "taylor", "hessian"] = "taylor"
    importance_batches: int = Field(8, ge=1, description="channels: validation batches for taylor/hessian")
    global_pruning: bool = True
    round_to: Optional[int] = Field(None, ge=1, description="channels: keep channel counts multiples of this")
    # eigendamage
    step_rate: float = Field(0.3, gt=0, lt=1, description="eigendamage: share of all saliency entries removed per step")
    back_ratio: float = Field(0.25, ge=0, lt=1, description="eigendamage: bring back this share of the last prune "
                              "step's deletions in the step after it; 0 = no bring-back steps")
    bring_back_finetune: Optional[OptimConfig] = Field(None, description="fine-tuning after a bring-back step; "
                                                       "null = finetune (Wave: lr 1e-2)")
    min_accuracy: Optional[float] = Field(None, ge=0, le=1, description="eigendamage: a step that leaves validation "
                                          "accuracy below this is undone and pruning stops (Wave: 0.80)")
    kfac_batches: Optional[int] = Field(None, ge=1, description="eigendamage: training batches per K-FAC pass; "
                                        "null = the whole split (Wave)")
    kfac_train_mode: bool = Field(False, description="eigendamage: collect statistics in train mode (BN batch "
                                  "statistics, stochastic ShakeDrop) as Wave did; default eval, the deployed function")
    exclude: list[str] = Field(default_factory=list, description="eigendamage: layers left as they are")
    kfac_batch_size: Optional[int] = Field(None, ge=1, description="eigendamage: batch of the K-FAC passes until a "
                                           "batch_schedule rule applies; null = the fine-tune batch (Wave: 100)")
    batch_schedule: list[BatchRule] = Field(
        default_factory=list, description="eigendamage: per-compression batches [{above, finetune, kfac}], the last "
        "rule whose `above` the largest compression so far exceeds wins (Wave: 0 -> 168/128, 0.3 and 0.6 -> 176/128)")
    back_noise: float = Field(0.01, ge=0, description="eigendamage: a brought-back row/column is the layer's last "
                              "one times (1 + back_noise * U[0, 1)) entrywise (Wave: 1e-2)")
    back_noise_shared: bool = Field(False, description="eigendamage: one draw per layer and side for all its new "
                                    "rows/columns, so they are identical copies (Wave's code); false: a draw per copy")
    negative_compression_epochs: Optional[int] = Field(
        None, ge=0, description="eigendamage: fine-tuning epochs after a step that leaves the network no smaller "
        "than it started (the eigenbases add parameters); null = the recipe's epochs (Wave: 50)")

    @model_validator(mode="after")
    def _one_loader_for_both_finetunings(self) -> "PruneConfig":
        """The stage builds its training data once, from `finetune`: a bring-back recipe may change the optimizer
        side, not what the loader fixes when it is built."""
        if self.bring_back_finetune is not None:
            for key in ("augment", "batch_size", "channels_last"):
                value = getattr(self.bring_back_finetune, key)
                if value is not None and value != getattr(self.finetune, key):
                    raise ValueError(f"prune.bring_back_finetune.{key} differs from prune.finetune.{key}; one loader "
                                     f"serves both fine-tunings: make them equal or leave it out of bring_back_finetune")
        return self


class SparsifyConfig(Section):
    enabled: bool = True
    rate: float = Field(0.5, ge=0, lt=1, description="fraction of prunable conv/linear weights set to zero")
    steps: int = Field(1, ge=1)
    schedule: Literal["geometric", "linear"] = Field(
        "geometric", description="geometric: each step removes the same share of what remains (Wave); "
        "linear: rates rise linearly from min_rate to rate (KAIST)"
    )
    min_rate: float = Field(0.0, ge=0, lt=1, description="linear: the rate the steps start from")
    exclude: list[str] = Field(default_factory=list, description="module names kept dense, e.g. conv1")
    finetune: OptimConfig = OptimConfig()


class QuantizeConfig(Section):
    enabled: bool = True
    weight_bits: int = Field(9, ge=2, le=32, description="weight bits of every conv/linear/BN not in layer_bits")
    layer_bits: dict[str, Annotated[int, Field(ge=2, le=32)]] = Field(
        default_factory=dict, description="weight bits by module name pattern (fnmatch, first match wins), e.g. "
        "{'layers.*.conv2': 12} for KAIST's depthwise convs: they hold few weights, so more bits cost little score"
    )
    exponents: Literal["per_tensor", "per_channel"] = Field(
        "per_tensor", description="power-of-two exponents of conv/linear weights: one per tensor (Wave) or one per "
        "output channel (8 bits each, counted); biases and BN affines keep one per tensor"
    )
    activation_bits: int = Field(12, ge=2, le=32)
    fold_bn: bool = True
    range: Literal["sigmamax", "max"] = "sigmamax"
    weight_sigmas: float = Field(10.0, gt=0, description="sigmamax: |mean| + k*std bounds the weights")
    activation_sigmas: float = Field(18.0, gt=0, description="sigmamax: |mean| + k*std bounds activations")
    calibration_batches: int = Field(20, ge=1)
    momentum: float = Field(0.01, gt=0, le=1, description="EMA factor of calibration statistics")
    activation_points: Literal["every_op", "layers"] = Field(
        "every_op", description="every_op: the input, every leaf module and every residual sum (Wave); "
        "layers: conv, linear, BatchNorm and pool outputs only"
    )
    finetune: Optional[OptimConfig] = Field(
        None, description="quantization-aware fine-tuning after calibration (straight-through rounding, exponents "
        "frozen, sparsity kept), always in fp32; null = post-training quantization only, as every team did"
    )

    @model_validator(mode="after")
    def _finetune_in_fp32(self) -> "QuantizeConfig":
        if self.finetune is not None and self.finetune.precision == "bf16":
            raise ValueError("quantize.finetune.precision bf16 would round the quantized activations to 8 significant "
                             "bits; set fp32 or auto (both train quantization-aware in fp32)")
        return self


class SyntheticSourceConfig(Section):
    """A random KAIST-layout file (their MicroNet_Prune state_dict, masks included) for toy runs and tests."""

    sparsity: float = Field(0.6, ge=0, lt=1, description="global magnitude masks over every conv/linear weight")
    seed: int = 0


class ImportConfig(Section):
    """A released checkpoint as the start of a pipeline (`micronet import --params`)."""

    source: str = Field(..., description="the released file, relative to the params file's folder")
    format: Literal["kaist", "micronet"] = Field("kaist", description="kaist: their .t7 layout; micronet: ours")
    arch: str = Field(..., description="registered architecture the file holds, e.g. kaist_micronet_v1")
    synthetic: Optional[SyntheticSourceConfig] = Field(
        None, description="toy runs: `micronet data synth-kaist` writes a random file of this kind at `source`"
    )


class ScoreConfig(Section):
    task: Literal["cifar100", "imagenet"] = "cifar100"
    freebie: bool = Field(True, description="claim 16-bit params/mults when nothing is quantized")


class DistributedConfig(Section):
    nproc_per_node: int = Field(1, ge=1, description="processes (GPUs) per node; >1 relaunches under torchrun")
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    threads: Optional[int] = Field(None, ge=1, description="torch CPU threads per process; null = default")


class TrackingConfig(Section):
    experiment: str = "micronet"
    pipeline: str = Field("", description="the submission this pipeline reproduces (wave, kaist, fastai-wrn, uci, "
                          "dnw): the report compares it with that team's published figures")
    registered_model: str = Field("", description="the MLflow registered model the score stage adds its model to "
                                  "as a new version; empty: micronet-<pipeline>")
    enabled: bool = True

    @property
    def model_name(self) -> str:
        return self.registered_model or f"micronet-{self.pipeline or self.experiment}"


# Pipelines with several training stages (UCI's teacher chain) give each its own top-level section.
TRAINING_SECTION = re.compile(r"(train|refine)_[a-z0-9_]+")


class Params(Section):
    """The whole params.yaml: validated at once, so a typo in `quantize` fails before training starts."""

    data: DataConfig = DataConfig()
    model: Optional[ModelConfig] = None
    train: TrainConfig = TrainConfig()
    prune: PruneConfig = PruneConfig()
    sparsify: SparsifyConfig = SparsifyConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    score: ScoreConfig = ScoreConfig()
    distributed: DistributedConfig = DistributedConfig()
    tracking: TrackingConfig = TrackingConfig()
    synth: Optional[SynthConfig] = None
    import_: Optional[ImportConfig] = Field(None, alias="import")
    _sections: dict[str, TrainConfig] = PrivateAttr(default_factory=dict)

    def recipes(self) -> dict[str, OptimConfig]:
        """Every recipe a stage trains with, by its key: the training sections and the fine-tunings."""
        found: dict[str, OptimConfig] = {"train": self.train, **self._sections}
        found.update({"prune.finetune": self.prune.finetune, "sparsify.finetune": self.sparsify.finetune})
        if self.prune.bring_back_finetune is not None:
            found["prune.bring_back_finetune"] = self.prune.bring_back_finetune
        if self.quantize.finetune is not None:
            found["quantize.finetune"] = self.quantize.finetune
        return found

    def selection_problems(self) -> list[str]:
        """What `select` cannot do with this data split: `val` needs data.val_size > 0, and EigenDamage's
        min_accuracy needs a split to measure on (the held-out one, or the test split under select: test)."""
        problems = []
        if self.data.val_size == 0:
            problems += [f"key '{key}.select' = 'val': data.val_size is 0, so there is no validation split; set "
                         f"select: last (or test), or data.val_size > 0" for key, recipe in self.recipes().items()
                         if recipe.select == "val"]
            prune = self.prune
            if prune.enabled and prune.method == "eigendamage" and prune.min_accuracy is not None and any(
                    r.select != "test" for k, r in self.recipes().items() if k.startswith("prune.")):
                problems.append("key 'prune.min_accuracy' needs a split to measure on, but data.val_size is 0 and "
                                "prune's fine-tunings do not select on test: set it null, data.val_size > 0 or "
                                "their select: test")
        return problems

    def mixing_batch_problems(self) -> list[str]:
        """mixup/CutMix pair a batch's images (timm), so each process's batch must be even; quantize fine-tunes in
        one process. Switched-off stages are checked too: switching one on should not be the first run to fail."""
        problems = []
        for key, recipe in self.recipes().items():
            if recipe.mixing.kind == "none":
                continue
            processes = 1 if key.startswith("quantize.") else self.distributed.nproc_per_node
            batch = recipe.batch_size or self.data.batch_size
            if max(1, batch // processes) % 2:
                problems.append(f"key '{key}.mixing.kind' = '{recipe.mixing.kind}': mixup/CutMix need an even batch "
                                f"per process, and {batch} over {processes} process(es) is odd: make "
                                f"data.batch_size (or {key}.batch_size) even")
        return problems

    def training(self, section: str = "train") -> TrainConfig:
        """The training section a stage runs: `train`, or an extra one such as `train_b0`."""
        if section == "train":
            return self.train
        if section not in self._sections:
            known = ", ".join(["train", *self._sections])
            raise MicronetError(f"params have no training section {section!r}; they have {known}")
        return self._sections[section]

    def model_for(self, section: str = "train") -> ModelConfig:
        model = self.training(section).model or self.model
        if model is None:
            raise MicronetError(f"neither `{section}.model` nor `model` names the architecture to train")
        return model

    def explicit_sections(self) -> set[str]:
        """Top-level sections written in the file (not defaults)."""
        return set(self.model_fields_set) | set(self._sections)

    def has(self, key: str) -> bool:
        """Whether dotted `key` (`train`, `train.seed`) is written in the file rather than a default."""
        head, *rest = key.split(".")
        if head not in self.explicit_sections():
            return False
        node: Any = self._sections[head] if head in self._sections else getattr(self, head)
        for part in rest:
            if not isinstance(node, BaseModel) or part not in node.model_fields_set:
                return False
            node = getattr(node, part)
        return True

    def as_dict(self) -> dict[str, Any]:
        """Every section, the extra training sections included (what the tracker logs)."""
        return {**self.model_dump(by_alias=True), **{k: v.model_dump() for k, v in self._sections.items()}}


def _describe(error: dict, prefix: str = "") -> str:
    key = ".".join([prefix] * bool(prefix) + [str(p) for p in error["loc"]])
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"unknown key '{key}' (remove it or fix its spelling)"
    if kind == "missing":
        return f"missing key '{key}'"
    message = error["msg"].removeprefix("Value error, ")
    if isinstance(error.get("input"), dict):  # a check across a section's keys: its message names them
        return f"section '{key}': {message}"
    return f"key '{key}' = {error.get('input')!r}: {message}"


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML would keep the last; DVC refuses)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                message = f"key {key!r} given twice (lines {seen[key]} and {line}); keep one"
                raise yaml.constructor.ConstructorError(None, None, message, key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """A YAML file's content; a syntax error or a duplicate key is one MicronetError line with its line number."""
    try:
        return yaml.load(path.read_text(), Loader=UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise MicronetError(f"{path}:{where}: not valid YAML ({problem})") from None


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate a params file; every problem becomes one MicronetError line naming file and key."""
    path = Path(path)
    if not path.is_file():
        raise MicronetError(f"{path}: params file not found (run from the pipeline folder or pass --params)")
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise MicronetError(f"{path}: expected a mapping of sections at top level")
    extra = {k: raw.pop(k) for k in list(raw) if isinstance(k, str) and TRAINING_SECTION.fullmatch(k)}
    problems: list[str] = []
    params: Optional[Params] = None
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        problems += [_describe(e) for e in exc.errors()]
    sections: dict[str, TrainConfig] = {}
    for key, value in extra.items():
        try:
            sections[key] = TrainConfig.model_validate(value if value is not None else {})
        except ValidationError as exc:
            problems += [_describe(e, key) for e in exc.errors()]
    if not problems:
        params._sections = sections
        problems = params.selection_problems() + params.mixing_batch_problems()
    if problems:
        raise MicronetError(f"{path}: {'; '.join(problems)}")
    return params
