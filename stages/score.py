"""`micronet score`: top-1/top-5 on the test split (the only stage that touches it), the official MicroNet
count and score, and `metrics/score.json` with a per-layer table beside it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import typer

from stages.common import ParamsOption


def chance(labels: list[int]) -> float:
    """The accuracy of always answering the test split's most common class: what "learned nothing" scores (0.01 on
    CIFAR-100), printed beside the accuracy so a toy run shows whether it learned."""
    return max(Counter(labels).values()) / len(labels)


def score_command(
    params_path: Path = ParamsOption,
    input: Path = typer.Option(Path("models/quantize.pt"), "--input"),
    metrics: Path = typer.Option(Path("metrics/score.json"), "--metrics"),
    table: Path = typer.Option(Path("metrics/score_layers.txt"), "--table", help="per-layer count table"),
) -> None:
    from micronet import runner
    from micronet.checkpoint import load_model
    from micronet.data import build_test
    from micronet.scoring import count
    from micronet.tracking import MODEL_NAME_TAG, MODEL_VERSION_TAG, QUALIFIES_TAG, RELEASED_TAG, stage_run
    from micronet.training import Runtime, evaluate, make_loader, setup_runtime

    params = runner.prepare(params_path, "score", [metrics, table], single_process=True)
    cfg = params.score
    runtime = Runtime(setup_runtime(params.distributed.model_copy(update={"nproc_per_node": 1})).device)
    model, source = load_model(input)
    model.to(runtime.device)
    test = build_test(params.data)
    result = evaluate(model, make_loader(test, params.data.eval_batch_size, runtime, train=False,
                                         workers=params.data.workers), runtime)
    counted = count(model, tuple(test[0][0].shape), freebie=cfg.freebie)
    qualifies = counted.qualifies(cfg.task, result.correct_top1, result.total)
    summary = {
        "accuracy": result.top1,
        "chance": chance(test.targets),
        "top5": result.top5,
        "correct": result.correct_top1,
        "total": result.total,
        "params": counted.params,
        "flops": counted.flops,
        "score": runner.significant(counted.score(cfg.task)),
        "qualifies": qualifies,
        "param_bits": counted.param_bits,
        "mults": counted.mults,
        "adds": counted.adds,
    }
    with stage_run("score", params, params_path) as track:
        track.set_tags({QUALIFIES_TAG: str(qualifies).lower(), "precision": "quantized" if counted.quantized else (
            "freebie" if counted.freebie else "32-bit"), "task": cfg.task}, parent=True)
        released = released_file(source)
        if released:
            track.set_tags({RELEASED_TAG: released}, parent=True)
        runner.publish(track, {metrics: summary, table: counted.table(tasks=[cfg.task]) + "\n"},
                       {k: summary[k] for k in ("accuracy", "top5", "params", "flops", "score")}, parent=True)
        if track.active:
            version = register(track, input, model, test, params.tracking.model_name,
                               {k: str(summary[k]).lower() for k in ("accuracy", "score", "qualifies")})
            track.set_tags({MODEL_NAME_TAG: version.name, MODEL_VERSION_TAG: version.version}, parent=True)
            typer.echo(f"score: registered as MLflow model models:/{version.name}/{version.version}")
    typer.echo(
        f"score ({cfg.task}, {source.get('stage') or 'checkpoint'}): accuracy {summary['accuracy']:.4f} "
        f"({summary['correct']}/{summary['total']}; chance {summary['chance']:.4f}), params {summary['params']:,.2f}, "
        f"flops {summary['flops']:,.2f}, "
        f"score {summary['score']:.6g}, qualifies {str(qualifies).lower()}; per-layer table in {table}"
    )


def released_file(checkpoint: dict) -> str | None:
    """The released file a checkpoint holds unchanged (written by `micronet import`, no stage since), or None."""
    source = checkpoint.get("source")
    return source.get("file") if checkpoint.get("stage") == "import" and isinstance(source, dict) else None


def register(track, checkpoint: Path, model, test, name: str, tags: dict[str, str]):
    """The scored checkpoint as a new version of registered model `name`; the first test image (as the score
    stage saw it) is its input example (one: MLflow stores it as JSON, ~3 MB for an ImageNet image)."""
    import torch

    from micronet.registry import log_and_register

    images = test[0][0].unsqueeze(0)
    device = next(model.parameters()).device
    model.eval()  # counting traced it in train mode: the example's logits are inference logits
    with torch.no_grad():
        logits = model(images.to(device)).float().cpu()
    return log_and_register(track.client, track.run_id, checkpoint, images, logits, name, tags)
