import json
from pathlib import Path

import typer
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from typer.testing import CliRunner

from micronet.config import load_params
from micronet.paths import repository_root
from micronet.tracking import stage_run, tracking_uri
from stages.views import views_command


def test_default_store_is_an_absolute_sqlite_file_at_the_repository_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    (tmp_path / ".git").mkdir()
    (tmp_path / "pipelines" / "demo" / ".dvc").mkdir(parents=True)  # each pipeline is a DVC project of its own
    monkeypatch.chdir(tmp_path / "pipelines" / "demo")
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    # DVC's queued/temp experiments run in a copy of the git repository under <pipeline>/.dvc/tmp/exps
    copy = tmp_path / "pipelines" / "demo" / ".dvc" / "tmp" / "exps" / "tmpabc123"
    (copy / "pipelines" / "demo" / ".dvc").mkdir(parents=True)
    (copy / ".git").write_text("gitdir: elsewhere\n")
    assert repository_root(copy / "pipelines" / "demo") == tmp_path.resolve()
    # the root pipeline's copies live under <root>/.dvc/tmp/exps
    (tmp_path / ".dvc").mkdir()
    root_copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpdef456"
    (root_copy / ".dvc").mkdir(parents=True)
    (root_copy / ".git").write_text("gitdir: elsewhere\n")
    assert repository_root(root_copy) == tmp_path.resolve()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/x.db")
    assert tracking_uri() == "sqlite:////elsewhere/x.db"


def test_stages_are_child_runs_of_one_parent_per_pipeline_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params_file = tmp_path / "params.yaml"
    params_file.write_text("tracking: {experiment: exp, pipeline: kaist}\ntrain_b0: {epochs: 3}\n")
    params = load_params(params_file)
    with stage_run("train", params, params_file) as track:
        track.log_metrics({"val_acc": 0.5}, step=1)
    with stage_run("score", params, params_file) as track:
        track.log_metrics({"score": 0.1}, parent=True)
        track.set_tags({"qualifies": "false"}, parent=True)
    monkeypatch.setenv("DVC_EXP_NAME", "curly-exp")
    with stage_run("score", params, params_file) as track:
        track.log_metrics({"score": 0.2}, parent=True)

    client = MlflowClient(tracking_uri())
    experiment = client.get_experiment_by_name("exp")
    assert experiment.artifact_location.startswith("file://") and "mlruns" not in experiment.artifact_location
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags]
    children = [r for r in runs if MLFLOW_PARENT_RUN_ID in r.data.tags]
    assert len(parents) == 2 and len(children) == 3
    by_name = {p.info.run_name: p for p in parents}
    assert "curly-exp" in by_name
    first = next(p for name, p in by_name.items() if name != "curly-exp")
    mine = [c.info.run_name for c in children if c.data.tags[MLFLOW_PARENT_RUN_ID] == first.info.run_id]
    assert sorted(mine) == ["score", "train"]
    assert first.data.metrics["score"] == 0.1 and by_name["curly-exp"].data.metrics["score"] == 0.2
    assert first.info.run_name.startswith("kaist-") and first.data.tags["micronet.pipeline"] == "kaist"
    assert first.data.tags["qualifies"] == "false"
    assert first.data.params["tracking.experiment"] == "exp" and first.data.params["train_b0.epochs"] == "3"
    assert client.get_experiment("0").lifecycle_stage == "deleted"  # no empty "Default" experiment left
    assert all(c.info.status == "FINISHED" for c in children)

    # `micronet views` (make mlflow-ui): a link per pipeline experiment to its saved runs view, which it saves
    # again (a store older than the view gets it), and how to load each registered model
    client.set_experiment_tag(experiment.experiment_id, "mlflow.sharedViewState.micronet-scores", "stale")
    client.create_registered_model("micronet-kaist")
    for _ in range(2):
        client.create_model_version("micronet-kaist", (tmp_path / "m").as_uri())
    app = typer.Typer()
    app.command()(views_command)
    result = CliRunner().invoke(app, ["--port", "5001"])
    assert result.exit_code == 0, result.output
    assert (f"exp runs: http://127.0.0.1:5001/#/experiments/{experiment.experiment_id}/runs?"
            "workflowType=machine_learning&viewStateShareKey=micronet-scores") in result.output
    assert "micronet-kaist (latest: version 2): http://127.0.0.1:5001/#/models/micronet-kaist" in result.output
    assert 'mlflow.pyfunc.load_model("models:/micronet-kaist/latest")' in result.output
    # the envelope MLflow's UI reads a saved view from, with the headline columns
    envelope = json.loads(client.get_experiment(experiment.experiment_id).tags["mlflow.sharedViewState.micronet-scores"])
    assert envelope["name"] == "micronet scores" and isinstance(envelope["createdAt"], int)
    state = json.loads(envelope["state"])
    assert state["selectedColumns"] == ["metrics.`accuracy`", "metrics.`params`", "metrics.`flops`", "metrics.`score`",
                                        "tags.`qualifies`"]
    assert state["searchFilter"] == "tags.`micronet.pipeline` LIKE '%'" and state["orderByKey"] == "metrics.`score`"


def test_disabled_tracking_logs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("tracking: {enabled: false}\n")
    with stage_run("train", load_params(tmp_path / "params.yaml"), tmp_path / "params.yaml") as track:
        assert not track.active
        track.log_metrics({"x": 1.0})
    assert not (tmp_path / "mlflow.db").exists()


def test_untracked_data_is_found_from_a_dvc_experiment_copy(tmp_path, monkeypatch):
    from micronet.paths import untracked_input

    (tmp_path / ".git").mkdir()
    (tmp_path / "pipelines/demo/.dvc").mkdir(parents=True)
    (tmp_path / "pipelines/demo/data/cifar100").mkdir(parents=True)
    copy = tmp_path / "pipelines/demo/.dvc/tmp/exps/tmp0a1b2c"
    (copy / ".git").mkdir(parents=True)
    (copy / "pipelines/demo/.dvc").mkdir(parents=True)
    monkeypatch.chdir(copy / "pipelines/demo")
    assert untracked_input("data/cifar100") == tmp_path.resolve() / "pipelines/demo/data/cifar100"
    assert untracked_input("data/other") == Path("data/other")  # nothing there either: unchanged
    (copy / "pipelines/demo/data/cifar100").mkdir(parents=True)  # present in the copy (DVC-tracked): used
    assert untracked_input("data/cifar100") == Path("data/cifar100")



def test_params_with_pattern_keys_are_logged_as_one_mlflow_param():
    """quantize.layer_bits is keyed by module-name patterns ("layers.*.conv2"), which MLflow refuses as param
    names: that mapping is one param, its value the mapping; ordinary sections still flatten to dotted names."""
    from micronet.tracking import flatten

    flat = flatten({"quantize": {"weight_bits": 9, "layer_bits": {"layers.*.conv2": 12}, "finetune": {"lr": 0.1}}})
    assert flat == {"quantize.weight_bits": 9, "quantize.layer_bits": {"layers.*.conv2": 12},
                    "quantize.finetune.lr": 0.1}
