"""The recipe vocabulary the one training loop takes from params (micronet.config.OptimConfig): optimizers, learning-
rate schedules, the loss against labels / mixed targets / a teacher, and the SRIP regularizer. Each maps one
submission's choice onto a well-kept implementation where the semantics match:

- SGD / AdamW from torch (AdamW's decoupled decay, p -= lr * wd * p, is fastai v1's `true_wd`);
- per-epoch schedules as a LambdaLR, set once per epoch like the submissions' schedulers; one-cycle is torch's
  OneCycleLR, stepped per batch like fastai's;
- mixup / CutMix from timm (`Mixup`, per batch or per image; CutMix's lambda recomputed from the clipped box).
  timm mixes each image with the batch in reverse order, KAIST and fastai with a random permutation: the loader
  shuffles, so the pairs are as random;
- the loss is cross-entropy against a target distribution, which equals lambda*CE(y_a) + (1-lambda)*CE(y_b) for
  mixed targets (the form KAIST and fastai wrote) because it is linear in the target.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from micronet.config import LossConfig, MixingConfig, OptimConfig, ScheduleConfig
from micronet.errors import MicronetError

NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)

# ---- optimizers ---------------------------------------------------------------------------------------------


def underlying_name(name: str) -> tuple[str, str]:
    """(owning module path, parameter name) of a parameter, seen through torch.nn.utils.parametrize: QAT's
    `conv.parametrizations.weight.original` is conv's `weight`, `bn.parametrizations.bias.original0` bn's bias."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[-3] == "parametrizations" and parts[-1].startswith("original"):
        return ".".join(parts[:-3]), parts[-2]
    return ".".join(parts[:-1]), parts[-1]


def parameter_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    """One group, or two: with `decay_norm_and_bias` off, normalization parameters and every bias get no weight
    decay. (DNW's code exempted parameters whose name contains 'bn', which missed the downsample BatchNorms.)"""
    if decay_norm_and_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    exempt: set[int] = set()
    for full, p in model.named_parameters():
        owner, name = underlying_name(full)
        module = model.get_submodule(owner) if owner else model
        if isinstance(module, NORMS) or name == "bias":
            exempt.add(id(p))
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) not in exempt], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) in exempt], "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg.weight_decay, cfg.decay_norm_and_bias)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)


# ---- learning-rate schedules ---------------------------------------------------------------------------------


def round_length(cfg: OptimConfig) -> int:
    """Epochs per SGDR round (the whole run for every other schedule)."""
    return cfg.epochs // cfg.schedule.rounds if cfg.schedule.kind == "sgdr" else max(cfg.epochs, 1)


def round_starts(cfg: OptimConfig) -> list[int]:
    """0-based epochs at which a fresh optimizer and schedule begin: KAIST's SGDR rebuilds both every round."""
    if cfg.schedule.kind != "sgdr":
        return [0]
    return list(range(0, cfg.epochs, round_length(cfg)))


