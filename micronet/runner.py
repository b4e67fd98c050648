"""What every stage does around its library call: validate the whole params file first, relaunch itself under
torchrun when asked for several processes, seed, and write metrics (JSON) and curves (CSV) for DVC."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from micronet.checkpoint import atomic_save, disk_error, file_digest, write_temporary
from micronet.config import OptimConfig, Params, PruneConfig, SparsifyConfig, load_params
from micronet.data import Splits, build_splits, ensure_dataset
from micronet.errors import MicronetError
from micronet.training import seed_everything  # noqa: F401 - the stages seed through the runner
from micronet.tracking import SELECT_TAG


# The params each stage command reads, as its dvc.yaml stage lists them (tests/test_reliability.py checks every
# pipeline): they must be in the params file, so a deleted section fails instead of running on built-in defaults.
STAGE_PARAMS = {
    "train": ["data", "model", "{section}", "distributed"],  # "model": unless {section}.model names the network
    "prune": ["data", "prune", "train.seed", "distributed"],
    "sparsify": ["data", "sparsify", "train.seed", "distributed"],
    "quantize": ["data", "quantize", "train.seed", "distributed.device"],
    "score": ["data", "score", "distributed.device"],
}


def stage_params(params: Params, stage: str, section: str = "train") -> list[str]:
    keys = [key.format(section=section) for key in STAGE_PARAMS[stage]]
    if stage == "train" and section in params.explicit_sections() and params.training(section).model is not None:
        keys.remove("model")
    return keys


def require_params(params: Params, params_path: Path, stage: str, section: str = "train") -> None:
    """Every section the stage reads is written in the params file: none falls back to a built-in default."""
    for key in stage_params(params, stage, section):
        if not params.has(key):
            raise MicronetError(f"{params_path}: key '{key}' is missing; `micronet {stage}` reads it and uses no "
                                f"built-in default: add it (pipelines/demo/params.yaml shows every section)")


def prepare(params_path: Path, stage: str, outputs: Iterable[Path], section: str = "train",
            single_process: bool = False) -> Params:
    """Validate params (and that the `stage` finds every section it reads), check that every output can be
    written, and make sure the data set is there (download once, write a synthetic one, or fail in one line).
    If distributed.nproc_per_node > 1 and we are not under torchrun yet, re-run this very command under
    `torchrun --nproc-per-node N` and exit with its status (not for `single_process` stages such as score)."""
    params = load_params(params_path)
    require_params(params, params_path, stage, section)
    if any(r.deterministic for r in params.recipes().values()):  # before cuBLAS starts (torchrun children inherit)
        from micronet.training import CUBLAS_WORKSPACE

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    check_writable(outputs)
    n = params.distributed.nproc_per_node
    if "LOCAL_RANK" in os.environ:
        return params
    try:
        ensure_dataset(params.data)
    except MicronetError as exc:
        raise MicronetError(f"{params_path}: key 'data.root' = {params.data.root!r}: {exc}") from None
    if single_process:
        return params
    gpus = torch.cuda.device_count()
    if n > 1 and params.distributed.device != "cpu" and gpus < n:
        raise MicronetError(
            f"{params_path}: key 'distributed.nproc_per_node' = {n}, but {gpus} GPU(s) are visible; "
            f"set it to at most {gpus} (or distributed.device: cpu for {n} CPU processes)"
        )
    if n > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               "-m", "micronet.cli", *sys.argv[1:]]
        raise SystemExit(subprocess.call(cmd))
    return params


def fingerprint(*parts: Any) -> str:
    """Identifies the work a resume file belongs to: a changed parameter or input starts afresh."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            h.update(file_digest(part).encode())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def training_data(params: Params, recipe: OptimConfig, runtime: Any, seed: int = 0) -> tuple[Splits, Any]:
    """The splits for a recipe (its own augmentation if it sets one, else data.augment / data.copies) and what
    the loop trains on: the training Dataset (DataLoader workers) or, with data.loader: gpu, the GPU-resident
    loader. A recipe whose augmentation has no batched GPU version falls back to workers, and says why."""
    data = params.data
    if recipe.augment is not None:
        data = data.model_copy(update={"augment": recipe.augment, "copies": []})
    splits = build_splits(data)
    if data.loader != "gpu":
        return splits, splits.train
    from torch.utils.data import ConcatDataset

    from micronet.data import CIFAR100_MEAN, CIFAR100_STD
    from micronet.data.gpu import GpuCifarLoader, gpu_supported
    from micronet.training import precision_of

    for augment in splits.augments:
        supported, why = gpu_supported(augment)
        if not supported:
            print(f"warning: data.loader gpu: {why}; training on DataLoader workers instead", file=sys.stderr)
            return splits, splits.train
    copies = splits.train.datasets if isinstance(splits.train, ConcatDataset) else [splits.train]
    batch = recipe.batch_size or data.batch_size
    loader = GpuCifarLoader.from_subsets(
        list(zip(copies, splits.augments)), max(1, batch // runtime.world_size), device=runtime.device,
        mean=data.mean or CIFAR100_MEAN, std=data.std or CIFAR100_STD, rank=runtime.rank,
        world_size=runtime.world_size, seed=seed, channels_last=precision_of(recipe, runtime)[1],
    )
    return splits, loader


def selection_split(splits: Splits, recipe: OptimConfig, params: Params) -> Any:
    """The split `fit` selects on and reports: the test split under select: test (the teams' protocol, tagged),
    else the validation split (None when data.val_size is 0: the last epoch is kept)."""
    return splits.test if recipe.selection(params.data.val_size) == "test" else splits.val


def tag_selection(track: Any, recipes: Iterable[OptimConfig], params: Params) -> None:
    """Tag the stage run with what it selected on; a pipeline run with any stage selecting on the test split is
    tagged on its parent too, and the report marks it "selected on test, as published"."""
    chosen = sorted({r.selection(params.data.val_size) for r in recipes})
    if "test" in chosen:
        track.set_tags({SELECT_TAG: "test"}, parent=True)
    track.set_tags({SELECT_TAG: ",".join(chosen)})


def sibling(path: Path, suffix: str) -> Path:
    """metrics/train.json -> metrics/train_layers.json: per-layer detail kept out of the headline metrics."""
    return path.with_name(f"{path.stem}{suffix}{path.suffix}")


def significant(value: Any, digits: int = 6) -> Any:
    """Floats to `digits` significant digits, so `dvc metrics show` / `dvc exp show` stay narrow."""
    if isinstance(value, float) and value and not isinstance(value, bool):
        return float(f"{value:.{digits}g}")
    return value


def csv_bytes(rows: Iterable[dict[str, Any]]) -> bytes:
    rows = list(rows)
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=fields or ["epoch"])
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def _writer(path: Path, data: Any) -> Callable[[Any], Any]:
    """torch.save for checkpoints (.pt), CSV for lists of rows (DVC plots), text as is, JSON for dicts (metrics)."""
    if isinstance(data, bytes):
        return lambda f: f.write(data)
    if path.suffix == ".pt":
        return lambda f: torch.save(data, f)
    if isinstance(data, list):
        return lambda f: f.write(csv_bytes(data))
    if isinstance(data, str):
        return lambda f: f.write(data.encode())
    return lambda f: f.write((json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def check_writable(paths: Iterable[Path]) -> None:
    """Before any work: every output's folder takes a new file (a read-only folder or disk fails here, in one
    line, not after hours of training)."""
    for path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_temporary(path, lambda f: None).unlink()
        except OSError as exc:
            raise disk_error(exc, path) from None


def write_outputs(files: dict[Path, Any]) -> None:
    """All of a stage's outputs as one unit: each written to a temporary beside it, and only when all are
    written, renamed over the old ones. A failure (full disk, read-only folder) leaves every previous output."""
    written: dict[Path, Path] = {}
    try:
        for path, data in files.items():
            written[path] = write_temporary(path, _writer(path, data))
        for path, tmp in written.items():
            os.replace(tmp, path)
    except OSError as exc:
        raise disk_error(exc, path) from None
    finally:
        for tmp in written.values():
            tmp.unlink(missing_ok=True)


def publish(
    track: Any, files: dict[Path, Any], metrics: dict[str, Any], parent: bool = False,
    curves: Optional[tuple[Path, list[dict[str, Any]]]] = None,
    steps: Optional[tuple[Path, list[dict[str, Any]], str]] = None,
    checkpoint: Optional[tuple[Path, dict[str, Any]]] = None,
) -> None:
    """A stage's results: files for DVC (with the `checkpoint`, written as one unit), the same files (not the
    checkpoint) as MLflow artifacts, headline numbers as MLflow metrics, and pictures of the curves (per-epoch
    `curves`, per-step `steps`) as PNG artifacts beside the CSVs."""
    write_outputs({**dict([checkpoint] if checkpoint else []), **files})
    # yes/no results (qualifies) are tags, set by the stage: as a metric they would plot as a 0/1 curve
    track.log_metrics({k: float(v) for k, v in metrics.items() if v is not None and not isinstance(v, (str, bool))},
                      parent=parent)
    for path in files:
        track.log_artifact(path)
    if track.active and (curves or steps):
        import tempfile

        from micronet import plots

        with tempfile.TemporaryDirectory() as tmp:
            if curves and curves[1]:
                png = Path(tmp) / f"{curves[0].stem}.png"
                plots.training_curves(curves[1], png)
                track.log_artifact(png)
            if steps and any(r.get("val_accuracy") is not None for r in steps[1]):  # nothing to draw without val
                png = Path(tmp) / f"{steps[0].stem}.png"
                plots.compression_steps(steps[1], png, x=steps[2])
                track.log_artifact(png)


def skip_stage(source: Path, target: Path, files: dict[Path, Any]) -> None:
    """A switched-off stage hands its input on unchanged and still writes the outputs DVC expects."""
    write_outputs({target: source.read_bytes(), **files})


def resume_file(output: Path, tag: str = "") -> Path:
    """Where a stage keeps its interruption state: beside its output, never a DVC output itself."""
    return output.with_name(f"{output.stem}{tag}.resume.pt")


class StepProgress:
    """Step-level resume for multi-step stages (prune, sparsify): after each finished step the model, the results so
    far and any extra state (e.g. EigenDamage's bring-back pool) are saved; a re-run with the same fingerprint
    continues after the last finished step."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key

    def load(self) -> dict[str, Any] | None:
        from micronet.checkpoint import load_resume

        return load_resume(self.path, self.key, ("fingerprint", "step", "checkpoint", "rows", "extra"))

    def save(self, step: int, checkpoint: dict[str, Any], rows: list[dict[str, Any]], extra: Any = None) -> None:
        atomic_save({"fingerprint": self.key, "step": step, "checkpoint": checkpoint, "rows": rows, "extra": extra},
                    self.path)


class StepState:
    """Extra state a compression method carries from step to step and must survive an interruption."""

    def to_state(self) -> Any:
        return None

    def load_state(self, state: Any) -> None:
        pass


@dataclass
class Step:
    """One step of a multi-step stage: the rate it aims at and the recipe of the fine-tuning after it."""

    target: float
    finetune: OptimConfig
    kind: str = "compress"
    extra: dict[str, Any] = field(default_factory=dict)  # what the step's row reports beside the measurements


def compress_in_steps(
    stage: str,
    model: torch.nn.Module,
    source: dict[str, Any],
    section: PruneConfig | SparsifyConfig,
    compress: Callable[[torch.nn.Module, int, float], Optional[dict]],
    measure: Callable[[torch.nn.Module, float], dict[str, Any]],
    *,
    params: Params,
    input: Path,
    splits: Any,
    runtime: Any,
    track: Any,
    output: Path,
    train: Any = None,
    plan: Optional[list[Step] | Callable[[int, list[dict[str, Any]]], Step]] = None,
    refine: Optional[Callable[[int, Step, torch.nn.Module, list[dict[str, Any]]], Step]] = None,
    recipes: Optional[list[OptimConfig]] = None,
    stop: Optional[Callable[[dict[str, Any]], bool]] = None,
    accept: Optional[Callable[[dict[str, Any]], bool]] = None,
    state: Optional[StepState] = None,
) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    """The loop prune and sparsify share: per step, `compress` the model towards that step's rate (it may
    return sparsity masks), fine-tune with the one training loop, `measure` the result. The stage writes the final
    checkpoint with its other outputs, then calls `clear_steps`. Resumes after the last finished step, and within
    a step after the last epoch.

    `plan` defaults to the section's step rates, each fine-tuned with section.finetune; a callable plan(step, rows)
    decides each step from the rows of the steps before it (at most section.steps steps; `recipes` lists every
    fine-tuning it may pick, for the selection tags), and refine(step, spec, model, rows), called after `compress`,
    may change the step's fine-tuning from what the compression reached. A training loader with set_seed /
    set_batch_size (the GPU-resident one) is reseeded from (train.seed, step) and given the step's batch, so
    steps do not replay one another's batches. `stop(row)` ends the
    stage after a step; `accept(row)` False undoes the step (the model goes back to the previous one) and ends it.
    `train` is what the loop trains on (default: splits.train)."""
    from micronet.checkpoint import build_from_checkpoint, make_checkpoint
    from micronet.compression.sparsity import step_rates
    from micronet.data import num_classes
    from micronet.training import clear_resume, derived_seed, fit

    key = fingerprint(input, params.data.model_dump(), section.model_dump(), params.train.seed)
    if plan is None:
        targets = step_rates(section.rate, section.steps, getattr(section, "schedule", "geometric"),
                             getattr(section, "min_rate", 0.0))
        plan = [Step(t, section.finetune) for t in targets]
    progress = StepProgress(resume_file(output, ".steps"), key)
    rows: list[dict[str, Any]] = []
    first_step = 0
    previous = make_checkpoint(model, source["arch"], source["args"])
    if (saved := progress.load()) is not None:
        previous = saved["checkpoint"]
        model = build_from_checkpoint(previous)
        rows, first_step = saved["rows"], saved["step"] + 1
        if state is not None:
            state.load_state(saved["extra"])
    model.to(runtime.device)
    dynamic = callable(plan)
    total = section.steps if dynamic else len(plan)
    chosen = recipes if dynamic else [s.finetune for s in plan]
    tag_selection(track, {id(r): r for r in chosen}.values(), params)
    epoch_offset = sum(max(1, r.get("finetune_epochs", 1 if dynamic else plan[k].finetune.epochs))
                       for k, r in enumerate(rows[:first_step]))
    data = train if train is not None else splits.train
    if rows and rows[-1].get("stop"):
        first_step = total
    for step in range(first_step, total):
        spec = plan(step, rows) if dynamic else plan[step]
        seed_everything(derived_seed(params.train.seed, step))  # a resumed step draws as an uninterrupted one
        masks = compress(model, step, spec.target)
        model.to(runtime.device)
        if refine is not None:
            spec = refine(step, spec, model, rows)
        resume = resume_file(output, f".step{step}")
        finetune = spec.finetune
        batch = finetune.batch_size or params.data.batch_size
        if hasattr(data, "set_seed"):  # the GPU loader: its draws follow (seed, epoch), so give each step its own
            data.set_seed(derived_seed(params.train.seed, step))
        if hasattr(data, "set_batch_size"):
            data.set_batch_size(max(1, batch // runtime.world_size))
        result = fit(
            model, data, selection_split(splits, finetune, params), finetune,
            runtime, masks=masks,
            num_classes=num_classes(params.data),
            batch_size=batch, workers=params.data.workers,
            seed=params.train.seed + step, resume_path=resume, fingerprint=key,
            desc=f"{stage} {step + 1}/{total} ({spec.kind})",
            on_epoch=lambda r, o=epoch_offset: track.log_metrics(
                {f"finetune_{k}": v for k, v in r.items() if k != "epoch"}, o + r["epoch"]),
        )
        epoch_offset += max(1, finetune.epochs)
        row = {"step": step + 1, "kind": spec.kind, "target_rate": spec.target, **measure(model, spec.target),
               "finetune_epochs": finetune.epochs, "finetune_batch": batch, **spec.extra,
               "val_accuracy": result.best_val_top1}
        ended = False
        if accept is not None and not accept(row):
            row["undone"] = True
            model = build_from_checkpoint(previous).to(runtime.device)
            ended = True
        elif stop is not None and stop(row):
            ended = True
        row["stop"] = ended
        rows.append(row)
        previous = make_checkpoint(model, source["arch"], source["args"])  # every rank: an undo must agree
        if runtime.is_main:
            track.log_metrics({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step + 1)
            progress.save(step, previous, rows, state.to_state() if state is not None else None)
            clear_resume(resume, runtime)
        if ended:
            break
    return model, rows


def clear_steps(output: Path) -> None:
    """After the stage has written its outputs (the final checkpoint among them): no step progress to keep."""
    resume_file(output, ".steps").unlink(missing_ok=True)
