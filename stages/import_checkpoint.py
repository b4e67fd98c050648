"""`micronet import`: a submission's released checkpoint as a micronet checkpoint (then `micronet score`
and the compression stages can read it)."""

from __future__ import annotations

from pathlib import Path

import typer

IMPORTERS = ("kaist",)  # micronet.importers.IMPORTERS, named here so `--help` needs no torch


def import_command(
    source: str = typer.Argument(..., help=f"whose checkpoint format: {', '.join(IMPORTERS)}"),
    src: Path = typer.Argument(..., help="their checkpoint file, e.g. Checkpoint_ver1/micronet_v1_pr_60.t7"),
    arch: str = typer.Option(..., "--arch", help="the registered architecture it holds, e.g. kaist_micronet_v1"),
    output: Path = typer.Option(..., "--output", help="micronet checkpoint to write, e.g. models/import.pt"),
) -> None:
    """Map SRC's weights key for key onto ARCH and write them as a micronet checkpoint."""
    from micronet.checkpoint import atomic_save, build_from_checkpoint
    from micronet.compression.sparsity import overall_sparsity, sparsity_report
    from micronet.importers import import_checkpoint

    ckpt = import_checkpoint(source, src, arch)
    atomic_save(ckpt, output)
    sparsity = overall_sparsity(sparsity_report(build_from_checkpoint(ckpt, output)))
    masks = ckpt["source"].get("masks_folded", 0)
    typer.echo(f"wrote {output}: {arch}, {len(ckpt['state_dict'])} tensors from {src.name}"
               f" ({masks} masks folded into their weights), conv/linear sparsity {sparsity:.2%}")
