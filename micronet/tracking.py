"""MLflow tracking: one experiment per pipeline, one parent run per pipeline run (named after DVC's experiment when
DVC runs one), one nested child run per stage. The store is an absolute SQLite file at the repository root, so DVC's
queued and temporary experiments (run in copies under .dvc/tmp/exps) share it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from micronet.paths import repository_root

PIPELINE_RUN_TAG = "micronet.pipeline_run"  # the key that makes the stages of one pipeline run share a parent
PIPELINE_TAG = "micronet.pipeline"  # which submission the pipeline reproduces (wave, kaist, ...)
STAGE_TAG = "micronet.stage"
QUALIFIES_TAG = "qualifies"
TEACHER_RUN_TAG = "micronet.teacher_run_id"
MODEL_NAME_TAG = "micronet.registered_model"  # on a parent run: the registered model its score stage added to
MODEL_VERSION_TAG = "micronet.registered_model_version"  # ... and the version it made
PROCESS_TAG = "micronet.process"  # host:pid of the process that runs a stage, to tell a killed run from a live one
RESUMED_FROM_TAG = "micronet.resumed_from"
RELEASED_TAG = "micronet.released"  # on a parent run: the released file its score stage scored as imported
SELECT_TAG = "micronet.select"  # the epoch a stage kept: last, val or test (the teams' protocol; also on the parent)
SELECTED_ON_TEST = "selected on test, as published"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repository_root() / 'mlflow.db'}"


# The runs table as `make mlflow-ui` opens it: MLflow 3's UI reads a saved view from the experiment tag
# `mlflow.sharedViewState.<key>` when the URL carries `viewStateShareKey=<key>` (the "Share" button's format: a JSON
# envelope {name, createdAt, updatedAt, state} whose state holds the search facets and the table's columns).
RUNS_VIEW_KEY = "micronet-scores"
RUNS_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW_KEY}"
HEADLINE_COLUMNS = ["metrics.`accuracy`", "metrics.`params`", "metrics.`flops`", "metrics.`score`",
                    f"tags.`{QUALIFIES_TAG}`"]


def runs_view_url(experiment_id: Optional[str] = None, host: str = "127.0.0.1", port: int = 5000) -> str:
    """An experiment's runs table in the saved view (or, without one, the list of experiments); workflowType
    selects MLflow 3's classic runs pages over its GenAI ones."""
    if experiment_id is None:
        return f"http://{host}:{port}/#/experiments?workflowType=machine_learning"
    return (f"http://{host}:{port}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={RUNS_VIEW_KEY}")


def save_runs_view(client, experiment_id: str) -> None:
    """The saved view: only the pipelines' parent runs (stage runs would nest under them), best score first,
    with accuracy, params, flops, score and qualifies as columns."""
    state = {"searchFilter": f"tags.`{PIPELINE_TAG}` LIKE '%'", "orderByKey": "metrics.`score`",
             "orderByAsc": True, "selectedColumns": HEADLINE_COLUMNS}
    now = int(time.time() * 1000)
    envelope = {"name": "micronet scores", "createdAt": now, "updatedAt": now, "state": json.dumps(state)}
    client.set_experiment_tag(experiment_id, RUNS_VIEW_TAG, json.dumps(envelope))


def pipeline_run_key(params_path: Path, name: str) -> str:
    """DVC_EXP_NAME when DVC runs an experiment; otherwise the pipeline name and the params content, so all
    stages of one `dvc repro` with the same parameters share a parent run."""
    if os.environ.get("DVC_EXP_NAME"):
        return os.environ["DVC_EXP_NAME"]
    if os.environ.get("MICRONET_RUN"):
        return os.environ["MICRONET_RUN"]
    digest = hashlib.sha256(params_path.read_bytes()).hexdigest()[:8]
    return f"{name}-{digest}"


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repository_root(), capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


