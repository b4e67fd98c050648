"""Images/s of the ImageNet training loader (JPEG decode + random-resized crop 224 + flip + normalize) on
synthetic JPEGs, for 0, 1 and 2 DataLoader workers, and per CPU core.

Run: python bench/bench_loader.py [--images 512] [--batch 64]. Writes the images to a temporary folder
(shorter side 256, longer side up to 341: real ImageNet averages about 400x350, so real files decode
~2x slower per image). The PIL + transforms v1 row is the pipeline the loader replaced, for comparison.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from micronet.config import AugmentConfig, DataConfig
from micronet.data import IMAGENET_MEAN, IMAGENET_STD, build_splits, write_synthetic_imagenet


def images_per_second(dataset, workers: int, batch: int) -> float:
    """Steady-state rate: the clock starts after the first batch (worker start-up and warm-up)."""
    loader = DataLoader(dataset, batch, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    batches = iter(loader)
    next(batches)
    start, seen = time.perf_counter(), 0
    for images, _ in batches:
        seen += images.shape[0]
    return seen / (time.perf_counter() - start)


def pil_reference(root: Path) -> ImageFolder:
    tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return ImageFolder(str(root / "train"), transform=tf, loader=lambda p: Image.open(p).convert("RGB"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the main process as one core, like a worker (DataLoader sets 1 thread there)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        classes = 8
        write_synthetic_imagenet(root, classes, args.images // classes, 1, 256, seed=0)
        cfg = DataConfig(dataset="imagenet", root=tmp, val_size=0, augment=AugmentConfig())
        train = build_splits(cfg).train
        print(f"{len(train)} JPEGs, shorter side 256, batch {args.batch}, RandomResizedCrop 224 + flip + normalize")
        print(f"{'pipeline':<34} {'workers':>7} {'images/s':>9} {'per core':>9}")
        rows = [("decode_image + transforms v2", train, w) for w in (0, 1, 2)]
        rows.append(("PIL + transforms v1 (reference)", pil_reference(root), 0))
        for name, dataset, workers in rows:
            rate = images_per_second(dataset, workers, args.batch)
            print(f"{name:<34} {workers:>7} {rate:>9.0f} {rate / max(workers, 1):>9.0f}")


if __name__ == "__main__":
    main()
