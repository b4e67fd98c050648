"""`micronet report`: compare every pipeline run in the MLflow store with each other and with the teams'
published figures (reports/index.html, pareto.png, summary.md; also logged to MLflow)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def report_command(
    output: Path = typer.Option(Path("reports"), "--output", help="folder the report files are written to"),
    experiments: Optional[list[str]] = typer.Option(
        None, "--experiment", "-e", help="only this MLflow experiment (repeatable); default: every pipeline's"),
    mlflow_url: str = typer.Option("http://127.0.0.1:5000", "--mlflow-url",
                                   help="the MLflow UI the runs and registered models link to (make mlflow-ui)"),
) -> None:
    from micronet.report import make_report

    files, run_id = make_report(output, experiments or None, mlflow_url)
    for path in files.values():
        typer.echo(str(path))
    typer.echo(f"logged as MLflow run {run_id} in experiment 'micronet-report'")
