"""Training throughput (images/s) of the one training loop under three data/precision paths, side by side:

  (a) the submissions' loop: DataLoader workers + PIL augmentation, fp32, contiguous NCHW
  (b) workers + bf16 autocast + channels_last
  (c) the GPU-resident loader (batched augmentation on the device) + bf16 + channels_last (+ torch.compile)

plus the data path alone (the loader iterated without a model). Each cell times the second of two epochs of
`--steps` steps through `micronet.training.fit` (the first warms up cuDNN / compile), on synthetic CIFAR-100-format
data with Wave's augmentation (pad-4 crop + flip + cutout) unless --faa adds Fast AutoAugment.

On CUDA it runs the real networks (PyramidNet-272, KAIST MicroNet v1, WRN-22-6, EfficientNet-ex; DNW's sparse
ResNet-50 on synthetic ImageNet JPEGs at 224, whose data stays on workers: the GPU loader is CIFAR-only) at batch
256; on a CPU a small configuration (thin networks, ResNet-50 at 32 px, batch 32, bf16 columns fall back to fp32)
so it runs everywhere. `make gpu-check` (bench/gpu_check.py) runs the same cells and records them.

    python bench/bench_train.py [--steps 20] [--batch 256] [--workers 8] [--compile] [--faa]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from micronet import runner  # noqa: E402
from micronet.compression.dnw import apply_dnw  # noqa: E402
from micronet.config import OptimConfig, Params  # noqa: E402
from micronet.data import num_classes, write_synthetic_cifar100, write_synthetic_imagenet  # noqa: E402
from micronet.nets import create_model  # noqa: E402
from micronet.training import Runtime, fit, make_loader  # noqa: E402

@dataclass(frozen=True)
class Net:
    """A benchmarked network: registry name and arguments, the data it trains on (CIFAR 32x32, or ImageNet
    JPEGs decoded and random-resized-cropped to `image_size`), and DNW's top-k density if it trains sparse."""

    arch: str
    args: dict = field(default_factory=dict)
    imagenet: bool = False
    dnw: Optional[float] = None


GPU_NETS = {
    "pyramidnet272": Net("pyramidnet272"), "kaist_micronet_v1": Net("kaist_micronet_v1"),
    "fastai_wrn22_6": Net("fastai_wrn22_6"), "efficientnet_ex": Net("efficientnet_ex"),
    "resnet50_dnw@224": Net("resnet50_dnw", imagenet=True, dnw=0.1),
}
CPU_NETS = {
    "pyramidnet": Net("pyramidnet", {"depth": 11, "alpha": 24}), "kaist_micronet_v1": Net("kaist_micronet_v1"),
    "fastai_wrn": Net("fastai_wrn", {"n": 1, "k": 2}),
    "efficientnet_cifar": Net("efficientnet_cifar", {"width": 0.2, "depth": 0.3}),
    "resnet50_dnw@32": Net("resnet50_dnw", {"num_classes": 10}, imagenet=True, dnw=0.1),
}


def paths(bf16: bool, compile_: bool) -> dict[str, tuple[str, str, bool, bool]]:
    """Name -> (data.loader, precision, channels_last, compile) of the three paths; fp32 where bf16 is off (CPU)."""
    low = "bf16" if bf16 else "fp32"
    return {
        "(a) workers, fp32": ("workers", "fp32", False, False),
        "(b) workers, bf16, channels_last": ("workers", low, True, False),
        f"(c) gpu loader, bf16, channels_last{', compile' if compile_ else ''}": ("gpu", low, True, compile_),
    }


