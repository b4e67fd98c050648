"""Datasets: one module per dataset (torchvision formats: real, a verified copy, or synthetic; your own images in
ImageFolder layout), one `build_splits` for all.

No DataLoaders here: the training module builds those (it knows the batch sizes and distribution)."""

from __future__ import annotations

from torch.utils.data import Dataset

from micronet.config import DataConfig
from micronet.data.cifar import (
    BASE_FOLDER,
    CIFAR100_MEAN,
    CIFAR100_STD,
    NUM_CLASSES,
    SYNTHETIC_MANIFEST,
    VERIFIED_MANIFEST,
    ManifestCIFAR100,
    build_transform,
    cifar100_manifest,
    cifar100_splits,
    cifar100_test,
    ensure_cifar100,
    load_cifar100,
    synthetic_manifest,
    write_stand_in_cifar100,
    write_synthetic_cifar100,
)
from micronet.data.digits import write_digits_cifar100, write_digits_folder
from micronet.data.folder import ensure_image_folder, image_folder_classes, image_folder_splits, image_folder_test
from micronet.data.imagenet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_imagenet_transform,
    ensure_imagenet,
    imagenet_num_classes,
    imagenet_splits,
    imagenet_test,
    load_imagenet,
    synthetic_imagenet_manifest,
    write_synthetic_imagenet,
)
from micronet.data.splits import Splits, split_indices

__all__ = [
    "BASE_FOLDER", "CIFAR100_MEAN", "CIFAR100_STD", "IMAGENET_MEAN", "IMAGENET_STD", "NUM_CLASSES",
    "SYNTHETIC_MANIFEST", "Splits", "VERIFIED_MANIFEST", "ManifestCIFAR100", "build_imagenet_transform",
    "build_splits", "build_test", "build_transform", "cifar100_manifest", "ensure_dataset", "load_cifar100",
    "load_imagenet", "num_classes", "split_indices", "synthetic_imagenet_manifest", "synthetic_manifest",
    "write_digits_cifar100", "write_digits_folder", "write_stand_in_cifar100", "write_synthetic_cifar100",
    "write_synthetic_imagenet",
]


def num_classes(cfg: DataConfig) -> int:
    if cfg.dataset == "imagenet":
        return imagenet_num_classes(cfg)  # the class folders present (1000 for the real data)
    if cfg.dataset == "imagefolder":
        return image_folder_classes(cfg)
    return NUM_CLASSES


def ensure_dataset(cfg: DataConfig) -> None:
    """Before a stage starts its worker processes: download once (data.download) or fail fast in one line,
    rather than in every rank."""
    if cfg.dataset == "imagenet":
        ensure_imagenet(cfg)
        return
    if cfg.dataset == "imagefolder":
        ensure_image_folder(cfg)
        return
    ensure_cifar100(cfg)


def build_splits(cfg: DataConfig) -> Splits:
    """Train (train transform), val held out of the training file (eval transform), test (eval transform)."""
    if cfg.dataset == "imagenet":
        return imagenet_splits(cfg)
    if cfg.dataset == "imagefolder":
        return image_folder_splits(cfg)
    return cifar100_splits(cfg)


def build_test(cfg: DataConfig) -> Dataset:
    """The test split alone (eval transform), for the score stage: nothing of the training data is read."""
    if cfg.dataset == "imagenet":
        return imagenet_test(cfg)
    if cfg.dataset == "imagefolder":
        return image_folder_test(cfg)
    return cifar100_test(cfg)
