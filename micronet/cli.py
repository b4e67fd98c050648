"""The `micronet` command: one sub-command per pipeline stage plus helpers. User-facing problems
(MicronetError) print as one line on stderr and exit 2, without a traceback.

Only Typer and the stage signatures load here; each command imports torch and the library when it runs, so
`micronet --help` and usage errors answer at once."""

from __future__ import annotations

import sys

import typer

from micronet.errors import MicronetError
from stages.count import count_command, models_command
from stages.data import synth_command, synth_imagenet_command
from stages.import_checkpoint import import_command, synth_kaist_command
from stages.params import apply_command
from stages.prune import prune_command
from stages.quantize import quantize_command
from stages.report import report_command
from stages.score import score_command
from stages.sparsify import sparsify_command
from stages.train import train_command
from stages.views import views_command

app = typer.Typer(
    help="MicroNet Challenge pipelines: train -> structured prune -> sparsify -> quantize -> score.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain help: flags read as flags, and no rich import on start-up
)
data_app = typer.Typer(help="Dataset helpers.", no_args_is_help=True, rich_markup_mode=None)
data_app.command("synth", help="Write a stand-in CIFAR-100 (generated, or scikit-learn's digits) in its format.")(
    synth_command)
data_app.command("synth-imagenet", help="Write a synthetic ImageNet (JPEG files, ImageFolder layout).")(
    synth_imagenet_command)
data_app.command("synth-kaist", help="Write a random KAIST-layout checkpoint at import.source (toy runs).")(
    synth_kaist_command)
app.add_typer(data_app, name="data")
params_app = typer.Typer(help="Params file helpers.", no_args_is_help=True, rich_markup_mode=None)
params_app.command("apply", help="Merge an overlay (e.g. a pipeline's toy.yaml) into params.yaml.")(apply_command)
app.add_typer(params_app, name="params")
app.command("train", help="Train the model (resumes after an interruption).")(train_command)
app.command("prune", help="Structured pruning: remove channels to prune.rate of the parameters.")(prune_command)
app.command("sparsify", help="Global magnitude sparsity with masked fine-tuning.")(sparsify_command)
app.command("quantize", help="Power-of-two fixed-point weights and activations, calibrated.")(quantize_command)
app.command("score", help="Test accuracy and the official MicroNet score.")(score_command)
app.command("count", help="Print the official per-layer count of an architecture or a checkpoint.")(count_command)
app.command("models", help="List the registered architectures.")(models_command)
app.command("import", help="Turn a submission's released checkpoint into a micronet checkpoint.")(import_command)
app.command("report", help="Compare pipeline runs with each other and the published figures (reports/).")(
    report_command)
app.command("views", help="Links to each pipeline experiment's runs table in the MLflow UI, scores shown.")(
    views_command)


def main() -> None:
    try:
        app(standalone_mode=True)
    except MicronetError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:  # a full, read-only or forbidden disk met outside the output writers (logs, MLflow)
        from micronet.checkpoint import DISK_ERRORS

        if exc.errno not in DISK_ERRORS:
            raise
        typer.echo(f"error: {exc.filename or 'a file'}: cannot write ({DISK_ERRORS[exc.errno]})", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
