"""The `micronet` command: one sub-command per pipeline stage plus helpers. User-facing problems
(MicronetError) print as one line on stderr and exit 2, without a traceback.

Only Typer and the stage signatures load here; each command imports torch and the library when it runs, so
`micronet --help` and usage errors answer at once."""

from __future__ import annotations

import logging
import os
import signal
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
from stages.summary import summary_command
from stages.train import train_command
from stages.views import views_command

RESUME_HINT = ("interrupted: re-run the same command (or `dvc repro` in the pipeline's folder) to resume; training "
               "continues from the last finished epoch")
# MLflow settings that only add noise to a stage's output, each overridable from the environment: the "Downloading
# artifacts" bar MLflow draws when the score stage logs and registers its model (a local copy, well under a second).
MLFLOW_QUIET = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


class _NoPipVersionWarning(logging.Filter):
    """Drops MLflow's "Failed to resolve installed pip version" warning: uv's environments have no pip, and the
    model's conda.yaml lists `pip` unversioned, which is all the warning says. Every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to resolve installed pip version")


def quiet_mlflow() -> None:
    for key, value in MLFLOW_QUIET.items():
        os.environ.setdefault(key, value)
    logger = logging.getLogger("mlflow.utils.environment")
    if not any(isinstance(f, _NoPipVersionWarning) for f in logger.filters):
        logger.addFilter(_NoPipVersionWarning())

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
params_app.command("apply", help="Merge an overlay (e.g. a pipeline's toy.yaml) into params.yaml, comments kept, "
                                  "validated whole first (a key given twice: one line, exit 2). README: "
                                  "\"Experiments: change one knob\".")(apply_command)
app.add_typer(params_app, name="params")
# Each stage's help names the params section it reads and the README section that explains it; Typer shows `help`
# in place of the command function's docstring.
STAGE_HELP = {
    "train": "Train the model on the params' `data`, `model` and `train` sections (or --section S: train_b0, "
             "train_more, ...; `distributed` for several GPUs); resumes after an interruption from the last finished "
             "epoch. README: \"Stages and parameters\", \"Running at full scale\".",
    "prune": "Structured compression to `prune.rate` of the parameters removed, in steps, each fine-tuned "
             "(`prune.finetune`): `prune.method: eigendamage` (Wave's pipelines) truncates every conv and the "
             "classifier to low rank in its K-FAC eigenbasis with bring-back steps; `channels` removes channels "
             "with Torch-Pruning. README: \"Pipelines\" (Wave), \"Stages and parameters\".",
    "sparsify": "Global magnitude sparsity to `sparsify.rate` of the eligible weights (`sparsify.steps`, "
                "`schedule`, `exclude`), masked fine-tuning after each step (`sparsify.finetune`). README: "
                "\"Stages and parameters\".",
    "quantize": "Power-of-two fixed point from the `quantize` section: `weight_bits` (per layer: `layer_bits`) and "
                "`activation_bits`, BatchNorm folded (`fold_bn`), activation ranges calibrated, optional "
                "quantization-aware fine-tuning (`quantize.finetune`). README: \"Starting from a released "
                "checkpoint, quantization-aware fine-tuning, bit-width sweeps\".",
    "score": "Test accuracy and the official MicroNet score (`score.task`, `score.freebie`): metrics/score.json "
             "and the per-layer table. README: \"The score\".",
    "count": "Print the official per-layer count and score of an architecture (--arch) or a saved checkpoint "
             "(--checkpoint), no params file; the bits of weights and of activations are those the checkpoint "
             "stores. README: \"The score\".",
}
app.command("train", help=STAGE_HELP["train"])(train_command)
app.command("prune", help=STAGE_HELP["prune"])(prune_command)
app.command("sparsify", help=STAGE_HELP["sparsify"])(sparsify_command)
app.command("quantize", help=STAGE_HELP["quantize"])(quantize_command)
app.command("score", help=STAGE_HELP["score"])(score_command)
app.command("count", help=STAGE_HELP["count"])(count_command)
app.command("models", help="List the registered architectures.")(models_command)
app.command("import", help="Turn a submission's released checkpoint into a micronet checkpoint: SOURCE SRC --arch A, "
                            "or --params P to read its `import` section (`source`, `format`, `arch`). README: "
                            "\"Starting from a released checkpoint, quantization-aware fine-tuning, bit-width "
                            "sweeps\".")(import_command)
app.command("report", help="Compare pipeline runs with each other and the published figures (reports/).")(
    report_command)
app.command("summary", help="A pipeline's result in one short table (metrics/score.json): what make demo ends with.")(
    summary_command)
app.command("views", help="Links to each pipeline experiment's runs table in the MLflow UI, scores shown.")(
    views_command)


_interrupted = False


def _on_sigint(signum, frame) -> None:
    """Ctrl-C answered as Python does (KeyboardInterrupt), and remembered: Typer turns KeyboardInterrupt into a
    silent exit 130, and main() adds the one line saying how to resume. Forked DataLoader workers inherit this
    handler; in them it only sets their own copy of the flag."""
    global _interrupted
    _interrupted = True
    signal.default_int_handler(signum, frame)


def one_line(exc: MicronetError) -> str:
    """The message; raised in a DataLoader worker (an unreadable image), torch re-raises it in the main process with
    the worker's traceback prepended, whose last line is the message."""
    message = str(exc)
    if "\nOriginal Traceback" in message:
        message = message.rstrip().splitlines()[-1].split(f"{MicronetError.__name__}: ", 1)[-1]
    return message


def main() -> None:
    global _interrupted
    quiet_mlflow()
    _interrupted = False
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.default_int_handler:  # not where SIGINT is ignored (nohup, a background job)
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        app(standalone_mode=True)
    except KeyboardInterrupt:  # Ctrl-C outside the command itself (start-up)
        _interrupted = True
        sys.exit(130)
    except MicronetError as exc:
        typer.echo(f"error: {one_line(exc)}", err=True)
        sys.exit(2)
    except OSError as exc:  # a full, read-only or forbidden disk met outside the output writers (logs, MLflow)
        from micronet.checkpoint import DISK_ERRORS

        if exc.errno not in DISK_ERRORS:
            raise
        typer.echo(f"error: {exc.filename or 'a file'}: cannot write ({DISK_ERRORS[exc.errno]})", err=True)
        sys.exit(2)
    finally:
        if previous is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous)
        if _interrupted:  # training keeps a resume file every epoch: only the epoch under way is lost
            typer.echo(f"\n{RESUME_HINT}", err=True)


if __name__ == "__main__":
    main()
