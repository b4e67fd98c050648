import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# `make test` runs one pytest worker per core (pytest-xdist): each gets its share of the cores, for torch here and,
# through OMP_NUM_THREADS, for every stage process a test starts; more threads than cores stall in OpenMP barriers.
THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
os.environ["OMP_NUM_THREADS"] = str(THREADS)
torch.set_num_threads(THREADS)


def pytest_collection_modifyitems(items: list) -> None:
    """The whole-pipeline runs first: started last on a worker, a 5-minute test would be the suite's tail."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is None)


@pytest.fixture(autouse=True)
def _isolated_tracking(tmp_path, monkeypatch):
    """Every test logs to its own MLflow store, never the developer's."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)


@pytest.fixture
def one_thread():
    """Small passes on a shared 2-core box: a second OpenMP thread only adds barrier stalls (measured ~10x slower).
    Seeded, so random weights (and their rare exact zeros, which the rules count as sparsity) repeat every run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def real_cifar100() -> Path:
    """The real CIFAR-100 (../shared/data/cifar100) as a data.root, or a one-line skip where it is absent."""
    from real_data import real_cifar100

    return real_cifar100()
