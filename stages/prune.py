"""`micronet prune`: structured pruning to prune.rate of the parameters, in steps with fine-tuning between them:
Wave's EigenDamage (low-rank in the K-FAC eigenbasis, with bring-back steps) or Torch-Pruning channel removal.
Writes the factorization / channel plan and the weights (no pickled module)."""

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
    import torch.nn as nn

    from micronet import runner
    from micronet.checkpoint import load_model, make_checkpoint
    from micronet.compression import count_parameters
    from micronet.tracking import stage_run
    from micronet.training import setup_runtime, teardown_runtime

    params = runner.prepare(params_path, "prune", [output, metrics, plots])
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

    def measure(model: nn.Module, target: float) -> dict:
        n = count_parameters(model)
        rate = 1 - n / params_before
        if cfg.method == "channels" and rate < target - 0.02 and runtime.is_main:
            typer.echo(f"warning: prune step reached rate {rate:.4f} < target {target:.4f}: every prunable layer "
                       f"is at prune.max_layer_rate ({cfg.max_layer_rate}); raise it or prune.steps", err=True)
        return {"rate": rate, "compression": rate, "parameters": n}

    if cfg.method == "eigendamage":
        compress, extra = eigendamage_steps(cfg, params, train_data, runtime, params_before)
    else:
        compress, extra = channel_steps(cfg, params, splits, runtime, params_before), {}

    with stage_run("prune", params, params_path, enabled=runtime.is_main) as track:
        track.log_params({"prune": cfg.model_dump()})
        model, rows = runner.compress_in_steps(
            "prune", model, source, cfg, compress, measure, params=params, input=input, splits=splits,
            train=train_data, runtime=runtime, track=track, output=output, **extra,
        )
        if runtime.is_main:
            unpruned = {"rate": 0.0, "parameters": params_before, "val_accuracy": None}  # every step undone
            final = next((r for r in reversed(rows) if not r.get("undone")), unpruned)
            landed = final["parameters"] <= (1 - cfg.rate) * params_before
            summary = {"rate": final["rate"], "parameters": final["parameters"], "parameters_before": params_before,
                       "val_accuracy": final["val_accuracy"], "steps": len(rows),
                       "target_rate": cfg.rate, "reached_rate": final["rate"], "steps_used": len(rows),
                       "steps_allowed": cfg.steps, "target_reached": landed,
                       "step_kinds": ",".join(r["kind"] for r in rows)}
            runner.publish(track, {metrics: summary, plots: rows}, summary, steps=(plots, rows, "parameters"),
                           checkpoint=(output, make_checkpoint(model, source["arch"], source["args"], stage="prune")))
            runner.clear_steps(output)
            accuracy = "n/a" if final["val_accuracy"] is None else f"{final['val_accuracy']:.4f}"
            reached = "" if landed else f" (target {cfg.rate} not reached)"
            typer.echo(f"prune ({cfg.method}): {params_before:,} -> {final['parameters']:,} parameters (rate "
                       f"{final['rate']:.4f}{reached}) in {len(rows)} steps, val accuracy {accuracy} -> {output}")
    teardown_runtime(runtime)


def channel_steps(cfg, params, splits, runtime, params_before: int):
    """Torch-Pruning channel removal towards each step's rate, importance scored on the validation split."""
    import torch

    from micronet.checkpoint import apply_channel_plan, channel_plan
    from micronet.compression.structured import prune_to_rate
    from micronet.training import Runtime, broadcast_object, make_loader

    scoring_set = splits.val or splits.train_eval
    example = torch.zeros(1, *scoring_set[0][0].shape, device=runtime.device)

    def prune(model, step: int, target: float) -> None:
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

    return prune


