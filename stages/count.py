"""`micronet count`: the MicroNet parameter/op count and score of a registered architecture (untrained) or of a
saved checkpoint (pruned, sparse, quantized: counted as it was saved)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def parse_input_size(text: str) -> tuple[int, int, int]:
    """"3,32,32" -> (3, 32, 32); anything but three positive ints is a usage error."""
    parts = [p.strip() for p in text.split(",")]
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) <= 0:
        raise typer.BadParameter(f"expected three positive ints C,H,W (e.g. 3,32,32), got {text!r}",
                                 param_hint="--input")
    return size  # type: ignore[return-value]


def count_command(
    arch: Optional[str] = typer.Option(None, "--arch", help="registered architecture (see `micronet models`)"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="a micronet checkpoint instead of --arch"),
    input: str = typer.Option("3,32,32", "--input", help="one example's shape C,H,W"),
    freebie: bool = typer.Option(False, "--freebie", help="count params and mults at 16 bits (unquantized models)"),
    num_classes: int = typer.Option(100, "--num-classes", help="classifier outputs (with --arch)"),
) -> None:
    """Print the per-layer MicroNet count of ARCH or CHECKPOINT and its score on both tracks."""
    size = parse_input_size(input)
    if (arch is None) == (checkpoint is None):
        raise typer.BadParameter("give exactly one of --arch NAME or --checkpoint FILE", param_hint="--arch")
    import torch

    from micronet.checkpoint import load_model
    from micronet.nets import create_model
    from micronet.scoring import TASKS, count

    if checkpoint is not None:
        model = load_model(checkpoint)[0]
    else:
        torch.manual_seed(0)
        model = create_model(arch, num_classes=num_classes)
        with torch.no_grad():  # a fresh init can draw an exact 0.0: not sparsity, so no mask for it
            for p in model.parameters():
                if p.dim() > 1:
                    p[p == 0] = 1e-3
    result = count(model, size, freebie=freebie)
    typer.echo(result.table(tasks=TASKS))


def models_command() -> None:
    """List the registered architectures."""
    from micronet.nets import list_models

    for name in list_models():
        typer.echo(name)
