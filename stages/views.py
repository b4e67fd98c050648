"""`micronet views`: the link to every pipeline experiment's runs table in the MLflow UI, opened on the saved view
that shows accuracy, params, flops, score and qualifies (saved on the experiment here, for stores made before it),
and how to load each registered model."""

from __future__ import annotations

import typer


def views_command(
    host: str = typer.Option("127.0.0.1", "--host", help="where `mlflow ui` serves"),
    port: int = typer.Option(5000, "--port", help="the port `mlflow ui` serves on"),
) -> None:
    from mlflow.tracking import MlflowClient

    from micronet.report import collect_runs
    from micronet.tracking import runs_view_url, save_runs_view, tracking_uri

    client = MlflowClient(tracking_uri())
    experiments = {run.experiment: run.experiment_id for run in collect_runs(client)}
    typer.echo(f"MLflow experiments: {runs_view_url(host=host, port=port)}")
    for name, experiment_id in sorted(experiments.items()):
        save_runs_view(client, experiment_id)
        typer.echo(f"{name} runs: {runs_view_url(experiment_id, host, port)}")
    for model in client.search_registered_models(filter_string="name LIKE 'micronet-%'"):
        latest = max(int(v.version) for v in client.search_model_versions(f"name = '{model.name}'"))
        typer.echo(f"{model.name} (latest: version {latest}): http://{host}:{port}/#/models/{model.name}  "
                   f"load: mlflow.pyfunc.load_model(\"models:/{model.name}/latest\").predict(images)")
