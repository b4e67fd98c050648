"""`make gpu-check` at the suite's size on the CPU: the same script end to end (pipelines through their real stage
commands, the bench_train cells, the checks, one-process DDP and K-FAC), so it cannot rot between GPU runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

pytestmark = pytest.mark.e2e


def test_gpu_check_cpu_mode_reports_every_pipeline_and_path(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench/gpu_check.py"), "--device", "cpu", "--size", "test",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    results = json.loads((tmp_path / "results.json").read_text())
    parts = results["parts"]
    import bench_train
    import gpu_check

    pipelines = {row["pipeline"]: row for row in parts["pipelines"]["rows"]}
    assert list(pipelines) == list(gpu_check.PIPELINES)
    for name, row in pipelines.items():
        assert row["ok"] and row["stages"][-1] == "score" and 0 <= row["accuracy"] <= 1, row
        assert f"| {name} | {', '.join(row['stages'])} |" in summary
    paths = bench_train.paths(False, False)
    cells = {(row["path"], row["net"]): row for row in parts["bench"]["rows"]}
    assert set(cells) == {(p, n) for p in paths for n in bench_train.CPU_NETS}
    for (path, net), row in cells.items():
        assert row["ok"] and row["images_s"] > 0 and f"| {path} | {net} | " in summary, row
    checks = {row["check"] for row in parts["checks"]["rows"]}
    assert checks == {"bf16 vs fp32 loss", "sparsity mask exact (bf16, channels_last)",
                      "DNW top-k exact (bf16, channels_last)", "quantized logits cpu vs cpu"}
    assert [row["what"] for row in parts["distributed"]["rows"]] == ["DDP fit, 1 process (gloo)",
                                                                      "EigenDamage K-FAC collection"]
    assert results["failed"] == [] and "all passed" in proc.stdout
