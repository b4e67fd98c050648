"""`micronet data synth` / `synth-imagenet`: write a stand-in CIFAR-100 or ImageNet in the real on-disk format,
for runs without the dataset: generated patterns, or (CIFAR-100, `--source digits`) scikit-learn's handwritten
digits, a small real data set to see a pipeline learn real images."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def synth_command(
    out: Path = typer.Option(..., "--out", help="folder to write cifar-100-python/ (digits-folder: train/, val/) "
                             "into (use it as data.root)"),
    train: int = typer.Option(5000, "--train", help="number of training images"),
    test: int = typer.Option(1000, "--test", help="number of test images"),
    seed: int = typer.Option(0, "--seed", help="same seed, same bytes"),
    source: str = typer.Option("synthetic", "--source", help="synthetic: generated patterns, 100 classes; digits: "
                               "scikit-learn's handwritten digits (real images, 10 classes, at most 1,797 in all), "
                               "upscaled to 32x32, a seeded stratified split; digits-folder: the first --classes "
                               "digits as PNG files of mixed sizes in ImageFolder layout (data.dataset imagefolder)"),
    classes: int = typer.Option(10, "--classes", help="digits-folder: how many digit classes (2-10)"),
) -> None:
    """Write a stand-in CIFAR-100 that torchvision's CIFAR100 loader reads (generated, or scikit-learn's digits), or
    the digits as an image folder (train/<class>/*.png, val/<class>/*.png)."""
    from micronet.config import SynthConfig
    from micronet.data import write_digits_folder, write_stand_in_cifar100
    from micronet.errors import MicronetError

    try:
        synth = SynthConfig(source=source, train=train, test=test, seed=seed, classes=classes)
    except ValueError as e:
        raise MicronetError(f"micronet data synth: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    if source == "digits-folder":
        write_digits_folder(out, classes, train, test, seed)
        typer.echo(f"wrote the digits 0-{classes - 1} as an image folder to {out}: {train} train/, {test} val/ "
                   f"PNG files (seed {seed})")
        return
    folder = write_stand_in_cifar100(out, synth)
    what = "the digits (10 classes, 32x32) as CIFAR-100" if source == "digits" else "synthetic CIFAR-100"
    typer.echo(f"wrote {what} to {folder}: {train} train, {test} test images (seed {seed})")


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
