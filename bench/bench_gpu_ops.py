"""Images per second of CIFAR training augmentation: the PIL worker path (micronet.data.build_transform through a
DataLoader with 0 and 2 workers) against the batched device path (micronet.data.gpu), on CPU and on CUDA
when there is one.

Run: python bench/bench_gpu_ops.py [--n 5000] [--batch 512] [--repeats 3] [--threads N]. Data: synthetic CIFAR-100 in the
real format (write_synthetic_cifar100), read by the same dataset class training uses. Each figure is the
best of --repeats timed epochs after one untimed epoch (workers persistent, so their start is not timed):
on a shared machine the best run is the one least slowed by others.
"augment" times GpuAugment alone on batches already on the device; "loader" times a whole GpuCifarLoader
epoch (shuffle, gather, augment, normalize).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from typing import Callable

import torch
from torch.utils.data import DataLoader

from micronet.config import AugmentConfig
from micronet.data import build_transform, load_cifar100, write_synthetic_cifar100
from micronet.data.gpu import GpuAugment, GpuCifarLoader

CONFIGS = {
    "crop+flip": AugmentConfig(),
    "wave (FAA+crop+flip+cutout)": AugmentConfig(autoaugment="fa_shake26_2x96d_cifar100", cutout=8),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(run_epoch: Callable[[], int], repeats: int, device: torch.device) -> float:
    run_epoch()  # warm-up: worker start, allocator, kernels
    rates = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        n = run_epoch()
        _sync(device)
        rates.append(n / (time.perf_counter() - start))
    return max(rates)


def bench_workers(root: str, augment: AugmentConfig, batch: int, workers: int, repeats: int) -> float:
    dataset = load_cifar100(root, train=True, transform=build_transform(augment, train=True))
    loader = DataLoader(dataset, batch, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))

    def epoch() -> int:
        return sum(len(y) for _, y in loader)

    return images_per_second(epoch, repeats, torch.device("cpu"))


def bench_device(root: str, augment: AugmentConfig, batch: int, device: torch.device, repeats: int
                 ) -> tuple[float, float]:
    dataset = load_cifar100(root, train=True)
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous().to(device)
    pipeline = GpuAugment(augment, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    n_batches = len(images) // batch

    def augment_epoch() -> int:
        for i in range(n_batches):
            pipeline(images[i * batch:(i + 1) * batch], generator)
        return n_batches * batch

    loader = GpuCifarLoader([(dataset.data, dataset.targets, augment)], batch, device=device)

    def loader_epoch() -> int:
        return sum(len(y) for _, y in loader)

    return (images_per_second(augment_epoch, repeats, device), images_per_second(loader_epoch, repeats, device))


def count_host_syncs(root: str, augment: AugmentConfig, batch: int) -> int:
    """Host-device synchronizations in one CUDA loader epoch (each stalls the training loop's run-ahead)."""
    dataset = load_cifar100(root, train=True)
    loader = GpuCifarLoader([(dataset.data, dataset.targets, augment)], batch, device="cuda")
    next(iter(loader))  # construction and first-use work are not per batch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in loader:
                pass
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="training images")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads of the batched path")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"{args.n} images, batch {args.batch}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"devices: {', '.join(str(d) for d in devices)}")
    with tempfile.TemporaryDirectory() as root:
        write_synthetic_cifar100(root, args.n, 100, seed=0)
        header = f"{'config':<28} {'path':<22} {'images/s':>10} {'vs PIL 0w':>10} {'vs PIL 2w':>10}"
        print(header + "\n" + "-" * len(header))
        for name, augment in CONFIGS.items():
            pil = {w: bench_workers(root, augment, args.batch, w, args.repeats) for w in (0, 2)}
            rows = [(f"PIL, {w} workers", rate) for w, rate in pil.items()]
            for device in devices:
                augment_rate, loader_rate = bench_device(root, augment, args.batch, device, args.repeats)
                rows += [(f"{device.type} augment", augment_rate), (f"{device.type} loader", loader_rate)]
            for path, rate in rows:
                print(f"{name:<28} {path:<22} {rate:>10,.0f} {rate / pil[0]:>9.2f}x {rate / pil[2]:>9.2f}x")
        if torch.cuda.is_available():
            for name, augment in CONFIGS.items():
                print(f"{name}: {count_host_syncs(root, augment, args.batch)} host syncs in a CUDA loader epoch")


if __name__ == "__main__":
    main()
