"""`micronet data synth`: write a synthetic CIFAR-100 (real on-disk format) for runs without the dataset."""

from __future__ import annotations

from pathlib import Path

import typer

from micronet.data import write_synthetic_cifar100


def synth_command(
    out: Path = typer.Option(..., "--out", help="folder to write cifar-100-python/ into (use it as data.root)"),
    train: int = typer.Option(5000, "--train", help="number of training images"),
    test: int = typer.Option(1000, "--test", help="number of test images"),
    seed: int = typer.Option(0, "--seed", help="same seed, same bytes"),
) -> None:
    """Write a deterministic synthetic CIFAR-100 that torchvision's CIFAR100 loader reads."""
    folder = write_synthetic_cifar100(out, n_train=train, n_test=test, seed=seed)
    typer.echo(f"wrote synthetic CIFAR-100 to {folder}: {train} train, {test} test images (seed {seed})")
