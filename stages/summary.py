"""`micronet summary`: a pipeline's result in one short table, read from its score stage's metrics/score.json (what
`make demo` prints at the end, in place of every metric of every stage that `dvc metrics show` lists)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

COLUMNS = ("pipeline", "accuracy", "chance", "params", "flops", "score", "qualifies")
TOY_LINE = ("toy data: a toy run cannot qualify. `qualifies` above applies the accuracy gate to the toy test split; "
            "the challenge's gate is on the real test split (8,000 of CIFAR-100's 10,000 images, 37,500 of "
            "ImageNet's 50,000)")


def _cell(value: Any, key: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if key in ("accuracy", "chance"):
        return f"{value:.4f}"
    if key in ("params", "flops"):
        return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"
    if key == "score":
        return f"{value:.6g}"
    return str(value)


def toy_data(params: dict) -> bool:
    """Whether the params point the run at stand-in data: a `data.synthetic` set, a `synth` stage (pipelines/demo)
    or a randomly written release (`import.synthetic`)."""
    data = params.get("data") or {}
    imported = params.get("import") or {}
    return bool(data.get("synthetic") or params.get("synth") or imported.get("synthetic"))


def table(rows: list[dict[str, Any]]) -> str:
    cells = [list(COLUMNS)] + [[_cell(row.get(k), k) for k in COLUMNS] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    return "\n".join(lines)


def summary_command(
    metrics: Path = typer.Option(Path("metrics/score.json"), "--metrics", help="the score stage's metrics file"),
    params_path: Path = typer.Option(Path("params.yaml"), "--params",
                                     help="the pipeline's params (only read to tell toy data from real)"),
    pipeline: Optional[str] = typer.Option(None, "--pipeline", help="name shown (default: the folder's name)"),
) -> None:
    """Print pipeline, accuracy, chance, params, flops, score and qualifies from METRICS (README: "The score"),
    and one line saying so when the run is on toy data, which cannot qualify."""
    import yaml

    from micronet.errors import MicronetError

    if not metrics.is_file():
        raise MicronetError(f"{metrics}: not found; the score stage writes it (run the pipeline first)")
    try:
        scored = json.loads(metrics.read_text())
    except json.JSONDecodeError as exc:
        raise MicronetError(f"{metrics}: not JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(scored, dict):
        raise MicronetError(f"{metrics}: expected a mapping of metrics")
    name = pipeline or metrics.resolve().parent.parent.name
    typer.echo(table([{"pipeline": name, **scored}]))
    typer.echo(f"from {metrics}; every stage's metrics: uv run dvc metrics show")
    params = yaml.safe_load(params_path.read_text()) if params_path.is_file() else None
    if isinstance(params, dict) and toy_data(params):
        typer.echo(TOY_LINE)
