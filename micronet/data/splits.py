"""The splits every dataset provides, and the seeded hold-out of a validation set from the training file."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from micronet.errors import MicronetError


@dataclass
class Splits:
    train: Dataset  # training images, train transform (augmented); a ConcatDataset of one view per data.copies entry
    val: Optional[Subset]  # held out of the training file, eval transform; None when data.val_size is 0
    test: Dataset  # the test file (CIFAR) or the official val set (ImageNet), eval transform
    train_eval: Subset  # the training images with the eval transform: calibration or scoring without val
    augments: list = field(default_factory=list)  # the AugmentConfig of each training view, in order


def training_copies(views: list[Dataset], indices: list[int]) -> Dataset:
    """The training set: the training images (`indices`) of each view of the training file, one view per
    data.copies entry (each with its own augmentation), concatenated."""
    copies = [Subset(view, indices) for view in views]
    return copies[0] if len(copies) == 1 else ConcatDataset(copies)


def split_indices(n: int, val_size: int, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) indices of the training file: a seeded permutation's first val_size go to val."""
    if val_size >= n:
        raise MicronetError(f"data.val_size ({val_size}) must be smaller than the training set ({n} images)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[val_size:]), sorted(perm[:val_size])
