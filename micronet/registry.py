"""The MLflow model registry: the score stage's checkpoint as an MLflow pyfunc model, registered by name
(`micronet-<pipeline>`), so `mlflow.pyfunc.load_model("models:/micronet-demo/latest")` gives the scored model.

The pyfunc wraps the micronet checkpoint itself (plain data, read with `weights_only=True`) and rebuilds the model
with `micronet.checkpoint.load_model`, as every stage does: factorized, channel-pruned, sparse and quantized models
come back exactly as scored, without pickling a module. Loading needs micronet installed (`pip install -e .`)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Optional

import mlflow.pyfunc
import numpy as np
import torch

CHECKPOINT_ARTIFACT = "checkpoint"  # the key of the checkpoint file among the model's artifacts


class MicronetModel(mlflow.pyfunc.PythonModel):
    """Images (N, 3, H, W float32, normalized as the test split) in, logits (N, classes float32) out."""

    def load_context(self, context: Any) -> None:
        from micronet.checkpoint import load_model

        self.model, _ = load_model(context.artifacts[CHECKPOINT_ARTIFACT])
        self.model.eval()

    def predict(self, context: Any, model_input: np.ndarray, params: Optional[dict[str, Any]] = None) -> np.ndarray:
        with torch.no_grad():
            return self.model(torch.as_tensor(np.asarray(model_input, dtype=np.float32))).numpy()


def requirements() -> list[str]:
    """What loading the model needs besides micronet itself, at the versions it was scored with."""
    import torchvision

    return [f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}",
            f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}"]


def log_and_register(client: Any, run_id: str, checkpoint: Path, images: torch.Tensor, logits: torch.Tensor,
                     name: str, tags: dict[str, str]) -> Any:
    """Log `checkpoint` as pyfunc model "model" of run `run_id` (input example: `images`, signature from their
    `logits`) and register it as a new version of `name` with `tags`; returns the ModelVersion. Works through
    `client` only, so nothing global (the fluent API's active run or tracking URI) is touched."""
    from mlflow.exceptions import MlflowException
    from mlflow.models import infer_signature

    example = images.numpy().astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        mlflow.pyfunc.save_model(
            folder, python_model=Path(__file__).with_name("mlflow_model.py"),
            artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)}, signature=infer_signature(example, logits.numpy()),
            input_example=example, pip_requirements=requirements(),
        )
        client.log_artifacts(run_id, str(folder), "model")
    try:
        client.create_registered_model(name, description="micronet checkpoints as scored by `micronet score`")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    return client.create_model_version(name, source, run_id=run_id, tags=tags)
