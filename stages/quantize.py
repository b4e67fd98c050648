"""`micronet quantize`: fold BatchNorm, round weights and activations to power-of-two fixed point, calibrate
activation ranges on the validation split, optionally fine-tune quantization-aware (`quantize.finetune`); report
accuracy before and after, and how closely the quantized model follows its float input."""

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
    from micronet.compression.quantize import QuantizationAware, fidelity, predictions, quantize_model, sparsity_masks
    from micronet.data import build_splits, num_classes
    from micronet.scoring import foldable_batchnorms
    from micronet.tracking import stage_run
    from micronet.training import Runtime, clear_resume, fit, make_loader, setup_runtime

    # calibration and fine-tuning: one process
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
    masks = sparsity_masks(model)
    if cfg.finetune is not None:
        splits, train_data = runner.training_data(params, cfg.finetune, runtime, params.train.seed)
    else:
        splits, train_data = build_splits(params.data), None
    calibration_set = splits.val or splits.train_eval
    loader = make_loader(calibration_set, params.data.eval_batch_size, runtime, train=False, workers=params.data.workers)
    available = math.ceil(len(calibration_set) / params.data.eval_batch_size)
    if cfg.calibration_batches > available:
        typer.echo(f"warning: quantize.calibration_batches is {cfg.calibration_batches} but the calibration split "
                   f"holds {available} batches of {params.data.eval_batch_size}: calibrating on {available}", err=True)
    reference, labels = predictions(model, loader, runtime.device)  # the float model, once
    top1 = lambda logits: float((logits.argmax(1) == labels).double().mean())  # noqa: E731
    input_size = tuple(calibration_set[0][0].shape)
    pairs = foldable_batchnorms(model, input_size) if cfg.fold_bn else []
    calibration = (x.to(runtime.device) for _, (x, _) in zip(range(cfg.calibration_batches), loader))
    example = calibration_set[0][0][None].to(runtime.device)
    info = quantize_model(
        model, pairs, calibration, weight_bits=cfg.weight_bits, activation_bits=cfg.activation_bits,
        layer_bits=cfg.layer_bits, per_channel=cfg.exponents == "per_channel", method=cfg.range, weight_sigmas=cfg.weight_sigmas, activation_sigmas=cfg.activation_sigmas,
        momentum=cfg.momentum, points=cfg.activation_points, example=example,
    )
    quantized = predictions(model, loader, runtime.device)[0]
    validating = splits.val is not None  # else the images are training images: no accuracy to report
    summary = {
        "val_accuracy_before": top1(reference) if validating else None,
        "val_accuracy": top1(quantized) if validating else None,
        **fidelity(reference, quantized),
        "folded_batchnorms": len(info["spec"]["folded"]),
        "activation_quantizers": len(info["spec"]["activation_layers"]),
        "calibration_batches": info["calibration_batches"],
    }

    with stage_run("quantize", params, params_path) as track:
        track.log_params({"quantize": cfg.model_dump()})
        if cfg.finetune is not None:
            qat = QuantizationAware(model)
            resume = runner.resume_file(output)
            recipe = cfg.finetune.model_copy(update={"precision": "fp32"})  # bf16 would blur the grid
            runner.tag_selection(track, [cfg.finetune], params)
            fit(qat, train_data, runner.selection_split(splits, cfg.finetune, params), recipe, runtime,
                masks=qat.masks(masks),
                batch_size=cfg.finetune.batch_size or params.data.batch_size, workers=params.data.workers,
                seed=params.train.seed, num_classes=num_classes(params.data), resume_path=resume,
                fingerprint=runner.fingerprint(input, params.data.model_dump(), cfg.model_dump(), params.train.seed),
                desc="quantize (QAT)",
                on_epoch=lambda r: track.log_metrics({f"finetune_{k}": v for k, v in r.items() if k != "epoch"},
                                                     r["epoch"]))
            model = qat.finish()
            ptq = {f"{k}_ptq": summary[k] for k in ("val_accuracy", "agreement", "logit_relative_error")}
            quantized = predictions(model, loader, runtime.device)[0]
            summary.update(ptq, val_accuracy=top1(quantized) if validating else None, **fidelity(reference, quantized))
        checkpoint = make_checkpoint(model, source["arch"], source["args"], stage="quantize",
                                     mlflow_run_id=track.run_id)
        runner.publish(track, {metrics: summary}, summary, checkpoint=(output, checkpoint))
        if cfg.finetune is not None:
            clear_resume(runner.resume_file(output), runtime)  # only once every output is in place
        change = "" if not validating else (f", val accuracy {summary['val_accuracy_before']:.4f} -> "
                                            f"{summary['val_accuracy']:.4f}")
        tuned = f", fine-tuned {cfg.finetune.epochs} epochs quantization-aware" if cfg.finetune is not None else ""
        typer.echo(f"quantize: {cfg.weight_bits}-bit weights, {cfg.activation_bits}-bit activations at "
                   f"{summary['activation_quantizers']} points, {summary['folded_batchnorms']} BatchNorms folded, "
                   f"calibrated on {info['calibration_batches']} batches{tuned}{change}, top-1 agreement with the "
                   f"float model {summary['agreement']:.4f} (logits off by {summary['logit_relative_error']:.3g})"
                   f" -> {output}")
