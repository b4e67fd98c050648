"""`micronet prune`: structured pruning to prune.rate of the parameters, in prune.steps steps with
fine-tuning between them. Writes the channel plan and weights (no pickled module)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import typer

from micronet import runner
from micronet.checkpoint import (
    apply_channel_plan, atomic_save, build_from_checkpoint, channel_plan, load_model, make_checkpoint,
)
from micronet.compression.sparsity import step_rates
from micronet.compression.structured import count_parameters, prune_to_rate
from micronet.data import build_splits
from micronet.tracking import stage_run
from micronet.training import (
    Runtime, broadcast_object, clear_resume, fit, make_loader, setup_runtime, teardown_runtime,
)
from stages.common import ParamsOption


def importance_loss(loader, batches: int, device: torch.device):
    """Loss over a few validation batches, batch-wise (Taylor) or per sample (Hessian)."""
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
    params = runner.prepare(params_path)
    cfg = params.prune
    if not cfg.enabled:
        runner.pass_through(input, output)
        runner.write_json(metrics, {"enabled": False})
        runner.write_csv(plots, [])
        return
    runtime = setup_runtime(params.distributed)
    runner.seed_everything(params.train.seed)
    model, source = load_model(input)
    model.to(runtime.device)
    params_before = count_parameters(model)
    finetune = cfg.finetune
    splits = build_splits(params.data.model_copy(update={"augment": finetune.augment or params.data.augment}))
    scoring_set = splits.val or splits.train
    example = torch.zeros(1, *scoring_set[0][0].shape, device=runtime.device)
    progress = runner.StepProgress(runner.resume_file(output, ".steps"), runner.fingerprint(
        input, params.data.model_dump(), cfg.model_dump()))
    rows: list[dict] = []
    first_step = 0
    if (state := progress.load()) is not None:
        model = build_from_checkpoint(state["checkpoint"]).to(runtime.device)
        rows, first_step = state["rows"], state["step"] + 1

    with stage_run("prune", params.tracking, params.model_dump(), params_path, enabled=runtime.is_main) as track:
        track.log_params({"prune": cfg.model_dump()})
        for step, target in enumerate(step_rates(cfg.rate, cfg.steps)):
            if step < first_step:
                continue
            if runtime.is_main:
                loader = make_loader(scoring_set, params.data.eval_batch_size, Runtime(runtime.device),
                                     train=False, workers=0)
                prune_to_rate(
                    model, example, target, params_before, criterion=cfg.criterion,
                    loss_fn=importance_loss(loader, cfg.importance_batches, runtime.device),
                    global_pruning=cfg.global_pruning, max_layer_rate=cfg.max_layer_rate, round_to=cfg.round_to,
                )
            # Rank 0 decides; the others take its shapes, and DDP hands them its weights.
            apply_channel_plan(model, broadcast_object(channel_plan(model), runtime))
            model.to(runtime.device)
            resume = runner.resume_file(output, f".step{step}")
            result = fit(
                model, splits.train, splits.val, finetune, runtime,
                batch_size=finetune.batch_size or params.data.batch_size, workers=params.data.workers,
                seed=params.train.seed + step, resume_path=resume, fingerprint=progress.key, desc=f"prune {step + 1}/{cfg.steps}",
                on_epoch=lambda r, s=step: track.log_metrics(
                    {f"finetune_{k}": v for k, v in r.items() if k != "epoch"}, s * max(1, finetune.epochs) + r["epoch"]),
            )
            n = count_parameters(model)
            row = {"step": step + 1, "target_rate": target, "rate": 1 - n / params_before, "parameters": n,
                   "val_accuracy": result.best_val_top1}
            rows.append(row)
            if runtime.is_main:
                track.log_metrics({k: v for k, v in row.items() if k != "step" and v is not None}, step + 1)
                progress.save(step, make_checkpoint(model, source["arch"], source["args"]), rows)
                clear_resume(resume, runtime)

        if runtime.is_main:
            atomic_save(make_checkpoint(model, source["arch"], source["args"], stage="prune"), output)
            final = rows[-1]
            summary = {"enabled": True, "criterion": cfg.criterion, "target_rate": cfg.rate,
                       "rate": final["rate"], "parameters_before": params_before, "parameters": final["parameters"],
                       "val_accuracy": final["val_accuracy"], "steps": rows}
            runner.write_json(metrics, summary)
            runner.write_csv(plots, rows)
            track.log_metrics({"rate": final["rate"], "parameters": final["parameters"],
                               **({"val_accuracy": final["val_accuracy"]} if final["val_accuracy"] is not None else {})})
            track.log_artifact(metrics)
            progress.clear()
    teardown_runtime(runtime)
