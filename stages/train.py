"""`micronet train`: train the model from params (resumes after an interruption)."""

from __future__ import annotations

from pathlib import Path

import typer

from micronet import runner
from micronet.checkpoint import load_model, make_checkpoint, atomic_save
from micronet.data import build_splits
from micronet.nets import create_model
from micronet.tracking import stage_run
from micronet.training import clear_resume, fit, setup_runtime, teardown_runtime
from stages.common import ParamsOption


def train_command(
    params_path: Path = ParamsOption,
    output: Path = typer.Option(Path("models/train.pt"), "--output", help="checkpoint written"),
    metrics: Path = typer.Option(Path("metrics/train.json"), "--metrics"),
    plots: Path = typer.Option(Path("metrics/plots/train.csv"), "--plots", help="per-epoch curves"),
) -> None:
    params = runner.prepare(params_path)
    cfg = params.train
    if not cfg.enabled:
        runner.skip_stage(Path(cfg.checkpoint), output, {metrics: {"enabled": False, "source": cfg.checkpoint},
                                                          plots: []})
        return
    runtime = setup_runtime(params.distributed)
    runner.seed_everything(cfg.seed)
    if cfg.checkpoint:
        model, _ = load_model(cfg.checkpoint)
    else:
        model = create_model(params.model.arch, **params.model.args)
    splits = build_splits(params.data.model_copy(update={"augment": cfg.augment or params.data.augment}))
    resume = runner.resume_file(output)
    key = runner.fingerprint(params.data.model_dump(), params.model.model_dump(), cfg.model_dump())

    with stage_run("train", params.tracking, params.model_dump(), params_path, enabled=runtime.is_main) as track:
        track.log_params({"train": cfg.model_dump(), "model": params.model.model_dump()})
        result = fit(
            model, splits.train, splits.val, cfg, runtime,
            batch_size=cfg.batch_size or params.data.batch_size, workers=params.data.workers, seed=cfg.seed,
            resume_path=resume, fingerprint=key, desc="train",
            on_epoch=lambda row: track.log_metrics({k: v for k, v in row.items() if k != "epoch"}, row["epoch"]),
        )
        if runtime.is_main:
            n_params = sum(p.numel() for p in model.parameters())
            atomic_save(make_checkpoint(model, params.model.arch, params.model.args, stage="train"), output)
            summary = {
                "enabled": True,
                "epochs": cfg.epochs,
                "best_epoch": result.best_epoch,
                "val_accuracy": result.best_val_top1,
                "parameters": n_params,
                "processes": runtime.world_size,
            }
            runner.publish(track, {metrics: summary, plots: result.history},
                           {"val_accuracy": result.best_val_top1, "parameters": n_params})
            clear_resume(resume, runtime)
    teardown_runtime(runtime)
