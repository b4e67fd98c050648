"""A small real image data set in CIFAR-100's on-disk format: scikit-learn's bundled handwritten digits (1,797
8x8 greyscale images, 10 classes, shipped inside the wheel, nothing downloaded), upscaled to 32x32 RGB, labels 0-9
of the 100 fine classes, a seeded stratified train/test split. It shows a pipeline learns real images without
CIFAR-100 (tests/test_e2e*.py run the toy pipelines on it)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from micronet.config import DIGITS, digits_split_problem
from micronet.data.cifar import NUM_CLASSES, write_cifar100_format
from micronet.errors import MicronetError


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 8, 8) in 0..16, labels (N,)) from scikit-learn's bundled copy."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise MicronetError("the digits data set comes with scikit-learn: `uv sync` (dev group) or "
                            "`pip install scikit-learn`") from None
    digits = load_digits()
    return digits.images, digits.target


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """(N, 8, 8) in 0..16 -> (N, 3072) uint8 rows: bilinear 4x upscale to 32x32, grey in all three planes."""
    x = torch.from_numpy(images.astype(np.float32) * (255 / 16))[:, None]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 255).round()
    return x.to(torch.uint8).expand(-1, 3, -1, -1).reshape(len(images), 3072).numpy()


def write_digits_cifar100(out: Path, n_test: int, seed: int, n_train: Optional[int] = None) -> Path:
    """Write the digits to `out/cifar-100-python/` ({train,test,meta} and a manifest): `n_test` images are the test
    file, `n_train` (default: all the others) the training file, both stratified by class with a seeded split.
    Returns that folder; use `out` as data.root."""
    n_train = DIGITS - n_test if n_train is None else n_train
    problem = digits_split_problem(n_train, n_test)
    if problem:
        raise MicronetError(problem)
    from sklearn.model_selection import train_test_split

    images, labels = _digits()
    rest, test_idx = train_test_split(np.arange(DIGITS), test_size=n_test, stratify=labels, random_state=seed)
    train_idx = rest if n_train == len(rest) else train_test_split(
        rest, train_size=n_train, stratify=labels[rest], random_state=seed)[0]
    splits = {split: (labels[idx], _cifar_rows(images[idx])) for split, idx in (("train", train_idx),
                                                                                  ("test", test_idx))}
    names = [f"digit_{c}" if c < 10 else f"unused_{c:02d}" for c in range(NUM_CLASSES)]
    manifest = {"source": "digits", "synthetic": False, "seed": seed, "n_train": n_train, "n_test": n_test}
    return write_cifar100_format(out, splits, names, manifest)
