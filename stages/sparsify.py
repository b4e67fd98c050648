"""`micronet sparsify`: global magnitude pruning of conv and linear weights to sparsify.rate, in steps with masked
fine-tuning (geometric steps as Wave, linear rounds as KAIST); the zeros stay exactly zero in the checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from stages.common import ParamsOption


def sparsify_command(
    params_path: Path = ParamsOption,
    input: Path = typer.Option(Path("models/prune.pt"), "--input"),
    output: Path = typer.Option(Path("models/sparsify.pt"), "--output"),
    metrics: Path = typer.Option(Path("metrics/sparsify.json"), "--metrics"),
    plots: Path = typer.Option(Path("metrics/plots/sparsify.csv"), "--plots"),
    layers: Path = typer.Option(Path("metrics/sparsify_layers.json"), "--layers", help="per-layer sparsity"),
) -> None:
    import torch.nn as nn

    from micronet import runner
    from micronet.checkpoint import load_model, make_checkpoint
    from micronet.compression.sparsity import (
        apply_masks, global_magnitude_masks, overall_sparsity, prunable_weights, sparsity_report,
    )
    from micronet.tracking import stage_run
    from micronet.training import setup_runtime, teardown_runtime

    params = runner.prepare(params_path, "sparsify", [output, metrics, plots, layers])
    cfg = params.sparsify
    if not cfg.enabled:
        runner.skip_stage(input, output, {metrics: {}, layers: {}, plots: []})
        typer.echo(f"sparsify: switched off, passed {input} on to {output}")
        return
    runtime = setup_runtime(params.distributed)
    runner.seed_everything(params.train.seed)
    model, source = load_model(input)
    prunable_weights(model, cfg.exclude)  # fail fast on a misspelt exclude
    splits, train_data = runner.training_data(params, cfg.finetune, runtime, params.train.seed)

    def sparsify(model: nn.Module, step: int, target: float) -> dict:
        # Every rank holds the same weights (DDP), so every rank computes the same masks.
        masks = global_magnitude_masks(prunable_weights(model, cfg.exclude), target)
        apply_masks(model, masks)
        return masks

    def measure(model: nn.Module, target: float) -> dict:
        eligible = prunable_weights(model, cfg.exclude)  # the same layers the masks cover
        return {"sparsity": overall_sparsity({n: r for n, r in sparsity_report(model).items()
                                              if f"{n}.weight" in eligible})}

    with stage_run("sparsify", params, params_path, enabled=runtime.is_main) as track:
        track.log_params({"sparsify": cfg.model_dump()})
        model, rows = runner.compress_in_steps(
            "sparsify", model, source, cfg, sparsify, measure,
            params=params, input=input, splits=splits, train=train_data, runtime=runtime, track=track, output=output,
        )
        if runtime.is_main:
            report = sparsity_report(model)
            final = rows[-1]
            landed = final["sparsity"] >= cfg.rate - 1e-3  # global magnitude masks land within a weight or ties
            summary = {"sparsity": final["sparsity"], "sparsity_all_layers": overall_sparsity(report),
                       "val_accuracy": final["val_accuracy"], "target_sparsity": cfg.rate,
                       "reached_sparsity": final["sparsity"], "steps_used": len(rows), "target_reached": landed}
            runner.publish(track, {metrics: summary, layers: report, plots: rows}, summary,
                           steps=(plots, rows, "sparsity"),
                           checkpoint=(output, make_checkpoint(model, source["arch"], source["args"],
                                                               stage="sparsify")))
            runner.clear_steps(output)
            accuracy = "n/a" if final["val_accuracy"] is None else f"{final['val_accuracy']:.4f}"
            short = "" if landed else f" (target {cfg.rate:.2%} not reached)"
            typer.echo(f"sparsify: {final['sparsity']:.2%} of the eligible weights zero{short} in {len(rows)} steps, "
                       f"val accuracy {accuracy} -> {output}")
    teardown_runtime(runtime)
