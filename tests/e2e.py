"""Helpers for the end-to-end tests: a committed copy of the repository with a pipeline's toy params shrunk further,
DVC runs in it, and the stages DVC reports running."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import yaml

REPO = Path(__file__).resolve().parents[1]
# The toy pipelines on real images (`make demo DATA=digits`: 297 held-out digits, chance 0.10): the final model's
# top-1 at least LEARNED, and no compression stage costing more than STAGE_LOSS against its input (21 of the 297:
# the same stage run at one and at two threads has differed by up to 7 points; the demo's EigenDamage step costs
# 5.05 at one thread, the most of any stage).
LEARNED = 0.80
STAGE_LOSS = 0.07


def run(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    if check:
        assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w@-]+)'", output)


def environment() -> dict:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)  # the default store: <repo>/mlflow.db
    env.pop("DVC_EXP_NAME", None)
    env.pop("COLUMNS", None)  # a pytest-xdist worker sets the terminal's 80; `make exp-show` defaults to 160
    env.pop("LINES", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return env


def repository_copy(root: Path, pipeline: str, shrink: Optional[Callable[[dict], None]] = None,
                    file: str = "params.yaml") -> Path:
    """A committed copy of this repository (tracked and untracked-not-ignored files, no pipeline outputs) whose
    `pipelines/<pipeline>/<file>` (params.yaml, or the toy.yaml overlay) is passed through `shrink`."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        parts = name.split("/")
        if parts[0] == "pipelines" and len(parts) > 2 and parts[2] in ("data", "models", "metrics", "dvc.lock"):
            continue
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    if shrink is not None:
        path = root / "pipelines" / pipeline / file
        params = yaml.safe_load(path.read_text())
        shrink(params)
        path.write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(git + ["add", "-A"], cwd=root, check=True)
    subprocess.run(git + ["commit", "-qm", "copy"], cwd=root, check=True)
    return root


def make_demo(repo: Path, pipeline: str, env: dict, data: str = "synthetic") -> str:
    """`make demo PIPELINE=... DATA=...` as a user runs it, with the test's environment instead of `uv run`."""
    return run(["make", "-s", "demo", f"PIPELINE={pipeline}", f"DATA={data}", "UV=/usr/bin/true", "RUN="], repo, env)


def accuracy_on_test(pipeline_dir: Path, checkpoints: list[str]) -> dict[str, float]:
    """Top-1 of each `models/<name>.pt` on the pipeline's test split, as the score stage reads it: what each stage
    kept or lost. (Evaluated here because the toy runs keep the last epoch, with no validation split.)"""
    import torch

    from micronet.checkpoint import load_model
    from micronet.config import load_params
    from micronet.data import build_test
    from micronet.training import Runtime, evaluate, make_loader

    cwd = Path.cwd()
    os.chdir(pipeline_dir)  # data.root is relative to the pipeline folder
    try:
        test = build_test(load_params(Path("params.yaml")).data)
    finally:
        os.chdir(cwd)
    cpu = Runtime(torch.device("cpu"))
    loader = make_loader(test, 500, cpu, train=False, workers=0)
    return {name: evaluate(load_model(pipeline_dir / f"models/{name}.pt")[0], loader, cpu).correct_top1 / len(test)
            for name in checkpoints}


def mlflow_stage_runs(repo: Path, experiment: str) -> tuple[object, dict[str, object]]:
    """The one parent run of `experiment` in the copy's store and its children by stage name."""
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags]
    assert len(parents) == 1, [p.info.run_name for p in parents]
    children = {r.info.run_name: r for r in runs if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == parents[0].info.run_id}
    return parents[0], children
