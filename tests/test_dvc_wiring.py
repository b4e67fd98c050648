"""Every pipeline's dvc.yaml lists the code each stage runs: a change to a module re-runs exactly the stages whose
commands import it (the import closure is read from the source), and every listed dep exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from stage_deps import REPO, closure, command_modules

PIPELINES = sorted(p.parent for p in [REPO / "dvc.yaml", *REPO.glob("pipelines/*/dvc.yaml")])
ASSETS = {  # data files the code reads at run time
    REPO / "micronet/augment.py": [REPO / "micronet/assets/fast_autoaugment_policies.json"],
    REPO / "micronet/registry.py": [REPO / "micronet/mlflow_model.py"],  # MLflow's "model from code" file
}


def stages(pipeline: Path) -> dict[str, dict]:
    return yaml.safe_load((pipeline / "dvc.yaml").read_text())["stages"]


def command_of(cmd: str) -> str:
    match = re.match(r"micronet ((?:data )?[a-z-]+)", cmd)
    assert match, f"stage command does not run micronet: {cmd!r}"
    return match.group(1)


def covered(path: Path, deps: list[Path]) -> bool:
    return any(path == d or d in path.parents for d in deps)


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: str(p.relative_to(REPO)) or "root")
def test_each_stage_lists_the_code_it_imports(pipeline):
    modules = command_modules()
    for name, stage in stages(pipeline).items():
        command = command_of(" ".join(stage["cmd"].split()))
        assert command in modules, f"{pipeline}/dvc.yaml stage {name}: unknown command micronet {command}"
        deps = [(pipeline / d).resolve() for d in stage.get("deps", [])]
        code = closure(modules[command])
        needed = code | {a for f in code for a in ASSETS.get(f, [])}
        missing = sorted(str(p.relative_to(REPO)) for p in needed if not covered(p, deps))
        assert not missing, (f"{pipeline.relative_to(REPO)}/dvc.yaml stage {name} does not list {missing} "
                             "(python tests/stage_deps.py rewrites every stage's code deps)")
        for dep in deps:
            if REPO / "micronet" in dep.parents or REPO / "stages" in dep.parents:
                assert dep.exists(), f"{pipeline}/dvc.yaml stage {name} lists {dep}, which does not exist"
                inside = [p for p in needed if p == dep or dep in p.parents]
                assert inside, f"{pipeline}/dvc.yaml stage {name} lists {dep}, which its command does not use"


def test_the_closure_follows_function_level_imports():
    """Stages import lazily (inside the command): the closure must still see those imports."""
    files = closure("stages.score")
    assert REPO / "micronet/scoring.py" in files and REPO / "micronet/training.py" in files
    assert REPO / "micronet/compression/structured.py" not in files
    assert REPO / "micronet/scoring.py" not in closure("stages.train")


# The columns each kind of stage writes to its --plots CSV: the training loop's per-epoch rows
# (micronet/training.py) and the compression loop's per-step rows (micronet/runner.py compress_in_steps).
PLOT_COLUMNS = {
    "train": {"epoch", "lr", "train_loss", "train_acc", "seconds", "val_loss", "val_acc", "val_top5"},
    "prune": {"step", "kind", "target_rate", "rate", "parameters", "val_accuracy", "undone", "stop"},
    "sparsify": {"step", "kind", "target_rate", "sparsity", "val_accuracy", "undone", "stop"},
}


def plots_written(pipeline: Path) -> dict[str, set[str]]:
    """CSV path -> the columns its stage writes, from each stage's `--plots` option."""
    written = {}
    for stage in stages(pipeline).values():
        cmd = " ".join(stage["cmd"].split())
        match = re.search(r"--plots (\S+)", cmd)
        if match:
            written[match.group(1)] = PLOT_COLUMNS[command_of(cmd)]
    return written


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: str(p.relative_to(REPO)) or "root")
def test_every_plot_is_one_labelled_quantity_of_a_csv_a_stage_writes(pipeline):
    plots = yaml.safe_load((pipeline / "dvc.yaml").read_text())["plots"]
    written = plots_written(pipeline)
    drawn = set()
    for entry in plots:
        (name, spec), = entry.items()
        for key in ("title", "x_label", "y_label", "x", "y"):
            assert spec.get(key), f"{pipeline}/dvc.yaml plot {name}: no {key}"
        assert spec.get("template", "linear") == "linear", name
        (csv, columns), = spec["y"].items()  # one file a chart: one quantity against epochs or steps
        assert csv in written, f"{pipeline}/dvc.yaml plot {name}: {csv} is no stage's --plots output"
        unknown = {spec["x"], *columns} - written[csv]
        assert not unknown, f"{pipeline}/dvc.yaml plot {name}: {csv} has no column {sorted(unknown)}"
        drawn.add(csv)
    assert drawn == set(written), f"{pipeline}/dvc.yaml: no chart of {sorted(set(written) - drawn)}"
    titles = [next(iter(e.values()))["title"] for e in plots]
    assert len(set(titles)) == len(titles), f"{pipeline}/dvc.yaml: two charts with one title"
