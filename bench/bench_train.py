"""Training throughput (images/s) of the one training loop under three data/precision paths, side by side:

  (a) the submissions' loop: DataLoader workers + PIL augmentation, fp32, contiguous NCHW
  (b) workers + bf16 autocast + channels_last
  (c) the GPU-resident loader (batched augmentation on the device) + bf16 + channels_last (+ torch.compile)

plus the data path alone (the loader iterated without a model). Each cell times the second of two epochs of
`--steps` steps through `micronet.training.fit` (the first warms up cuDNN / compile), on synthetic CIFAR-100-format
data with Wave's augmentation (pad-4 crop + flip + cutout) unless --faa adds Fast AutoAugment.

On CUDA it runs the real networks (PyramidNet-272, KAIST MicroNet v1, WRN-22-6) at batch 256; on a CPU a small
configuration (thin networks, batch 32, bf16 columns fall back to fp32) so it runs everywhere.

    python bench/bench_train.py [--steps 20] [--batch 256] [--workers 8] [--compile] [--faa]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from micronet import runner  # noqa: E402
from micronet.config import OptimConfig, Params  # noqa: E402
from micronet.data import write_synthetic_cifar100  # noqa: E402
from micronet.nets import create_model  # noqa: E402
from micronet.training import Runtime, fit, make_loader  # noqa: E402

GPU_MODELS = {"pyramidnet272": {}, "kaist_micronet_v1": {}, "fastai_wrn22_6": {}}
CPU_MODELS = {"pyramidnet": {"depth": 11, "alpha": 24}, "kaist_micronet_v1": {}, "fastai_wrn": {"n": 1, "k": 2}}


def params_for(root: Path, loader: str, batch: int, workers: int, faa: bool) -> Params:
    return Params.model_validate({
        "data": {"root": str(root), "val_size": 0, "batch_size": batch, "workers": workers, "loader": loader,
                 "augment": {"autoaugment": "fa_shake26_2x96d_cifar100" if faa else None, "crop_padding": 4,
                             "hflip": True, "cutout": 16}},
        "tracking": {"enabled": False},
    })


def throughput(arch: str, args: dict, params: Params, recipe: OptimConfig, runtime: Runtime) -> float:
    torch.manual_seed(0)
    model = create_model(arch, **args)
    _, train = runner.training_data(params, recipe, runtime, seed=0)
    result = fit(model, train, None, recipe, runtime, batch_size=params.data.batch_size,
                 workers=params.data.workers, num_classes=100)
    images = recipe.max_steps_per_epoch * params.data.batch_size
    return images / result.history[-1]["seconds"]


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
    parser.add_argument("--faa", action="store_true", help="Fast AutoAugment in every path")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    runtime = Runtime(torch.device("cuda" if cuda else "cpu"))
    steps = args.steps or (20 if cuda else 4)
    batch = args.batch or (256 if cuda else 32)
    workers = args.workers if args.workers is not None else (8 if cuda else 2)
    models = GPU_MODELS if cuda else CPU_MODELS
    n_train = max(steps * batch * 2, 2000)
    paths = {
        "(a) workers, fp32": ("workers", "fp32", False, False),
        "(b) workers, bf16, channels_last": ("workers", "bf16" if cuda else "fp32", True, False),
        f"(c) gpu loader, bf16, channels_last{', compile' if args.compile else ''}":
            ("gpu", "bf16" if cuda else "fp32", True, args.compile),
    }
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device}; batch {batch}, {steps} timed steps, {workers} workers, "
          f"{'FAA + ' if args.faa else ''}crop/flip/cutout{'' if cuda else '; bf16 needs CUDA: fp32 here'}")
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_cifar100(Path(tmp), n_train, 100, seed=0)
        rows = []
        for name, (loader, precision, channels_last, compile_) in paths.items():
            params = params_for(Path(tmp), loader, batch, workers, args.faa)
            recipe = OptimConfig(epochs=2, lr=0.05, max_steps_per_epoch=steps, precision=precision,
                                 channels_last=channels_last, compile=compile_)
            cells = {"data path alone": loader_only(params, recipe, runtime, steps)}
            for arch, arch_args in models.items():
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                cells[arch] = throughput(arch, arch_args, params, recipe, runtime)
                if cuda:
                    cells[f"{arch} GiB"] = torch.cuda.max_memory_allocated() / 2**30
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
