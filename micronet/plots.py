"""Pictures of one stage's results, written as PNG files beside its CSVs (and logged with them to MLflow).

Figures are `matplotlib.figure.Figure`s on an Agg canvas, never pyplot's: no global figure state and no
interactive backend, so stages and tests draw safely without a display. Rows are the dicts the stages already write
to CSV; values may be numbers or their CSV strings, and a missing or empty value is left out of its line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from micronet.errors import MicronetError

Rows = Sequence[Mapping[str, Any]]
DPI = 110
COMPRESSION_X = {
    "parameters": "parameters",
    "sparsity": "weight sparsity (fraction of zeros)",
    "rate": "fraction of parameters removed",
}


def _number(value: Any) -> Optional[float]:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _series(rows: Rows, x: str, y: str) -> tuple[list[float], list[float]]:
    """(x, y) pairs of the rows that have both as numbers."""
    pairs = [(_number(r.get(x)), _number(r.get(y))) for r in rows]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    return [a for a, _ in pairs], [b for _, b in pairs]


def figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def training_curves(rows: Rows, path: Path) -> Optional[Path]:
    """Loss, accuracy and learning rate per epoch from the training loop's rows (epoch, lr, train_loss,
    train_acc, val_loss, val_acc, ...). Returns the PNG written, or None when there are no epochs to draw
    (train.epochs: 0), so a stage can call it unconditionally."""
    if not rows:
        return None
    fig = figure(13, 3.8)
    loss, accuracy, lr = fig.subplots(1, 3)
    panels = [
        (loss, "loss", [("train_loss", "train"), ("val_loss", "validation")]),
        (accuracy, "top-1 accuracy", [("train_acc", "train"), ("val_acc", "validation")]),
        (lr, "learning rate", [("lr", "lr")]),
    ]
    for ax, title, keys in panels:
        drawn = 0
        for key, label in keys:
            xs, ys = _series(rows, "epoch", key)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
                drawn += 1
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if drawn > 1:
            ax.legend()
        if not drawn:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="0.5")
    lrs = _series(rows, "epoch", "lr")[1]
    if lrs and min(lrs) > 0 and max(lrs) / min(lrs) > 100:
        lr.set_yscale("log")  # step schedules fall by 10x per milestone
    seconds = [s for s in (_number(r.get("seconds")) for r in rows) if s is not None]
    if seconds:
        fig.suptitle(f"{len(rows)} epochs, {sum(seconds):,.0f} s", fontsize=10)
    return save(fig, path)


def compression_steps(rows: Rows, path: Path, x: str = "parameters") -> Optional[Path]:
    """Validation accuracy after each prune/sparsify step (rows: step, target_rate, rate or sparsity,
    parameters, val_accuracy) against `x` (parameters, sparsity or rate), each point labelled with its step
    and target. Returns the PNG written, or None when there are no steps."""
    if x not in COMPRESSION_X:
        raise MicronetError(f"compression_steps: x = {x!r}; use one of {', '.join(COMPRESSION_X)}")
    if not rows:
        return None
    xs, ys = _series(rows, x, "val_accuracy")
    if not xs:
        keys = sorted({k for r in rows for k in r})
        raise MicronetError(f"compression_steps: no row has both {x!r} and 'val_accuracy' (keys: {', '.join(keys)})")
    fig = figure(6.5, 4.5)
    ax = fig.subplots()
    ax.plot(xs, ys, marker="o", color="tab:blue")
    for row in rows:
        px, py = _number(row.get(x)), _number(row.get("val_accuracy"))
        if px is None or py is None:
            continue
        target = _number(row.get("target_rate"))
        label = f"step {row.get('step', '?')}" + (f" (target {target:.2f})" if target is not None else "")
        ax.annotate(label, (px, py), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if x == "parameters":
        ax.invert_xaxis()  # steps run left to right as the model shrinks
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 18M, 250k: full counts collide on the axis
    ax.set_xlabel(COMPRESSION_X[x])
    ax.set_ylabel("validation top-1 accuracy")
    ax.grid(alpha=0.3)
    return save(fig, path)