def epoch_multiplier(schedule: ScheduleConfig, epoch: int, epochs: int, lr: float) -> float:
    """LR multiplier of 0-based `epoch` for the per-epoch schedules (not one-cycle)."""
    if epoch < schedule.warmup_epochs:
        return (epoch + 1) / schedule.warmup_epochs
    kind = schedule.kind
    if kind == "constant":
        return 1.0
    if kind == "step":
        return schedule.gamma ** sum(epoch >= m * epochs for m in schedule.milestones)
    if kind == "cosine":  # from 1 towards eta_min after the warmup (DNW: 5 warmup epochs, then cosine)
        span = max(1, epochs - schedule.warmup_epochs)
        floor = schedule.eta_min / lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (epoch - schedule.warmup_epochs) / span))
    if kind == "sgdr":  # cosine within each round of epochs/rounds, restarting at 1
        length = epochs // schedule.rounds
        floor = schedule.eta_min / lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (epoch % length) / length))
    if kind == "table":  # UCI's LR_REGIME: the entry of the latest first-epoch <= this epoch (1-based)
        return schedule.table[max(e for e in schedule.table if e <= epoch + 1)]
    if kind == "pyramid":  # Wave's FAA "pyramid" schedule (LambdaLR stepped per epoch)
        return 0.1 ** (epoch // (0.25 * epochs)) * 0.2 ** (epoch // (0.5 * epochs)) * 0.2 ** (
            epoch // (0.625 * epochs)
        ) * 0.2 ** (epoch // (0.75 * epochs))
    raise MicronetError(f"schedule {kind!r} has no per-epoch multiplier")


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int) -> LRScheduler:
    """Stepped once after every optimizer step. Per-epoch kinds change the LR only at epoch boundaries; for
    SGDR the scheduler covers one round (the loop starts a fresh optimizer and scheduler at each round start,
    see `round_starts`), so step s of the round is epoch (round start + s // steps_per_epoch)."""
    schedule = cfg.schedule
    if schedule.kind == "onecycle":
        cycle = schedule.momentum_range is not None
        base, top = schedule.momentum_range or (0.85, 0.95)
        return OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=max(1, cfg.epochs * steps_per_epoch), pct_start=schedule.pct_start,
            div_factor=schedule.div_factor, final_div_factor=schedule.final_div_factor, anneal_strategy="cos",
            cycle_momentum=cycle, base_momentum=base, max_momentum=top,
        )
    offset = 0
    if schedule.kind == "sgdr":
        # Which round this scheduler starts: the optimizer is fresh, so its last_epoch says nothing; the loop
        # sets `round_start` on the scheduler it builds for a later round (0 for the first).
        offset = getattr(optimizer, "round_start", 0)

    def multiplier(step: int) -> float:
        return epoch_multiplier(schedule, offset + step // steps_per_epoch, cfg.epochs, cfg.lr)

    return LambdaLR(optimizer, multiplier)


def start_round(model: nn.Module, cfg: OptimConfig, steps_per_epoch: int, epoch: int
                ) -> tuple[torch.optim.Optimizer, LRScheduler]:
    """A fresh optimizer and schedule beginning at `epoch` (0, or an SGDR round start)."""
    optimizer = make_optimizer(model, cfg)
    optimizer.round_start = epoch - epoch % round_length(cfg) if cfg.schedule.kind == "sgdr" else 0
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    # Resuming mid-round: move the schedule to the first step of `epoch` (no optimizer step has run: hush torch).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for _ in range((epoch - optimizer.round_start) * steps_per_epoch):
            scheduler.step()
    return optimizer, scheduler


# ---- targets and loss ------------------------------------------------------------------------------------------


def classifier_weight(model: nn.Module) -> torch.Tensor:
    """The class rows of the model's last Linear (KAIST's fc)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise MicronetError("loss.similarity_smoothing needs a Linear classifier to measure class similarity")
    return linears[-1].weight


@torch.no_grad()
def class_similarity(weight: torch.Tensor) -> torch.Tensor:
    """KAIST's class similarity: S_ij = |cos(w_i, w_j)| of the classifier rows, each row softmax-normalized over
    j != i, diagonal 0 (rows sum to 1)."""
    w = F.normalize(weight.detach().float(), dim=1)
    cos = (w @ w.t()).abs()
    eye = torch.eye(len(w), dtype=torch.bool, device=w.device)
    return torch.softmax(cos.masked_fill(eye, float("-inf")), dim=1)


def make_mixer(cfg: MixingConfig, num_classes: int):
    """timm's Mixup for mixup or CutMix, producing one-hot mixtures (label smoothing is applied afterwards).
    timm draws lambda and the boxes from numpy's global generator, which seed_everything seeds."""
    if cfg.kind == "none":
        return None
    from timm.data import Mixup

    class BatchedMixup(Mixup):
        """Per-image mixup as one batched op (timm loops over the images in Python: one small kernel per image
        on a GPU). Lambdas, pairing with the flipped batch, targets and the in-place update are timm's."""

        def _mix_elem(self, x: torch.Tensor) -> torch.Tensor:
            if self.cutmix_alpha > 0 or self.cutmix_minmax is not None:
                return super()._mix_elem(x)
            lam, _ = self._params_per_elem(len(x))
            lam = torch.from_numpy(lam).to(x.dtype)
            if x.is_cuda:  # from pinned memory the copy need not wait for the GPU to drain
                lam = lam.pin_memory()
            lam = lam.to(x.device, non_blocking=True).unsqueeze(1)
            weight = lam.view(-1, *[1] * (x.ndim - 1))
            flipped = x.flip(0).mul_(1.0 - weight)
            x.mul_(weight).add_(flipped)
            return lam

    return BatchedMixup(
        mixup_alpha=cfg.alpha if cfg.kind == "mixup" else 0.0, cutmix_alpha=cfg.alpha if cfg.kind == "cutmix" else 0.0,
        prob=cfg.prob, mode="elem" if cfg.per_sample else "batch", correct_lam=True, label_smoothing=0.0,
        num_classes=num_classes,
    )


class Criterion:
    """Turns a batch into a loss. With hard labels and at most uniform label smoothing (the Wave/DNW recipes) it is
    exactly F.cross_entropy(logits, labels, label_smoothing); otherwise cross-entropy against a target
    distribution: one-hot labels, mixed like the images (mixup/CutMix), smoothed uniformly or by KAIST's class
    similarity, or a teacher's softmax(logit_scale * teacher logits) on the same images. The logits enter as
    logit_scale * (logits - margin * target): UCI's angle loss (the model outputs cos theta, s = 5, margin m)."""

    def __init__(self, loss: LossConfig, mixing: MixingConfig, num_classes: Optional[int] = None,
                 teacher: Optional[nn.Module] = None):
        if teacher is not None and (loss.label_smoothing or loss.similarity_smoothing):
            raise MicronetError("a teacher's soft targets replace the labels: set loss.label_smoothing and "
                                "loss.similarity_smoothing to 0")
        self.cfg, self.teacher = loss, teacher
        self.num_classes = num_classes
        self.mixer = make_mixer(mixing, num_classes) if mixing.kind != "none" else None
        if (self.mixer is not None or loss.similarity_smoothing or teacher is not None) and not num_classes:
            raise MicronetError("mixing, similarity smoothing and teachers need the number of classes")
        self.similarity: Optional[torch.Tensor] = None
        if teacher is not None:
            teacher.requires_grad_(False)

    @property
    def hard(self) -> bool:
        """Plain cross-entropy on the labels: the fast path, bit for bit what F.cross_entropy computes."""
        cfg = self.cfg
        return (self.mixer is None and self.teacher is None and not cfg.similarity_smoothing
                and cfg.logit_scale == 1.0 and cfg.margin == 0.0)

    def start_epoch(self, model: nn.Module) -> None:
        """KAIST recomputes the class similarity from the classifier once per epoch."""
        if self.cfg.similarity_smoothing:
            self.similarity = class_similarity(classifier_weight(model))

    def prepare(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(images, target distribution or None for the hard path): mixes the batch and asks the teacher."""
        if self.hard:
            return images, None
        if self.mixer is not None:
            if len(images) % 2:
                raise MicronetError("mixup/CutMix need an even batch per process (timm pairs images)")
            images, targets = self.mixer(images, labels)
        else:
            targets = F.one_hot(labels, self.num_classes).to(images.dtype if images.is_floating_point() else
                                                              torch.float32)
        targets = targets.float()
        if self.teacher is not None:
            self.teacher.train(self.cfg.teacher_mode == "train")
            with torch.no_grad():
                targets = torch.softmax(self.cfg.logit_scale * self.teacher(images).float(), dim=1)
        else:
            targets = self.smooth(targets)
        return images, targets

    def smooth(self, targets: torch.Tensor) -> torch.Tensor:
        """Uniform smoothing (1-e) t + e/K, or KAIST's (1-e) t + e t S: both linear in t, so applying them to a
        mixed target equals mixing the smoothed targets of the two labels."""
        cfg = self.cfg
        if cfg.similarity_smoothing:
            if self.similarity is None:
                raise MicronetError("class similarity not computed: call start_epoch(model) first")
            eps = cfg.similarity_smoothing
            targets = (1 - eps) * targets + eps * targets @ self.similarity.to(targets.device)
        if cfg.label_smoothing:
            targets = (1 - cfg.label_smoothing) * targets + cfg.label_smoothing / targets.shape[1]
        return targets

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor]) -> torch.Tensor:
        if targets is None:
            return F.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing)
        return soft_cross_entropy(logits, targets, self.cfg.logit_scale, self.cfg.margin)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, scale: float = 1.0, margin: float = 0.0
                       ) -> torch.Tensor:
    """mean over the batch of -sum_c t_c log softmax(s * (z - m t))_c."""
    z = scale * (logits - margin * targets) if margin else scale * logits
    return -(targets * F.log_softmax(z, dim=1)).sum(dim=1).mean()


# ---- regularizer -------------------------------------------------------------------------------------------------


def srip_penalty(model: nn.Module, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """SRIP (Bansal et al. 2018) as KAIST's l2_reg_ortho_32bit computes it: for every conv weight with a 1x1 kernel
    (expand, project, shortcut, SE), W as (cout, cin), M = W^T W - I, and its spectral norm estimated by one power
    iteration from a fresh random vector (v = M^T u / |M^T u|, sigma = |M v|, which is their u'^T M v); the
    penalty is the mean over those layers of sigma^2."""
    total: Optional[torch.Tensor] = None
    layers = 0
    for module in model.modules():
        if not isinstance(module, nn.Conv2d) or module.kernel_size != (1, 1):
            continue
        w = module.weight.flatten(1).float()  # (cout, cin)
        m = w.t() @ w - torch.eye(w.shape[1], device=w.device)
        u = torch.randn(w.shape[1], 1, device=w.device, generator=generator)
        v = F.normalize(m.t() @ u, dim=0, eps=1e-12)
        sigma = torch.linalg.vector_norm(m @ v)
        total = sigma**2 if total is None else total + sigma**2
        layers += 1
    if total is None:
        raise MicronetError("train.srip is set but the model has no 1x1 convolution to regularize")
    return total / layers
