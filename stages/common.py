"""Options shared by the stage commands."""

from pathlib import Path

import typer

ParamsOption = typer.Option(Path("params.yaml"), "--params", help="params file (validated whole before any work)")
