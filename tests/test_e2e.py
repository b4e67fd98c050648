"""The demo pipeline through DVC in a copy of the repository: `dvc repro`, then `dvc exp run -S prune.rate=...`
re-runs only what the change touches; metrics, checkpoints and MLflow runs are what the params asked for."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w@]+)'", output)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A committed copy of this repository (tracked and untracked-not-ignored files) with a tinier demo."""
    root = tmp_path_factory.mktemp("e2e") / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if name.startswith("pipelines/demo/") and name.split("/")[2] in ("data", "models", "metrics", "dvc.lock"):
            continue
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    params_path = root / "pipelines/demo/params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["synth"].update(train=600, test=200)
    params["data"].update(val_size=100, batch_size=50)
    params["train"].update(epochs=2)
    params["prune"]["finetune"].update(epochs=1)
    params["sparsify"]["finetune"].update(epochs=1)
    params["distributed"]["threads"] = 2
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(git + ["add", "-A"], cwd=root, check=True)
    subprocess.run(git + ["commit", "-qm", "copy"], cwd=root, check=True)
    return root


@pytest.fixture(scope="module")
def env(repo) -> dict:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)  # the default store: <repo>/mlflow.db
    env.pop("DVC_EXP_NAME", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return env


def test_repro_then_experiment(repo, env):
    demo = repo / "pipelines/demo"
    out = run(["dvc", "repro"], demo, env)
    assert stages_run(out) == ["data", "train", "prune", "sparsify", "quantize", "score"]
    assert "score" in out and "qualifies" in out  # the score table is printed

    score = json.loads((demo / "metrics/score.json").read_text())
    for key in ("accuracy", "params", "flops", "score", "qualifies"):
        assert key in score
    assert 0.0 <= score["accuracy"] <= 1.0 and score["total"] == 200
    assert score["quantized"] and score["score"] == pytest.approx(score["params"] / 36.5e6 + score["flops"] / 10.49e9)
    assert (demo / "metrics/score_layers.txt").read_text().count("\n") > 20

    prune = json.loads((demo / "metrics/prune.json").read_text())
    assert abs(prune["rate"] - 0.4) <= 0.02 and prune["parameters"] < prune["parameters_before"]

    # The final checkpoint has the sparsity and bit widths the params asked for.
    ckpt = torch.load(demo / "models/quantize.pt", map_location="cpu", weights_only=True)
    assert ckpt["quantization"]["weight_bits"] == 9 and ckpt["quantization"]["activation_bits"] == 12
    sparse = json.loads((demo / "metrics/sparsify.json").read_text())
    layers = json.loads((demo / "metrics/sparsify_layers.json").read_text())
    assert layers["conv1"]["zeros"] == 0 and sparse["sparsity"] == pytest.approx(0.5, abs=0.01)
    eligible = [n for n in layers if n != "conv1"]
    zeros = sum((ckpt["state_dict"][f"{n}.weight"] == 0).sum().item() for n in eligible)
    total = sum(ckpt["state_dict"][f"{n}.weight"].numel() for n in eligible)
    assert zeros / total == pytest.approx(0.5, abs=0.01)
    assert (ckpt["state_dict"]["layer1.0.conv2.weight"] != 0).any()

    shown = run(["dvc", "metrics", "show"], demo, env)
    assert "metrics/score.json" in shown and "accuracy" in shown and "flops" in shown

    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    experiment = client.get_experiment_by_name("demo-wave-pyramidnet")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags]
    assert len(parents) == 1
    children = sorted(r.info.run_name for r in runs if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == parents[0].info.run_id)
    assert children == ["prune", "quantize", "score", "sparsify", "train"]
    for key in ("accuracy", "params", "flops", "score"):
        assert parents[0].data.metrics[key] == pytest.approx(score[key])
    train_run = next(r for r in runs if r.info.run_name == "train")
    assert len(client.get_metric_history(train_run.info.run_id, "val_acc")) == 2  # one point per epoch

    # Change one knob: only the stages downstream of prune run again.
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "baseline"], repo, env)
    out = run(["dvc", "exp", "run", "-S", "prune.rate=0.5"], demo, env)
    assert stages_run(out) == ["prune", "sparsify", "quantize", "score"]
    prune = json.loads((demo / "metrics/prune.json").read_text())
    assert abs(prune["rate"] - 0.5) <= 0.02
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags]
    assert len(parents) == 2
    # the experiment's parent run is keyed by the name DVC gave the experiment
    exp_parent = next(p for p in parents if not p.data.tags["micronet.pipeline_run"].startswith("params-"))
    exp_children = sorted(r.info.run_name for r in runs if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == exp_parent.info.run_id)
    assert exp_children == ["prune", "quantize", "score", "sparsify"]