def write_data(root: Path, n_train: int, image_size: int) -> None:
    """Synthetic CIFAR-100 at root/cifar and a synthetic ImageNet (10 classes, JPEGs) at root/imagenet."""
    write_synthetic_cifar100(root / "cifar", n_train, 100, seed=0)
    write_synthetic_imagenet(root / "imagenet", 10, -(-n_train // 10), 1, image_size + image_size // 7, seed=0)


def params_for(root: Path, loader: str, batch: int, workers: int, faa: bool, net: Net = Net("any"),
               image_size: int = 224) -> Params:
    """The data section of a path for a net; ImageNet has no GPU-resident loader, so it stays on workers."""
    if net.imagenet:
        data = {"dataset": "imagenet", "root": str(root / "imagenet"), "loader": "workers", "image_size": image_size,
                "augment": {"random_resized_crop": {}, "crop_padding": 0, "hflip": True, "cutout": 0}}
    else:
        data = {"root": str(root / "cifar"), "loader": loader,
                "augment": {"autoaugment": "fa_shake26_2x96d_cifar100" if faa else None, "crop_padding": 4,
                            "hflip": True, "cutout": 16}}
    return Params.model_validate({
        "data": {**data, "val_size": 0, "batch_size": batch, "workers": workers},
        "tracking": {"enabled": False},
    })


def build(net: Net) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(net.arch, **net.args)
    if net.dnw is not None:  # as the train stage does for train.dnw
        apply_dnw(model, net.dnw, exclude=["conv1"])
    return model


def throughput(net: Net, params: Params, recipe: OptimConfig, runtime: Runtime) -> float:
    """Images/s of the second of recipe.epochs epochs of `fit` (the first warms up cuDNN / compile)."""
    model = build(net)
    _, train = runner.training_data(params, recipe, runtime, seed=0)
    result = fit(model, train, None, recipe, runtime, batch_size=params.data.batch_size,
                 workers=params.data.workers, num_classes=num_classes(params.data))
    images = recipe.max_steps_per_epoch * params.data.batch_size
    return images / result.history[-1]["seconds"]


def recipe_for(path: tuple[str, str, bool, bool], steps: int) -> OptimConfig:
    _, precision, channels_last, compile_ = path
    return OptimConfig(epochs=2, lr=0.05, max_steps_per_epoch=steps, precision=precision,
                       channels_last=channels_last, compile=compile_)


def cell(net: Net, path: tuple[str, str, bool, bool], root: Path, runtime: Runtime, *, batch: int, workers: int,
         steps: int, faa: bool = False, image_size: int = 224) -> dict[str, Optional[float]]:
    """One table cell: images/s of `net` on `path`, and the peak device memory it took (GiB, CUDA only)."""
    params = params_for(root, path[0], batch, workers, faa, net, image_size)
    cuda = runtime.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    rate = throughput(net, params, recipe_for(path, steps), runtime)
    return {"images_s": rate, "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def loader_only(params: Params, recipe: OptimConfig, runtime: Runtime, steps: int) -> float:
    splits, train = runner.training_data(params, recipe, runtime, seed=0)
    loader = train if not isinstance(train, torch.utils.data.Dataset) else make_loader(
        train, params.data.batch_size, runtime, train=True, workers=params.data.workers)
    for _ in range(2):
        started, seen = time.perf_counter(), 0
        for step, (images, _) in enumerate(loader):
            images = images.to(runtime.device, non_blocking=True)
            seen += len(images)
            if step + 1 >= steps:
                break
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
    return seen / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="steps per timed epoch")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="(c) with torch.compile")
    parser.add_argument("--faa", action="store_true", help="Fast AutoAugment in every CIFAR path")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    runtime = Runtime(torch.device("cuda" if cuda else "cpu"))
    steps = args.steps or (20 if cuda else 4)
    batch = args.batch or (256 if cuda else 32)
    workers = args.workers if args.workers is not None else (8 if cuda else 2)
    nets = GPU_NETS if cuda else CPU_NETS
    image_size = 224 if cuda else 32
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device}; batch {batch}, {steps} timed steps, {workers} workers, "
          f"{'FAA + ' if args.faa else ''}crop/flip/cutout; ImageNet nets: JPEG decode + random-resized crop "
          f"to {image_size} on workers in every path{'' if cuda else '; bf16 needs CUDA: fp32 here'}")
    with tempfile.TemporaryDirectory() as tmp:
        write_data(Path(tmp), max(steps * batch * 2, 2000), image_size)
        rows = []
        for name, path in paths(cuda, args.compile).items():
            params = params_for(Path(tmp), path[0], batch, workers, args.faa)
            cells = {"data path alone": loader_only(params, recipe_for(path, steps), runtime, steps)}
            for label, net in nets.items():
                measured = cell(net, path, Path(tmp), runtime, batch=batch, workers=workers, steps=steps,
                                faa=args.faa, image_size=image_size)
                cells[label] = measured["images_s"]
                if cuda:
                    cells[f"{label} GiB"] = measured["peak_gib"]
            rows.append((name, cells))
    columns = list(rows[0][1])
    width = max(len(name) for name, _ in rows)
    print(f"{'images/s':<{width}}  " + "  ".join(f"{c:>20}" for c in columns))
    for name, cells in rows:
        print(f"{name:<{width}}  " + "  ".join(f"{cells[c]:>20,.1f}" for c in columns))
    base = rows[0][1]
    for name, cells in rows[1:]:
        ratios = "  ".join(f"{c} x{cells[c] / base[c]:.2f}" for c in columns if not c.endswith("GiB"))
        print(f"ratio to (a), {name.split()[0]}: {ratios}")


if __name__ == "__main__":
    main()
