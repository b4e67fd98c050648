"""`micronet quantize`: fold BatchNorm, round weights and activations to power-of-two fixed point, calibrate
activation ranges on the validation split; report accuracy before and after."""

from __future__ import annotations

from pathlib import Path

import typer

from stages.common import ParamsOption


def quantize_command(
    params_path: Path = ParamsOption,
    input: Path = typer.Option(Path("models/sparsify.pt"), "--input"),
    output: Path = typer.Option(Path("models/quantize.pt"), "--output"),
    metrics: Path = typer.Option(Path("metrics/quantize.json"), "--metrics"),
) -> None:
    import math

    from micronet import runner
    from micronet.checkpoint import load_model, make_checkpoint
    from micronet.compression.quantize import quantize_model
    from micronet.data import build_splits
    from micronet.scoring import foldable_batchnorms
    from micronet.tracking import stage_run
    from micronet.training import Runtime, evaluate, make_loader, setup_runtime

    # calibration is one process
    params = runner.prepare(params_path, "quantize", [output, metrics], single_process=True)
    cfg = params.quantize
    if not cfg.enabled:
        runner.skip_stage(input, output, {metrics: {}})
        typer.echo(f"quantize: switched off, passed {input} on to {output}")
        return
    runtime = Runtime(setup_runtime(params.distributed.model_copy(update={"nproc_per_node": 1})).device)
    runner.seed_everything(params.train.seed)
    model, source = load_model(input)
    model.to(runtime.device)
    splits = build_splits(params.data)
    calibration_set = splits.val or splits.train_eval
    loader = make_loader(calibration_set, params.data.eval_batch_size, runtime, train=False, workers=params.data.workers)
    available = math.ceil(len(calibration_set) / params.data.eval_batch_size)
    if cfg.calibration_batches > available:
        typer.echo(f"warning: quantize.calibration_batches is {cfg.calibration_batches} but the calibration split "
                   f"holds {available} batches of {params.data.eval_batch_size}: calibrating on {available}", err=True)
    before = evaluate(model, loader, runtime) if splits.val is not None else None
    input_size = tuple(calibration_set[0][0].shape)
    pairs = foldable_batchnorms(model, input_size) if cfg.fold_bn else []
    calibration = (x.to(runtime.device) for _, (x, _) in zip(range(cfg.calibration_batches), loader))
    example = calibration_set[0][0][None].to(runtime.device)
    info = quantize_model(
        model, pairs, calibration, weight_bits=cfg.weight_bits, activation_bits=cfg.activation_bits,
        method=cfg.range, weight_sigmas=cfg.weight_sigmas, activation_sigmas=cfg.activation_sigmas,
        momentum=cfg.momentum, points=cfg.activation_points, example=example,
    )
    after = evaluate(model, loader, runtime) if splits.val is not None else None

    with stage_run("quantize", params, params_path) as track:
        track.log_params({"quantize": cfg.model_dump()})
        summary = {
            "val_accuracy_before": before.top1 if before else None,
            "val_accuracy": after.top1 if after else None,
            "folded_batchnorms": len(info["spec"]["folded"]),
            "activation_quantizers": len(info["spec"]["activation_layers"]),
            "calibration_batches": info["calibration_batches"],
        }
        checkpoint = make_checkpoint(model, source["arch"], source["args"], stage="quantize",
                                     mlflow_run_id=track.run_id)
        runner.publish(track, {metrics: summary}, summary, checkpoint=(output, checkpoint))
        change = "" if before is None else f", val accuracy {before.top1:.4f} -> {after.top1:.4f}"
        typer.echo(f"quantize: {cfg.weight_bits}-bit weights, {cfg.activation_bits}-bit activations at "
                   f"{summary['activation_quantizers']} points, {summary['folded_batchnorms']} BatchNorms folded, "
                   f"calibrated on {info['calibration_batches']} batches{change} -> {output}")
