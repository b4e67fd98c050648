"""MLflow tracking: one experiment per pipeline, one parent run per pipeline run (keyed by DVC's experiment
name when DVC sets one), one nested child run per stage. The store is an absolute SQLite file at the
repository root, so DVC's queued and temporary experiments (run in copies under .dvc/tmp/exps) share it."""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from micronet.config import TrackingConfig
from micronet.paths import repository_root

PIPELINE_TAG = "micronet.pipeline_run"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repository_root() / 'mlflow.db'}"


def pipeline_run_key(params_path: Path) -> str:
    """DVC_EXP_NAME when DVC runs an experiment; otherwise the params content, so all stages of one
    `dvc repro` with the same parameters share a parent run."""
    if os.environ.get("DVC_EXP_NAME"):
        return os.environ["DVC_EXP_NAME"]
    if os.environ.get("MICRONET_RUN"):
        return os.environ["MICRONET_RUN"]
    digest = hashlib.sha256(params_path.read_bytes()).hexdigest()[:12]
    return f"params-{digest}"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


class StageTracker:
    """What a stage logs; a no-op when tracking is off or on non-zero ranks."""

    def __init__(self, client=None, run_id: Optional[str] = None, parent_id: Optional[str] = None):
        self.client, self.run_id, self.parent_id = client, run_id, parent_id

    @property
    def active(self) -> bool:
        return self.client is not None

    def log_params(self, params: dict[str, Any]) -> None:
        if self.active:
            from mlflow.entities import Param

            items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None, parent: bool = False) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        for run in [self.run_id] + ([self.parent_id] if parent and self.parent_id else []):
            self.client.log_batch(run, metrics=items)

    def log_artifact(self, path: Path | str) -> None:
        if self.active and Path(path).exists():
            self.client.log_artifact(self.run_id, str(path))


@contextmanager
def stage_run(
    stage: str, cfg: TrackingConfig, params: dict[str, Any], params_path: Path, enabled: bool = True
) -> Iterator[StageTracker]:
    """A child run for `stage` under the pipeline's parent run (created on first use)."""
    if not (cfg.enabled and enabled):
        yield StageTracker()
        return
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    client = MlflowClient(tracking_uri())
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        # Artifacts beside the store (absolute), not in a ./mlruns folder of whichever directory a stage ran in.
        artifacts = (repository_root() / "mlartifacts" / cfg.experiment).as_uri()
        experiment_id = client.create_experiment(cfg.experiment, artifact_location=artifacts)
    else:
        experiment_id = experiment.experiment_id
    key = pipeline_run_key(params_path)
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PIPELINE_TAG}` = '{key}'", max_results=1, order_by=["start_time DESC"]
    )
    if found:
        parent_id = found[0].info.run_id
    else:
        parent = client.create_run(experiment_id, tags={PIPELINE_TAG: key, MLFLOW_RUN_NAME: key}, run_name=key)
        parent_id = parent.info.run_id
        StageTracker(client, parent_id).log_params(params)
    child = client.create_run(
        experiment_id, tags={MLFLOW_PARENT_RUN_ID: parent_id, PIPELINE_TAG + ".stage": stage}, run_name=stage
    )
    tracker = StageTracker(client, child.info.run_id, parent_id)
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        client.set_terminated(child.info.run_id, status)
        client.set_terminated(parent_id, status if status == "FAILED" else "FINISHED")
