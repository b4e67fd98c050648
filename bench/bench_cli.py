"""Start-up time of the `micronet` command: `--help` and a usage error must answer in well under 2 s, so
heavy imports (torch, torchvision, mlflow) stay inside the commands. Prints the median of a few runs."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

RUNS = 5


def timed(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "micronet.cli", *args], capture_output=True, check=False)
    return time.perf_counter() - started


def main() -> None:
    for args in (["--help"], ["count", "--help"], ["count", "--input", "bad"]):
        times = [timed(args) for _ in range(RUNS)]
        print(f"micronet {' '.join(args):<28} median {statistics.median(times):.3f} s  "
              f"(min {min(times):.3f}, max {max(times):.3f}, {RUNS} runs)")


if __name__ == "__main__":
    main()
