"""bench/bench_qat.py runs (at a tiny batch): the QAT speed figure the README quotes cannot rot between measurements."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_qat_benchmark_prints_images_per_second():
    proc = subprocess.run([sys.executable, "bench/bench_qat.py", "--batch", "4", "--steps", "1"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "QAT step" in proc.stdout and "images/s" in proc.stdout and "an epoch of 45,000 images" in proc.stdout
