"""Nothing lost, nothing silent (issue 19): a stage killed with SIGKILL and re-run ends bit-identical to an
uninterrupted run, and its MLflow run is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from micronet.checkpoint import safe_load
from micronet.cli import app
from micronet.training import KILL_AFTER_BATCHES_ENV

REPO = Path(__file__).resolve().parents[1]
BATCHES_PER_EPOCH = 3  # 80 synthetic images - 32 validation = 48 = 3 batches of 16

# A toy Wave pipeline that still draws from every random source: FAA + crop + flip + cutout on the main
# process, ShakeDrop, mixup, EigenDamage with bring-back (its own generator), masked fine-tuning.
TINY = {
    "data": {"dataset": "cifar100", "root": "data", "val_size": 32, "batch_size": 16, "eval_batch_size": 64,
             "workers": 0, "augment": {"autoaugment": "fa_shake26_2x96d_cifar100", "cutout": 8}},
    "model": {"arch": "pyramidnet", "args": {"depth": 11, "alpha": 8, "num_classes": 100, "shakedrop": 0.5}},
    "train": {"epochs": 3, "lr": 0.05, "grad_clip": 5.0, "seed": 0, "mixing": {"kind": "mixup"}},
    "prune": {"method": "eigendamage", "rate": 0.3, "steps": 4, "step_rate": 0.5, "back_ratio": 0.25,
              "kfac_batches": 2, "finetune": {"epochs": 2, "lr": 0.01}},
    "sparsify": {"rate": 0.5, "steps": 2, "exclude": ["conv1"], "finetune": {"epochs": 2, "lr": 0.005}},
    "distributed": {"device": "cpu", "threads": 1},
    "tracking": {"experiment": "reliability"},
}

# stage -> (its input stage, batches before the kill: mid-epoch 2 of train; mid-epoch 2 of step 2 otherwise)
STAGES = {"train": (None, BATCHES_PER_EPOCH + 2), "prune": ("train", 3 * BATCHES_PER_EPOCH + 2),
          "sparsify": ("prune", 3 * BATCHES_PER_EPOCH + 2)}


def stage_args(stage: str, folder: Path, tag: str) -> list[str]:
    source = STAGES[stage][0]
    args = [stage, "--params", str(folder / f"{tag}.yaml"), "--output", str(folder / f"{stage}-{tag}.pt"),
            "--metrics", str(folder / f"{stage}-{tag}.json"), "--plots", str(folder / f"{stage}-{tag}.csv")]
    if source:
        args += ["--input", str(folder / f"{source}-reference.pt")]
    if stage == "sparsify":
        args += ["--layers", str(folder / f"{stage}-{tag}-layers.json")]
    return args


def run_in_process(args: list[str]) -> None:
    threads = torch.get_num_threads()
    try:
        result = CliRunner().invoke(app, args, catch_exceptions=False)
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The tiny pipeline run once, uninterrupted, stage by stage: the reference every resumed run must equal."""
    from micronet.data.cifar import write_synthetic_cifar100

    folder = tmp_path_factory.mktemp("pipeline")
    write_synthetic_cifar100(folder / "data", 80, 16, seed=0)
    params = {**TINY, "data": {**TINY["data"], "root": str(folder / "data")}}
    (folder / "resumed.yaml").write_text(yaml.safe_dump(params))
    # the same work (a resume file's fingerprint leaves tracking out), untracked: MLflow costs seconds per stage
    (folder / "reference.yaml").write_text(yaml.safe_dump({**params, "tracking": {"enabled": False}}))
    for stage in STAGES:
        run_in_process(stage_args(stage, folder, "reference"))
    return folder


def tensors(checkpoint: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in checkpoint["state_dict"].items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_killed_mid_epoch_resumes_bit_identical(pipeline, stage, monkeypatch):
    """SIGKILL after N training batches (mid-epoch; for prune and sparsify inside step 2), re-run: every tensor
    of the final checkpoint equals the uninterrupted run's, and the killed MLflow run is ended as KILLED with
    its curves carried into the run that finished the work."""
    from mlflow.tracking import MlflowClient

    from micronet.tracking import RESUMED_FROM_TAG, tracking_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{pipeline / 'mlflow.db'}")  # created once: faster
    monkeypatch.setenv("MICRONET_RUN", f"resumed-{stage}")
    args = stage_args(stage, pipeline, "resumed")
    env = {**os.environ, KILL_AFTER_BATCHES_ENV: str(STAGES[stage][1]), "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-m", "micronet.cli", *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    output = pipeline / f"{stage}-resumed.pt"
    assert not output.exists() and list(pipeline.glob(f"{stage}-resumed*.resume.pt"))

    run_in_process(args)
    reference, resumed = tensors(safe_load(pipeline / f"{stage}-reference.pt")), tensors(safe_load(output))
    assert reference.keys() == resumed.keys()
    differing = [k for k in reference if not torch.equal(reference[k], resumed[k])]
    assert not differing, f"{len(differing)} of {len(reference)} tensors differ, e.g. {differing[:3]}"
    print(f"{stage}: {len(reference)} tensors equal")
    assert not list(pipeline.glob(f"{stage}-resumed*.resume.pt"))

    client = MlflowClient(tracking_uri())
    experiment = [client.get_experiment_by_name("reliability").experiment_id]
    parent = client.search_runs(experiment, filter_string=f"tags.`micronet.pipeline_run` = 'resumed-{stage}'")
    runs = client.search_runs(experiment, filter_string=f"tags.mlflow.parentRunId = '{parent[0].info.run_id}'")
    by_status = {r.info.status: r for r in runs}
    assert sorted(by_status) == ["FINISHED", "KILLED"] and len(runs) == 2
    finished = by_status["FINISHED"]
    assert finished.data.tags[RESUMED_FROM_TAG] == by_status["KILLED"].info.run_id
    curve = "train_loss" if stage == "train" else "finetune_train_loss"
    epochs = {m.step for m in client.get_metric_history(finished.info.run_id, curve)}
    total = TINY["train"]["epochs"] if stage == "train" else None
    assert total is None or epochs == set(range(1, total + 1))
    assert 1 in epochs  # the killed run's first epoch is in the run that finished
