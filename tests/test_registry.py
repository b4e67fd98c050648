"""The registered MLflow model is the scored checkpoint: `models:/<name>/latest` gives the same logits."""

import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient

from micronet.checkpoint import atomic_save, load_model, make_checkpoint
from micronet.registry import log_and_register
from micronet.tracking import ensure_experiment, tracking_uri
from test_compression import ARGS, _quantized_toy


def test_a_quantized_checkpoint_registers_and_loads_back_with_the_same_logits(tmp_path, one_thread, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the repository root the experiment's artifacts go under
    model, _, x, _, _ = _quantized_toy()
    path = tmp_path / "quantize.pt"
    atomic_save(make_checkpoint(model, "pyramidnet", ARGS), path)
    reference, _ = load_model(path)
    with torch.no_grad():
        expected = reference.eval()(x)
    client = MlflowClient(tracking_uri())
    run = client.create_run(ensure_experiment(client, "e"))
    tags = {"accuracy": "0.5", "score": "0.01", "qualifies": "false"}
    version = log_and_register(client, run.info.run_id, path, x[:2], expected[:2], "micronet-test", tags)
    assert (version.name, version.version, version.run_id) == ("micronet-test", 1, run.info.run_id)
    assert client.get_model_version("micronet-test", "1").tags == tags

    loaded = mlflow.pyfunc.load_model("models:/micronet-test/latest")
    assert np.array_equal(loaded.predict(x.numpy()), expected.numpy())  # bit for bit, quantized activations too
    signature = loaded.metadata.signature
    assert signature.inputs.to_dict()[0]["tensor-spec"] == {"dtype": "float32", "shape": (-1, 3, 32, 32)}
    assert loaded.metadata.saved_input_example_info is not None
