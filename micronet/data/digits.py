"""A small real image data set in CIFAR-100's on-disk format: scikit-learn's bundled handwritten digits (1,797
8x8 greyscale images, 10 classes, shipped inside the wheel, nothing downloaded), upscaled to 32x32 RGB, labels 0-9
of the 100 fine classes, a seeded stratified train/test split. It shows a pipeline learns real images without
CIFAR-100 (tests/test_e2e*.py run the toy pipelines on it). The same digits as an image folder of PNG files stand in
for a user's own images (`data.dataset: imagefolder`)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

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


def _stratified_split(keep: np.ndarray, labels: np.ndarray, n_train: int, n_test: int,
                      seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices among `keep`, both stratified by class, seeded: `n_test` for test, then `n_train` of the
    rest (all of it when that is the number)."""
    from sklearn.model_selection import train_test_split

    rest, test_idx = train_test_split(keep, test_size=n_test, stratify=labels[keep], random_state=seed)
    train_idx = rest if n_train == len(rest) else train_test_split(
        rest, train_size=n_train, stratify=labels[rest], random_state=seed)[0]
    return train_idx, test_idx


def write_digits_cifar100(out: Path, n_test: int, seed: int, n_train: Optional[int] = None) -> Path:
    """Write the digits to `out/cifar-100-python/` ({train,test,meta} and a manifest): `n_test` images are the test
    file, `n_train` (default: all the others) the training file, both stratified by class with a seeded split.
    Returns that folder; use `out` as data.root."""
    n_train = DIGITS - n_test if n_train is None else n_train
    problem = digits_split_problem(n_train, n_test)
    if problem:
        raise MicronetError(problem)
    images, labels = _digits()
    train_idx, test_idx = _stratified_split(np.arange(DIGITS), labels, n_train, n_test, seed)
    splits = {split: (labels[idx], _cifar_rows(images[idx])) for split, idx in (("train", train_idx),
                                                                                  ("test", test_idx))}
    names = [f"digit_{c}" if c < 10 else f"unused_{c:02d}" for c in range(NUM_CLASSES)]
    manifest = {"source": "digits", "synthetic": False, "seed": seed, "n_train": n_train, "n_test": n_test}
    return write_cifar100_format(out, splits, names, manifest)


def write_digits_folder(out: Path, classes: int, n_train: int, n_test: int, seed: int) -> Path:
    """The first `classes` digits as your own images would be: PNG files in ImageFolder layout
    (`out/train/digit_<c>/*.png`, `out/val/digit_<c>/*.png`), each greyscale image upscaled to its own random size
    (16-48 pixels wide, up to 1.25 times as high or as wide), a seeded stratified split of `n_test` val and
    `n_train` train images. For `data.dataset: imagefolder` (`make demo DATA=imagefolder`). Returns `out`, the
    data.root."""
    problem = digits_split_problem(n_train, n_test, classes)
    if problem:
        raise MicronetError(problem)
    images, labels = _digits()
    train_idx, test_idx = _stratified_split(np.flatnonzero(labels < classes), labels, n_train, n_test, seed)
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        shutil.rmtree(out / split, ignore_errors=True)
    for split, idx in (("train", train_idx), ("val", test_idx)):
        for i in idx:
            folder = out / split / f"digit_{labels[i]}"
            folder.mkdir(parents=True, exist_ok=True)
            grey = Image.fromarray((images[i] * (255 / 16)).round().astype(np.uint8))
            width = int(rng.integers(16, 49))
            height = round(width * rng.uniform(0.8, 1.25))  # not square, but the centre crop keeps the digit
            grey.resize((width, height), Image.BILINEAR).save(folder / f"{i:04d}.png")
    return out
