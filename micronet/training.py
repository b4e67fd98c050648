"""The one training loop: every stage that trains or fine-tunes calls `fit`, whatever the recipe. The recipe is data
(micronet.config.OptimConfig) turned into objects by micronet.recipe: optimizer, per-step LR schedule (with SGDR
rounds that restart the optimizer), loss against labels / mixed targets / a teacher, SRIP. The loop adds gradient
clipping, sparsity masks kept exactly zero, bf16 autocast and channels_last, DDP under torchrun, best-on-validation
selection and an atomic per-epoch resume file."""

from __future__ import annotations

import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from contextlib import nullcontext
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm import tqdm

from micronet.checkpoint import atomic_save, load_resume
from micronet import recipe
from micronet.config import DistributedConfig, OptimConfig
from micronet.errors import MicronetError

# ---- processes and devices -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup_runtime(cfg: DistributedConfig) -> Runtime:
    """One process per GPU under torchrun (NCCL), gloo on CPU; a plain process otherwise."""
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise MicronetError("distributed.device is cuda but no CUDA device is visible (set it to auto or cpu)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not under_torchrun():
        return Runtime(torch.device("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ["LOCAL_RANK"])
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if use_cuda else None)
    return Runtime(device, dist.get_rank(), dist.get_world_size())


def teardown_runtime(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


def broadcast_object(obj: Any, runtime: Runtime) -> Any:
    """Rank 0's value on every rank (used to share pruning decisions)."""
    if not runtime.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---- data loading ----------------------------------------------------------------------------------------------


class ShardSampler(Sampler[int]):
    """Each rank evaluates every world_size-th sample, without the padding DistributedSampler adds, so the
    all-reduced counts are exact."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global generators (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(*parts: int) -> int:
    """One 63-bit seed from (seed, epoch[, step]): neighbouring tuples give unrelated streams."""
    high, low = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(high) << 31) ^ int(low)


def start_epoch_randomness(loader: Any, seed: int, epoch: int) -> None:
    """Make epoch `epoch` a function of (seed, epoch) alone, so a resumed run replays exactly what an uninterrupted
    one does: the global generators (augmentation on the main process, ShakeDrop, mixup, SRIP), the shuffle and the
    seeds of this epoch's DataLoader workers (drawn from the loader's generator) or the GPU loader's draws."""
    epoch_seed = derived_seed(seed, epoch)
    seed_everything(epoch_seed)
    if hasattr(loader, "set_epoch"):  # the GPU-resident loader derives its draws from (seed, epoch, rank)
        loader.set_epoch(epoch)
        return
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(epoch_seed)


KILL_AFTER_BATCHES_ENV = "MICRONET_TEST_SIGKILL_AFTER_BATCHES"
_batches_done = 0


def _test_kill_switch() -> None:
    """Test-only fault injection (tests/test_reliability.py): with MICRONET_TEST_SIGKILL_AFTER_BATCHES=N set, the
    process SIGKILLs itself after its N-th training batch (counted over every `fit` of the process), as `kill -9`
    would, so the tests can resume from a real mid-epoch crash. Unset, it costs one dictionary lookup."""
    global _batches_done
    limit = os.environ.get(KILL_AFTER_BATCHES_ENV)
    if limit is None:
        return
    _batches_done += 1
    if _batches_done >= int(limit):
        os.kill(os.getpid(), signal.SIGKILL)


def make_loader(dataset: Dataset, batch_size: int, runtime: Runtime, *, train: bool, workers: int, seed: int = 0):
    """`batch_size` is global: each of the world_size processes loads its share. Training workers start afresh
    every epoch (not persistent), seeded from the loader's generator, which `start_epoch_randomness` sets."""
    per_rank = max(1, batch_size // runtime.world_size)
    if train:
        sampler = (
            DistributedSampler(dataset, runtime.world_size, runtime.rank, shuffle=True, seed=seed, drop_last=True)
            if runtime.distributed
            else None
        )
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(
            dataset, per_rank, shuffle=sampler is None, sampler=sampler, num_workers=workers, drop_last=True,
            pin_memory=runtime.device.type == "cuda", generator=generator,
        )
    sampler = ShardSampler(len(dataset), runtime.rank, runtime.world_size)
    return DataLoader(dataset, per_rank, sampler=sampler, num_workers=workers, pin_memory=runtime.device.type == "cuda",
                      persistent_workers=workers > 0)  # evaluated every epoch: keep the workers (ImageNet's file list)


# ---- evaluation ---------------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    correct_top1: int
    correct_top5: int
    total: int
    loss_sum: float

    @property
    def top1(self) -> float:
        return self.correct_top1 / self.total if self.total else 0.0

    @property
    def top5(self) -> float:
        return self.correct_top5 / self.total if self.total else 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / self.total if self.total else math.nan


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable, runtime: Runtime, *, logit_scale: float = 1.0, bf16: bool = False,
    channels_last: bool = False,
) -> Evaluation:
    """Top-1/top-5 counts (exact integers, all-reduced across ranks) and the cross-entropy of logit_scale*logits."""
    was_training = model.training
    model.eval()
    stats = torch.zeros(4, dtype=torch.float64, device=runtime.device)
    for images, labels in loader:
        images, labels = images.to(runtime.device, non_blocking=True), labels.to(runtime.device, non_blocking=True)
        if channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(runtime, bf16):
            logits = model(images).float() * logit_scale
        top5 = logits.topk(min(5, logits.size(1)), dim=1).indices
        stats[0] += (top5[:, 0] == labels).sum()
        stats[1] += (top5 == labels[:, None]).any(dim=1).sum()
        stats[2] += labels.numel()
        stats[3] += F.cross_entropy(logits, labels, reduction="sum")
    if runtime.distributed:
        dist.all_reduce(stats)
    model.train(was_training)
    return Evaluation(int(stats[0]), int(stats[1]), int(stats[2]), float(stats[3]))


# ---- the loop ---------------------------------------------------------------------------------------------------


CUBLAS_WORKSPACE = ":4096:8"  # what torch.use_deterministic_algorithms asks of cuBLAS (CUDA >= 10.2)


def configure_numerics(cfg: OptimConfig, runtime: Runtime) -> None:
    """Process-wide numerics for a recipe. precision fp32 on CUDA is fp32: TF32 matmuls and convolutions (on by
    default for cuDNN on Ampere and later) are switched off, as the teams' 2019 GPUs had none. deterministic:
    deterministic algorithms everywhere (cuBLAS needs CUBLAS_WORKSPACE_CONFIG before its first call: the runner
    sets it when the params load; here it is set if still unset)."""
    if runtime.device.type == "cuda" and cfg.precision == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def autocast(runtime: Runtime, bf16: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and runtime.device.type == "cuda" else nullcontext()


def precision_of(cfg: OptimConfig, runtime: Runtime) -> tuple[bool, bool]:
    """(bf16 autocast, channels_last): `auto`/null mean on for CUDA, off on CPU (where fp32 stays bit-for-bit)."""
    cuda = runtime.device.type == "cuda"
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
    if bf16 and not cuda:
        raise MicronetError("precision bf16 needs a CUDA device (set precision: fp32 or auto on CPU)")
    channels_last = cfg.channels_last if cfg.channels_last is not None else cuda
    return bf16, channels_last


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_val_top1: Optional[float] = None  # None without a validation split
    optimizer_state: Optional[dict[str, Any]] = None  # of the kept epoch, when fit(keep_optimizer=True)


EpochCallback = Callable[[dict[str, float]], None]


# Seconds between progress lines when the bar is off (output not a terminal: DVC, CI, `nohup`, a log file), so a
# long epoch shows it is alive; a terminal gets tqdm's bar instead.
PROGRESS_SECONDS = 30.0


class Heartbeat:
    """One progress line every PROGRESS_SECONDS: step, images so far in this process, their rate."""

    def __init__(self, label: str, steps: int, started: float) -> None:
        self.label, self.steps, self.started, self.last = label, steps, started, started

    def tick(self, step: int, images: int) -> None:
        now = time.perf_counter()
        if now - self.last < PROGRESS_SECONDS:
            return
        self.last = now
        tqdm.write(f"{self.label}: step {step}/{self.steps}, {images / max(now - self.started, 1e-9):.0f} images/s")


def fit(
    model: nn.Module,
    train_set: Dataset | Iterable,
    val_set: Optional[Dataset],
    cfg: OptimConfig,
    runtime: Runtime,
    *,
    batch_size: int,
    workers: int = 0,
    seed: int = 0,
    masks: Optional[dict[str, torch.Tensor]] = None,
    teacher: Optional[nn.Module] = None,
    num_classes: Optional[int] = None,
    resume_path: Optional[Path] = None,
    fingerprint: str = "",
    on_epoch: Optional[EpochCallback] = None,
    desc: str = "train",
    optimizer_state: Optional[dict[str, Any]] = None,
    keep_optimizer: bool = False,
) -> FitResult:
    """Train `model` in place for cfg.epochs and leave it at the epoch cfg.select keeps: the best on `val_set`
    (the split the caller selects on: held out of train, or the test split), or the last one (select: last, or
    no `val_set`; `val_set` is then only evaluated for the curves). `train_set` is a Dataset (loaded by
    DataLoader workers) or a ready batch loader with `set_epoch` (the GPU-resident one). `masks` (parameter
    name -> 0/1) keep pruned weights exactly zero; `teacher` supplies soft targets and is never trained or
    wrapped in DDP. `optimizer_state` (a saved state_dict) gives the first optimizer its per-parameter state
    (fastai's moments), the recipe keeps its hyper-parameters; `keep_optimizer` returns the kept epoch's."""
    bf16, channels_last = precision_of(cfg, runtime)
    configure_numerics(cfg, runtime)
    for net in (model, teacher):
        if net is not None:
            net.to(runtime.device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    masks = {k: v.to(runtime.device) for k, v in (masks or {}).items()}
    params = dict(model.named_parameters())
    unknown = set(masks) - set(params)
    if unknown:
        raise MicronetError(f"sparsity masks name parameters the model lacks: {sorted(unknown)[:3]}")

    if isinstance(train_set, Dataset):
        train_loader = make_loader(train_set, batch_size, runtime, train=True, workers=workers, seed=seed)
    else:
        train_loader = train_set
    val_loader = make_loader(val_set, batch_size, runtime, train=False, workers=workers) if val_set else None
    if cfg.select in ("val", "test") and val_loader is None:
        raise MicronetError(f"{desc}: select {cfg.select} needs that split, and none was given (data.val_size 0?)")
    keep_best = val_loader is not None and cfg.select != "last"
    steps = len(train_loader) if cfg.max_steps_per_epoch is None else min(len(train_loader), cfg.max_steps_per_epoch)
    if steps == 0:
        raise MicronetError(f"{desc}: the training split has fewer images than one batch ({batch_size})")
    criterion = recipe.Criterion(cfg.loss, cfg.mixing, num_classes=num_classes, teacher=teacher)
    round_starts = recipe.round_starts(cfg)
    optimizer, scheduler = recipe.start_round(model, cfg, steps, 0)
    if optimizer_state is not None:
        optimizer.load_state_dict({**optimizer.state_dict(), "state": optimizer_state["state"]})
    result = FitResult()
    best_state: Optional[dict[str, torch.Tensor]] = None
    start_epoch = 0

    fields = ("fingerprint", "epoch", "model", "optimizer", "scheduler", "history", "best_epoch", "best_val_top1",
              "best_model")
    if resume_path is not None and (state := load_resume(resume_path, fingerprint, fields)) is not None:
        model.load_state_dict(state["model"])
        start_epoch = state["epoch"] + 1
        optimizer, scheduler = recipe.start_round(model, cfg, steps, start_epoch)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        result = FitResult(state["history"], state["best_epoch"], state["best_val_top1"], state.get("kept_optimizer"))
        best_state = state["best_model"]
        if runtime.is_main:
            tqdm.write(f"{desc}: resuming after epoch {start_epoch} from {resume_path}")

    train_model: nn.Module = model
    if runtime.distributed:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        # static_graph: the same parameters take part in every step, and some never do (KAIST's stride-2 blocks
        # compute no SE), which a plain DDP reducer would wait for forever.
        train_model = DistributedDataParallel(model, device_ids=device_ids, static_graph=True)
    if cfg.compile:
        train_model = torch.compile(train_model)

    for epoch in range(start_epoch, cfg.epochs):
        if epoch in round_starts and epoch > 0:  # SGDR: a fresh optimizer and schedule for every round
            optimizer, scheduler = recipe.start_round(model, cfg, steps, epoch)
        start_epoch_randomness(train_loader, seed, epoch)
        criterion.start_epoch(model)
        train_model.train()
        started = time.perf_counter()
        first_lr = optimizer.param_groups[0]["lr"]
        totals = torch.zeros(3, dtype=torch.float64, device=runtime.device)  # loss sum, correct, seen
        seen = 0  # counted on the host: building a device tensor from it each batch would wait for the GPU
        bar = tqdm(total=steps, desc=f"{desc} {epoch + 1}/{cfg.epochs}", disable=True if not runtime.is_main else None,
                   leave=False, mininterval=1.0)
        heartbeat = Heartbeat(f"{desc} {epoch + 1}/{cfg.epochs}", steps, started) if runtime.is_main and bar.disable \
            else None
        for step, (images, labels) in enumerate(train_loader):
            if step >= steps:
                break
            images, labels = images.to(runtime.device, non_blocking=True), labels.to(runtime.device, non_blocking=True)
            if channels_last and images.dim() == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(runtime, bf16):
                images, targets = criterion.prepare(images, labels)
                logits = train_model(images)
                loss = criterion(logits.float(), labels, targets)
            loss = _optimizer_step(model, loss, cfg, optimizer, masks, params)
            scheduler.step()
            with torch.no_grad():
                totals[0] += loss.detach().double() * labels.numel()
                totals[1] += (logits.argmax(1) == labels).sum()
                seen += labels.numel()
            bar.update(1)
            if heartbeat is not None:
                heartbeat.tick(step + 1, seen)
            _test_kill_switch()
            if not bar.disable and step % 50 == 0:  # reading the loss waits for the GPU: not every batch
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bar.close()
        totals[2] = seen
        if runtime.distributed:
            dist.all_reduce(totals)
        row = {
            "epoch": epoch + 1,
            "lr": first_lr,
            "train_loss": float(totals[0] / totals[2]),
            "train_acc": float(totals[1] / totals[2]),
            "seconds": time.perf_counter() - started,
        }
        if val_loader is not None:
            ev = evaluate(model, val_loader, runtime, logit_scale=cfg.loss.logit_scale, bf16=bf16,
                          channels_last=channels_last)
            row.update(val_loss=ev.loss, val_acc=ev.top1, val_top5=ev.top5)
        score = row.get("val_acc", float(epoch))
        if not keep_best or best_state is None or score > result.best_val_top1:
            result.best_epoch, result.best_val_top1 = epoch + 1, score
            if keep_best:
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            if keep_optimizer:
                result.optimizer_state = _cpu_copy(optimizer.state_dict())
        result.history.append(row)
        if runtime.is_main:
            tqdm.write(f"{desc} epoch {epoch + 1}/{cfg.epochs}: " + ", ".join(
                f"{k} {v:.4g}" for k, v in row.items() if k not in ("epoch",)))
            if resume_path is not None:
                atomic_save(
                    {"fingerprint": fingerprint, "epoch": epoch, "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "history": result.history, "best_epoch": result.best_epoch,
                     "best_val_top1": result.best_val_top1, "best_model": best_state,
                     "kept_optimizer": result.optimizer_state},
                    resume_path,
                )
            if on_epoch is not None:
                on_epoch(row)
        barrier(runtime)

    if best_state is not None:
        model.load_state_dict(best_state)
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    if val_loader is None:
        result.best_val_top1 = None
    elif not result.history:  # nothing trained (epochs: 0): still report where the model stands
        result.best_val_top1 = evaluate(model, val_loader, runtime).top1
    return result


def _optimizer_step(model: nn.Module, loss: torch.Tensor, cfg: OptimConfig, optimizer: torch.optim.Optimizer,
                    masks: dict[str, torch.Tensor], params: dict[str, nn.Parameter]) -> torch.Tensor:
    """Backward and one step with the recipe's SRIP and clipping; masked weights get no gradient and stay zero.
    Returns the loss stepped on (SRIP included)."""
    if cfg.srip:  # outside autocast: W^T W - I is a small deviation from I, which bf16 would round away
        loss = loss + cfg.srip * recipe.srip_penalty(model)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for name, mask in masks.items():
        if params[name].grad is not None:
            params[name].grad.mul_(mask)
    if cfg.grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)
    return loss


def _cpu_copy(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu().clone()
    if isinstance(tree, dict):
        return {k: _cpu_copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_cpu_copy(v) for v in tree]
    return tree


def clear_resume(resume_path: Optional[Path], runtime: Runtime) -> None:
    if runtime.is_main and resume_path is not None:
        resume_path.unlink(missing_ok=True)
