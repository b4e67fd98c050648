"""The code MLflow runs to load a registered micronet model ("models from code": a readable file in the model's
artifacts instead of a pickled object); the model itself is micronet.registry.MicronetModel."""

from mlflow.models import set_model

from micronet.registry import MicronetModel

set_model(MicronetModel())
