"""`micronet data synth` / `synth-imagenet`: write a synthetic CIFAR-100 or ImageNet in the real on-disk format,
for runs without the dataset; `micronet data digits`: a small real data set (scikit-learn's digits) in CIFAR-100's
format, to see a pipeline learn real images."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def synth_command(
    out: Path = typer.Option(..., "--out", help="folder to write cifar-100-python/ into (use it as data.root)"),
    train: int = typer.Option(5000, "--train", help="number of training images"),
    test: int = typer.Option(1000, "--test", help="number of test images"),
    seed: int = typer.Option(0, "--seed", help="same seed, same bytes"),
) -> None:
    """Write a deterministic synthetic CIFAR-100 that torchvision's CIFAR100 loader reads."""
    from micronet.data import write_synthetic_cifar100

    folder = write_synthetic_cifar100(out, n_train=train, n_test=test, seed=seed)
    typer.echo(f"wrote synthetic CIFAR-100 to {folder}: {train} train, {test} test images (seed {seed})")


def digits_command(
    out: Path = typer.Option(..., "--out", help="folder to write cifar-100-python/ into (use it as data.root)"),
    test: int = typer.Option(297, "--test", help="test images (stratified by class)"),
    train: Optional[int] = typer.Option(None, "--train", help="training images (stratified); default: all the "
                                        "others of the 1,797"),
    seed: int = typer.Option(0, "--seed", help="seed of the train/test split"),
) -> None:
    """Write scikit-learn's 8x8 digits, upscaled to 32x32 RGB, as CIFAR-100 files (labels 0-9) torchvision reads."""
    from micronet.data import synthetic_manifest, write_digits_cifar100

    folder = write_digits_cifar100(out, n_test=test, seed=seed, n_train=train)
    typer.echo(f"wrote the digits (10 classes, 32x32) as CIFAR-100 to {folder}: "
               f"{synthetic_manifest(out)['n_train']} train, {test} test images (split seed {seed})")


def synth_imagenet_command(
    out: Path = typer.Option(..., "--out", help="folder to write train/ and val/ into (use it as data.root)"),
    classes: int = typer.Option(10, "--classes", help="number of classes (folders n00000000, n00000001, ...)"),
    train_per_class: int = typer.Option(100, "--train-per-class", help="training images per class"),
    val_per_class: int = typer.Option(20, "--val-per-class", help="validation (test) images per class"),
    size: int = typer.Option(64, "--size", help="shorter image side in pixels"),
    seed: int = typer.Option(0, "--seed", help="same seed, same bytes"),
) -> None:
    """Write a deterministic synthetic ImageNet (JPEG files, ImageFolder layout) that torchvision reads."""
    from micronet.data import write_synthetic_imagenet

    folder = write_synthetic_imagenet(out, classes, train_per_class, val_per_class, size, seed)
    typer.echo(f"wrote synthetic ImageNet to {folder}: {classes} classes, {train_per_class} train and "
               f"{val_per_class} val images per class, shorter side {size} (seed {seed})")
