"""`micronet count`: the MicroNet parameter/op count and score of a registered architecture (untrained)."""

from __future__ import annotations

import torch
import typer

from micronet.nets import create_model, list_models
from micronet.scoring import TASKS, count


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
    arch: str = typer.Option(..., "--arch", help=f"registered architecture ({', '.join(list_models())})"),
    input: str = typer.Option("3,32,32", "--input", help="one example's shape C,H,W"),
    freebie: bool = typer.Option(False, "--freebie", help="count params and mults at 16 bits (unquantized models)"),
    num_classes: int = typer.Option(100, "--num-classes", help="classifier outputs"),
) -> None:
    """Print the per-layer MicroNet count of ARCH and its score on both tracks."""
    size = parse_input_size(input)
    torch.manual_seed(0)
    model = create_model(arch, num_classes=num_classes)
    with torch.no_grad():  # a fresh init can draw an exact 0.0: not sparsity, so no mask for it
        for p in model.parameters():
            if p.dim() > 1:
                p[p == 0] = 1e-3
    result = count(model, size, freebie=freebie)
    typer.echo(result.table())
    typer.echo("")
    for task in TASKS:
        typer.echo(f"score {task:<9} {result.score(task):.6f}")
