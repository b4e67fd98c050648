"""`micronet train`: train one training section of the params (resumes after an interruption).

Heavy imports live inside the command so `micronet --help` and parameter errors stay fast."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stages.common import ParamsOption


def train_command(
    params_path: Path = ParamsOption,
    section: str = typer.Option("train", "--section", help="training section of the params (train, train_b0, ...)"),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="checkpoint whose softmax is the target"),
    output: Path = typer.Option(Path("models/train.pt"), "--output", help="checkpoint written"),
    metrics: Path = typer.Option(Path("metrics/train.json"), "--metrics"),
    plots: Path = typer.Option(Path("metrics/plots/train.csv"), "--plots", help="per-epoch curves"),
) -> None:
    from micronet import runner
    from micronet.checkpoint import load_model, make_checkpoint
    from micronet.compression import count_parameters
    from micronet.compression.dnw import apply_dnw, bake_dnw, density_report
    from micronet.data import num_classes
    from micronet.errors import MicronetError
    from micronet.nets import create_model
    from micronet.tracking import TEACHER_RUN_TAG, stage_run
    from micronet.training import clear_resume, fit, setup_runtime, teardown_runtime

    params = runner.prepare(params_path, "train", [output, metrics, plots, runner.sibling(metrics, "_layers")],
                            section)
    cfg = params.training(section)
    if not cfg.enabled:
        runner.skip_stage(Path(cfg.checkpoint), output, {metrics: {}, plots: []})
        typer.echo(f"{section}: switched off, passed {cfg.checkpoint} on to {output}")
        return
    model_cfg = params.model_for(section)
    runtime = setup_runtime(params.distributed)
    runner.seed_everything(cfg.seed)
    if cfg.checkpoint:
        model, start = load_model(cfg.checkpoint)
    else:
        model, start = create_model(model_cfg.arch, **model_cfg.args), {}
    optimizer_state = start.get("optimizer") if cfg.carry_optimizer else None
    if cfg.carry_optimizer and cfg.checkpoint and optimizer_state is None:
        raise MicronetError(f"{params_path}: key '{section}.carry_optimizer' is true but {cfg.checkpoint} holds no "
                            f"optimizer state: train it with carry_optimizer: true, or set this one false")
    teacher_model, teacher_ckpt = load_model(teacher) if teacher else (None, {})
    sparse_layers = apply_dnw(model, cfg.dnw.density, cfg.dnw.exclude) if cfg.dnw else []
    splits, train_data = runner.training_data(params, cfg, runtime, cfg.seed)
    resume = runner.resume_file(output)
    inputs = [Path(p) for p in (cfg.checkpoint, teacher) if p]  # a changed input checkpoint starts afresh
    key = runner.fingerprint(params.data.model_dump(), model_cfg.model_dump(), cfg.model_dump(), *inputs)

    with stage_run(section, params, params_path, enabled=runtime.is_main) as track:
        track.log_params({section: cfg.model_dump(), "model": model_cfg.model_dump()})
        track.set_tags({TEACHER_RUN_TAG: teacher_ckpt.get("mlflow_run_id")})
        runner.tag_selection(track, [cfg], params)
        result = fit(
            model, train_data, runner.selection_split(splits, cfg, params), cfg, runtime,
            batch_size=cfg.batch_size or params.data.batch_size, workers=params.data.workers, seed=cfg.seed,
            teacher=teacher_model, num_classes=num_classes(params.data), resume_path=resume, fingerprint=key,
            desc=section,
            on_epoch=lambda row: track.log_metrics({k: v for k, v in row.items() if k != "epoch"}, row["epoch"]),
            optimizer_state=optimizer_state, keep_optimizer=cfg.carry_optimizer,
        )
        if sparse_layers:
            bake_dnw(model)
        if runtime.is_main:
            n_params = count_parameters(model)
            checkpoint = make_checkpoint(model, model_cfg.arch, model_cfg.args, stage=section,
                                         mlflow_run_id=track.run_id)
            if cfg.carry_optimizer:
                checkpoint["optimizer"] = result.optimizer_state
            summary = {"val_accuracy": result.best_val_top1, "best_epoch": result.best_epoch,
                       "parameters": n_params}
            files: dict = {metrics: summary, plots: result.history}
            if sparse_layers:
                density = density_report(model)
                sparse = [density[name] for name in sparse_layers]
                summary["density"] = sum(r["nonzero"] for r in sparse) / sum(r["numel"] for r in sparse)
                files[runner.sibling(metrics, "_layers")] = density
            runner.publish(track, files, summary, curves=(plots, result.history), checkpoint=(output, checkpoint))
            clear_resume(resume, runtime)
            split = "test" if cfg.selection(params.data.val_size) == "test" else "val"
            accuracy = "n/a (no validation split)" if result.best_val_top1 is None else f"{result.best_val_top1:.4f}"
            processes = f"{runtime.world_size} processes" if runtime.distributed else "1 process"
            typer.echo(f"{section}: {split} accuracy {accuracy} at epoch {result.best_epoch}/{cfg.epochs}, "
                       f"{n_params:,} parameters, {processes} -> {output}")
    teardown_runtime(runtime)