_PARAM_NAME = re.compile(r"[\w.\- /:]+")  # what MLflow accepts in a param name


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted names; a mapping whose keys MLflow would refuse as names (module-name patterns
    such as quantize.layer_bits' "layers.*.conv2") stays one param whose value is the whole mapping."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(_PARAM_NAME.fullmatch(str(k)) for k in value):
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

    def _runs(self, parent: bool) -> list[str]:
        return [self.run_id] + ([self.parent_id] if parent and self.parent_id else [])

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

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        for run in self._runs(parent):
            self.client.log_batch(run, metrics=items)

    def set_tags(self, tags: dict[str, Any], parent: bool = False) -> None:
        if not self.active:
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        for run in self._runs(parent):
            self.client.log_batch(run, tags=items)

    def log_artifact(self, path: Path | str) -> None:
        if self.active and Path(path).exists():
            self.client.log_artifact(self.run_id, str(path))


def ensure_experiment(client, name: str) -> str:
    """The id of experiment `name`, created with its artifacts beside the store if it does not exist yet."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # Artifacts beside the store (absolute), not in a ./mlruns folder of whichever directory a stage ran in.
    artifacts = (repository_root() / "mlartifacts" / name).as_uri()
    experiment_id = client.create_experiment(name, artifact_location=artifacts)
    save_runs_view(client, experiment_id)
    default = client.get_experiment("0")  # MLflow creates an empty "Default" with every new store
    if default is not None and default.lifecycle_stage == "active" and not client.search_runs(["0"], max_results=1):
        client.delete_experiment("0")
    return experiment_id


def _process_alive(process: str) -> bool:
    """Whether a `host:pid` tag names a live process (one on another host counts as alive: we cannot tell)."""
    host, _, pid = process.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def take_over_killed_runs(client, experiment_id: str, parent_id: str, stage: str, run_id: str) -> list[str]:
    """A stage killed mid-run (kill -9, power loss) left its child run RUNNING: end it as KILLED and copy its
    curves into the new run `run_id`, which resumes the work, so the charts show every epoch in one run; the new
    run names the killed one in a tag. Returns the ids taken over."""
    from mlflow.entities import Metric, RunTag

    running = client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and tags.`{STAGE_TAG}` = '{stage}' "
                                       "and attributes.status = 'RUNNING'", order_by=["start_time ASC"])
    killed = [r for r in running if r.info.run_id != run_id and not _process_alive(r.data.tags.get(PROCESS_TAG, ""))]
    for run in killed:
        for key in run.data.metrics:
            points = client.get_metric_history(run.info.run_id, key)
            history = [Metric(m.key, m.value, m.timestamp, m.step) for m in points]
            for i in range(0, len(history), 1000):
                client.log_batch(run_id, metrics=history[i : i + 1000])
        client.set_terminated(run.info.run_id, "KILLED")
    if killed:
        client.log_batch(run_id, tags=[RunTag(RESUMED_FROM_TAG, ",".join(r.info.run_id for r in killed))])
    return [r.info.run_id for r in killed]


@contextmanager
def stage_run(stage: str, params: Any, params_path: Path, enabled: bool = True) -> Iterator[StageTracker]:
    """A child run for `stage` under the pipeline's parent run (created on first use). `params` is the validated
    Params: the parent logs all of it, the child the stage's own section."""
    cfg = params.tracking
    if not (cfg.enabled and enabled):
        yield StageTracker()
        return
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # no schema chatter in stage logs
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    client = MlflowClient(tracking_uri())
    experiment_id = ensure_experiment(client, cfg.experiment)
    key = pipeline_run_key(params_path, cfg.pipeline or cfg.experiment)
    commit = git_commit()
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PIPELINE_RUN_TAG}` = '{key}'", max_results=1,
        order_by=["start_time DESC"],
    )
    if found:
        parent_id = found[0].info.run_id
    else:
        tags = {PIPELINE_RUN_TAG: key, PIPELINE_TAG: cfg.pipeline, MLFLOW_RUN_NAME: key, MLFLOW_GIT_COMMIT: commit}
        parent = client.create_run(experiment_id, tags={k: v for k, v in tags.items() if v}, run_name=key)
        parent_id = parent.info.run_id
        StageTracker(client, parent_id).log_params(params.as_dict())
    child_tags = {MLFLOW_PARENT_RUN_ID: parent_id, STAGE_TAG: stage, MLFLOW_GIT_COMMIT: commit,
                  PROCESS_TAG: f"{socket.gethostname()}:{os.getpid()}"}
    child = client.create_run(experiment_id, tags={k: v for k, v in child_tags.items() if v}, run_name=stage)
    take_over_killed_runs(client, experiment_id, parent_id, stage, child.info.run_id)
    tracker = StageTracker(client, child.info.run_id, parent_id)
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        client.set_terminated(child.info.run_id, status)
        client.set_terminated(parent_id, status if status == "FAILED" else "FINISHED")
