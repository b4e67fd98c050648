"""Pictures of a stage's curves (matplotlib, Agg backend): logged to MLflow as PNGs beside the CSVs that
`dvc plots show` draws, so a run can be looked at where it is tracked."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _series(rows: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) is not None]


def training_curves(rows: Sequence[dict[str, Any]], path: Path | str) -> Path:
    """Per-epoch loss, accuracy and learning rate (the rows the training loop writes to its CSV)."""
    path = Path(path)
    epochs = [int(r["epoch"]) for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (title, keys) in zip(axes, (("loss", ("train_loss", "val_loss")),
                                        ("top-1 accuracy", ("train_acc", "val_acc")), ("learning rate", ("lr",)))):
        for key in keys:
            values = _series(rows, key)
            if len(values) == len(epochs):
                ax.plot(epochs, values, marker="o" if len(epochs) < 30 else None, label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if rows and any(r.get("lr") for r in rows) and min(_series(rows, "lr") or [1]) > 0:
        axes[2].set_yscale("log")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compression_steps(rows: Sequence[dict[str, Any]], path: Path | str, x: str = "parameters") -> Path:
    """Validation accuracy after each prune/sparsify step against `x` (parameters or sparsity), steps labelled."""
    path = Path(path)
    points = [(float(r[x]), float(r["val_accuracy"]), int(r["step"])) for r in rows
              if r.get(x) is not None and r.get("val_accuracy") is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if points:
        xs, ys, steps = zip(*points)
        ax.plot(xs, ys, marker="o")
        for xv, yv, step in points:
            ax.annotate(f"step {step}", (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=8)
    else:
        ax.text(0.5, 0.5, "no validation split: nothing to plot", ha="center", transform=ax.transAxes)
    ax.set_xlabel(x)
    ax.set_ylabel("validation top-1 accuracy")
    ax.set_title(f"accuracy vs {x}, per step")
    ax.grid(alpha=0.3)
    if x == "parameters":
        ax.invert_xaxis()  # compression proceeds to the right
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
