"""The released nets on the real CIFAR-100 (../shared/data/cifar100; skipped in one line where it is absent), through
the stage commands a user runs: `micronet import` then `micronet score`. The full test split takes minutes on 2 CPU
cores, so the suite scores a fixed slice (its first 1,000 images, `data.synthetic.source: cifar100`), and the
expected count is that slice of the full-split run (`micronet score` of the whole split, measured once: see README
"Results on real CIFAR-100")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from real_data import REPO, kaist_release, real_cifar100

KAIST_NORMALIZATION = {"mean": [0.5071, 0.4865, 0.4409], "std": [0.2673, 0.2564, 0.2762]}
SLICE = 1000
# Correct among the first 1,000 test images in the full-split runs (v1: 8,007 / 10,000, v2: 8,004 / 10,000).
SLICE_CORRECT = {1: 800, 2: 803}


def micronet(*args: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "micronet.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def slice_params(tmp_path: Path, data_root: Path) -> Path:
    """Params scoring on the first SLICE test images of the real copy (100 classes, labels and pixels unchanged)."""
    params = {
        "data": {"root": str(tmp_path / "slice"), "val_size": 0, "eval_batch_size": 500, "workers": 0,
                 "synthetic": {"source": "cifar100", "copy_of": str(data_root), "classes": 100, "train": 100,
                               "test": SLICE},
                 **KAIST_NORMALIZATION},
        "score": {"task": "cifar100"},
        "distributed": {"device": "cpu"},
        "tracking": {"experiment": "kaist-released", "pipeline": "kaist"},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.mark.parametrize("version", [1, 2])
def test_kaist_release_scores_its_full_split_figure_on_a_fixed_slice(tmp_path, version):
    data_root = real_cifar100()
    release = kaist_release(version)
    params = slice_params(tmp_path, data_root)
    micronet("import", "kaist", str(release), "--arch", f"kaist_micronet_v{version}", "--output", "v.pt",
             cwd=tmp_path)
    micronet("score", "--params", str(params), "--input", "v.pt", "--metrics", "score.json", cwd=tmp_path)
    score = json.loads((tmp_path / "score.json").read_text())
    assert score["total"] == SLICE and score["correct"] == SLICE_CORRECT[version], score
    # the parent run says which release it scored: `micronet report` puts it beside KAIST's published entry
    from mlflow.tracking import MlflowClient

    from micronet.report import collect_runs

    (run,) = collect_runs(MlflowClient(), ["kaist-released"])
    assert run.released == release.name and run.accuracy == score["accuracy"]
