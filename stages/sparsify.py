"""`micronet sparsify`: global magnitude pruning of conv and linear weights to sparsify.rate, in steps with
masked fine-tuning; the zeros stay exactly zero in the saved checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from micronet import runner
from micronet.checkpoint import atomic_save, build_from_checkpoint, load_model, make_checkpoint
from micronet.compression.sparsity import (
    apply_masks, global_magnitude_masks, overall_sparsity, prunable_weights, sparsity_report, step_rates,
)
from micronet.data import build_splits
from micronet.tracking import stage_run
from micronet.training import clear_resume, fit, setup_runtime, teardown_runtime
from stages.common import ParamsOption


def sparsify_command(
    params_path: Path = ParamsOption,
    input: Path = typer.Option(Path("models/prune.pt"), "--input"),
    output: Path = typer.Option(Path("models/sparsify.pt"), "--output"),
    metrics: Path = typer.Option(Path("metrics/sparsify.json"), "--metrics"),
    plots: Path = typer.Option(Path("metrics/plots/sparsify.csv"), "--plots"),
) -> None:
    params = runner.prepare(params_path)
    cfg = params.sparsify
    if not cfg.enabled:
        runner.pass_through(input, output)
        runner.write_json(metrics, {"enabled": False})
        runner.write_csv(plots, [])
        return
    runtime = setup_runtime(params.distributed)
    runner.seed_everything(params.train.seed)
    model, source = load_model(input)
    prunable_weights(model, cfg.exclude)  # fail fast on a misspelt exclude
    finetune = cfg.finetune
    splits = build_splits(params.data.model_copy(update={"augment": finetune.augment or params.data.augment}))
    progress = runner.StepProgress(runner.resume_file(output, ".steps"), runner.fingerprint(
        input, params.data.model_dump(), cfg.model_dump()))
    rows: list[dict] = []
    first_step = 0
    if (state := progress.load()) is not None:
        model = build_from_checkpoint(state["checkpoint"])
        rows, first_step = state["rows"], state["step"] + 1
    model.to(runtime.device)

    with stage_run("sparsify", params.tracking, params.model_dump(), params_path, enabled=runtime.is_main) as track:
        track.log_params({"sparsify": cfg.model_dump()})
        for step, target in enumerate(step_rates(cfg.rate, cfg.steps)):
            if step < first_step:
                continue
            masks = global_magnitude_masks(prunable_weights(model, cfg.exclude), target)
            apply_masks(model, masks)
            resume = runner.resume_file(output, f".step{step}")
            result = fit(
                model, splits.train, splits.val, finetune, runtime, masks=masks,
                batch_size=finetune.batch_size or params.data.batch_size, workers=params.data.workers,
                seed=params.train.seed + step, resume_path=resume, fingerprint=progress.key,
                desc=f"sparsify {step + 1}/{cfg.steps}",
                on_epoch=lambda r, s=step: track.log_metrics(
                    {f"finetune_{k}": v for k, v in r.items() if k != "epoch"}, s * max(1, finetune.epochs) + r["epoch"]),
            )
            report = sparsity_report(model)
            eligible = {n: r for n, r in report.items() if n not in cfg.exclude}
            row = {"step": step + 1, "target_rate": target, "sparsity": overall_sparsity(eligible),
                   "val_accuracy": result.best_val_top1}
            rows.append(row)
            if runtime.is_main:
                track.log_metrics({k: v for k, v in row.items() if k != "step" and v is not None}, step + 1)
                progress.save(step, make_checkpoint(model, source["arch"], source["args"]), rows)
                clear_resume(resume, runtime)

        if runtime.is_main:
            atomic_save(make_checkpoint(model, source["arch"], source["args"], stage="sparsify"), output)
            report = sparsity_report(model)
            final = rows[-1]
            summary = {"enabled": True, "target_rate": cfg.rate, "sparsity": final["sparsity"],
                       "sparsity_all_layers": overall_sparsity(report), "val_accuracy": final["val_accuracy"],
                       "steps": rows, "layers": report}
            runner.write_json(metrics, summary)
            runner.write_csv(plots, rows)
            track.log_metrics({"sparsity": final["sparsity"],
                               **({"val_accuracy": final["val_accuracy"]} if final["val_accuracy"] is not None else {})})
            track.log_artifact(metrics)
            progress.clear()
    teardown_runtime(runtime)
