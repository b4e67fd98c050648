"""Time the MicroNet counter on PyramidNet-272 alpha 200 (26.3M params) at 3x32x32, freebie on.

Run: python bench/bench_count.py. Prints the median of 3 timed runs after a warm-up, then the totals.
"""

from __future__ import annotations

import statistics
import time

import torch

from micronet.nets import create_model
from micronet.scoring import count


def main() -> None:
    torch.manual_seed(0)
    model = create_model("pyramidnet272")
    weights = [p for p in model.parameters() if p.dim() > 1]
    with torch.no_grad():  # random init can draw an exact 0.0, which would count as sparsity (a mask)
        zeros = sum(int((w == 0).sum()) for w in weights)
        for w in weights:
            w[w == 0] = 1e-3
    count(model, (3, 32, 32), freebie=True)  # warm-up
    times = []
    for _ in range(3):
        start = time.perf_counter()
        result = count(model, (3, 32, 32), freebie=True)
        times.append(time.perf_counter() - start)
    print(f"count(pyramidnet272, 3x32x32, freebie=True): median {statistics.median(times):.3f} s "
          f"(runs {', '.join(f'{t:.3f}' for t in times)}; {torch.get_num_threads()} threads; "
          f"{zeros} exact-zero weight draws replaced)")
    for key in ("param_bits", "mults", "adds", "params", "flops"):
        print(f"{key:<11} {getattr(result, key):,.2f}")
    print(f"score      {result.score('cifar100'):.6f} (cifar100)")


if __name__ == "__main__":
    main()