def eigendamage_steps(cfg, params, train_data, runtime, params_before: int):
    """Wave's schedule: prune steps (K-FAC statistics on the training split, then the lowest-saliency eigen-
    directions go) while no step has yet left the network smaller than it started, then prune and bring-back
    steps alternating (micronet.compression.eigendamage.next_step_kind), each fine-tuned with its own recipe, at
    the batches prune.batch_schedule gives the compression reached (step_batches), and for
    prune.negative_compression_epochs after a step that leaves it no smaller; stop once a prune step reaches
    prune.rate (that step removes only what is left to reach it), or undo a step that leaves the accuracy its
    fine-tuning selected on (validation, or test under select: test) below prune.min_accuracy.
    Every rank runs the same decisions (statistics are all-reduced, eigenbases broadcast, the bring-back draw
    seeded alike)."""
    import math

    import torch

    from micronet import runner
    from micronet.compression import count_parameters
    from micronet.compression.eigendamage import (
        BringBackPool, bring_back_step, collect_kfac, next_step_kind, prune_step, step_batches,
    )
    from micronet.training import make_loader

    back_recipe = cfg.bring_back_finetune or cfg.finetune
    base_batch = cfg.finetune.batch_size or params.data.batch_size
    base_kfac = cfg.kfac_batch_size or base_batch

    def compressions(rows) -> list[float]:
        return [r["compression"] for r in rows]

    def plan(step: int, rows) -> runner.Step:
        kind = next_step_kind([r["kind"] for r in rows], compressions(rows), brings_back=bool(cfg.back_ratio))
        kfac = step_batches(compressions(rows), cfg.batch_schedule, base_batch, base_kfac)[1]
        extra = {"kfac_batch": kfac} if kind == "prune" else {}
        return runner.Step(cfg.rate, cfg.finetune if kind == "prune" else back_recipe, kind, extra)

    def refine(step: int, spec: runner.Step, model, rows) -> runner.Step:
        compression = 1 - count_parameters(model) / params_before
        batch = step_batches([*compressions(rows), compression], cfg.batch_schedule, base_batch, base_kfac)[0]
        update = {"batch_size": batch}
        if compression <= 0 and cfg.negative_compression_epochs is not None:
            update["epochs"] = cfg.negative_compression_epochs
        return runner.Step(spec.target, spec.finetune.model_copy(update=update), spec.kind, spec.extra)

    class PoolState(runner.StepState):
        def __init__(self) -> None:
            self.pool = BringBackPool()
            self.generator = torch.Generator().manual_seed(params.train.seed)
            self.kind = "prune"
            self.kfac_batch = base_kfac

        def to_state(self):
            return {"pool": self.pool.to_state(), "generator": self.generator.get_state()}

        def load_state(self, state) -> None:
            self.pool = BringBackPool.from_state(state["pool"])
            self.generator.set_state(state["generator"])

    state = PoolState()

    def chosen(step: int, rows) -> runner.Step:
        spec = plan(step, rows)
        state.kind, state.kfac_batch = spec.kind, spec.extra.get("kfac_batch", base_kfac)
        return spec

    def compress(model, step: int, target: float) -> None:
        if state.kind == "bring_back":
            bring_back_step(model, state.pool, cfg.back_ratio, state.generator, noise=cfg.back_noise,
                            shared_noise=cfg.back_noise_shared)
            return None
        loader = train_data
        if isinstance(train_data, torch.utils.data.Dataset):
            loader = make_loader(train_data, state.kfac_batch, runtime, train=True, workers=params.data.workers,
                                 seed=params.train.seed + step)
        elif hasattr(loader, "set_batch_size"):  # the GPU loader: reseeded and resized for this pass
            loader.set_seed(params.train.seed + step)
            loader.set_batch_size(max(1, state.kfac_batch // runtime.world_size))
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(step)
        stats = collect_kfac(model, loader, runtime.device, cfg.kfac_batches, exclude=cfg.exclude,
                             train_mode=cfg.kfac_train_mode, seed=params.train.seed + step)
        prune_step(model, stats, cfg.step_rate, cfg.max_layer_rate, state.pool,
                   max_parameters=math.floor((1 - target) * params_before))
        return None

    def reached(row) -> bool:
        return row["kind"] == "prune" and row["parameters"] <= math.floor((1 - cfg.rate) * params_before)

    def accurate(row) -> bool:
        return cfg.min_accuracy is None or row["val_accuracy"] is None or row["val_accuracy"] >= cfg.min_accuracy

    return compress, {"plan": chosen, "refine": refine, "recipes": [cfg.finetune, back_recipe], "stop": reached,
                      "accept": accurate, "state": state}
