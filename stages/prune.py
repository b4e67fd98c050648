"""`micronet prune`: structured pruning to prune.rate of the parameters, in prune.steps steps with fine-tuning
between them. Writes the channel plan and weights (no pickled module)."""

from __future__ import annotations

from pathlib import Path

import typer

from stages.common import ParamsOption


def importance_loss(loader, batches: int, device):
    """Loss over a few validation batches, batch-wise (Taylor) or per sample (Hessian)."""
    import torch.nn.functional as F

    data = [(x.to(device), y.to(device)) for _, (x, y) in zip(range(batches), loader)]

    def loss_fn(model, per_sample: bool = False):
        model.eval()  # BN statistics and ShakeDrop stay fixed while scoring
        if not per_sample:
            return sum(F.cross_entropy(model(x), y) for x, y in data) / len(data)
        return (F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]) for x, y in data for i in range(len(y)))

    return loss_fn


def prune_command(
    params_path: Path = ParamsOption,
    input: Path = typer.Option(Path("models/train.pt"), "--input"),
    output: Path = typer.Option(Path("models/prune.pt"), "--output"),
    metrics: Path = typer.Option(Path("metrics/prune.json"), "--metrics"),
    plots: Path = typer.Option(Path("metrics/plots/prune.csv"), "--plots"),
) -> None:
    import torch
    import torch.nn as nn

    from micronet import runner
    from micronet.checkpoint import apply_channel_plan, channel_plan, load_model
    from micronet.compression.structured import count_parameters, prune_to_rate
    from micronet.tracking import stage_run
    from micronet.training import Runtime, broadcast_object, make_loader, setup_runtime, teardown_runtime

    params = runner.prepare(params_path)
    cfg = params.prune
    if not cfg.enabled:
        runner.skip_stage(input, output, {metrics: {}, plots: []})
        typer.echo(f"prune: switched off, passed {input} on to {output}")
        return
    runtime = setup_runtime(params.distributed)
    runner.seed_everything(params.train.seed)
    model, source = load_model(input)
    params_before = count_parameters(model)
    splits, train_data = runner.training_data(params, cfg.finetune, runtime, params.train.seed)
    scoring_set = splits.val or splits.train_eval
    example = torch.zeros(1, *scoring_set[0][0].shape, device=runtime.device)

    def prune(model: nn.Module, step: int, target: float) -> None:
        if runtime.is_main:
            loader = make_loader(scoring_set, params.data.eval_batch_size, Runtime(runtime.device), train=False,
                                 workers=0)
            prune_to_rate(
                model, example, target, params_before, criterion=cfg.criterion,
                loss_fn=importance_loss(loader, cfg.importance_batches, runtime.device),
                global_pruning=cfg.global_pruning, max_layer_rate=cfg.max_layer_rate, round_to=cfg.round_to,
            )
        # Rank 0 decides; the others take its shapes, and DDP hands them its weights.
        apply_channel_plan(model, broadcast_object(channel_plan(model), runtime))

    def measure(model: nn.Module, target: float) -> dict:
        n = count_parameters(model)
        rate = 1 - n / params_before
        if rate < target - 0.02 and runtime.is_main:
            typer.echo(f"warning: prune step reached rate {rate:.4f} < target {target:.4f}: every prunable layer "
                       f"is at prune.max_layer_rate ({cfg.max_layer_rate}); raise it or prune.steps", err=True)
        return {"rate": rate, "parameters": n}

    with stage_run("prune", params, params_path, enabled=runtime.is_main) as track:
        track.log_params({"prune": cfg.model_dump()})
        model, rows = runner.compress_in_steps(
            "prune", model, source, cfg, prune, measure,
            params=params, input=input, splits=splits, train=train_data, runtime=runtime, track=track, output=output,
        )
        if runtime.is_main:
            final = rows[-1]
            summary = {"rate": final["rate"], "parameters": final["parameters"], "parameters_before": params_before,
                       "val_accuracy": final["val_accuracy"]}
            runner.publish(track, {metrics: summary, plots: rows}, summary, steps=(plots, rows, "parameters"))
            accuracy = "n/a" if final["val_accuracy"] is None else f"{final['val_accuracy']:.4f}"
            typer.echo(f"prune: {params_before:,} -> {final['parameters']:,} parameters (rate {final['rate']:.4f}) "
                       f"in {len(rows)} steps, val accuracy {accuracy} -> {output}")
    teardown_runtime(runtime)
