"""Time EigenDamage's statistics on PyramidNet-272 (alpha 200, 26.3M parameters, 271 convs/linears) on CPU:
the K-FAC factor pass, the eigendecompositions alone, the eigenvalue correction (a replay of the first batch),
and one prune step, against a plain forward+backward of the same batches.

Run: python bench/bench_eigendamage.py [--batches 2] [--batch-size 32] [--threads N] [--device cpu]
Random 3x32x32 inputs: the timings depend on shapes, not on the data.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from micronet.compression.eigendamage import BringBackPool, collect_kfac, eigendecompose, prune_step
from micronet.nets import create_model


@torch.no_grad()
def calibrate_batchnorm(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Running statistics from one batch, as a trained model has them: with the init's (0, 1) an eval-mode
    PyramidNet-272 grows its residual stream ~10x per few blocks and the logits reach 1e12 (inf saliencies)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.momentum = None  # cumulative average: one batch sets the statistics
        bn.reset_running_stats()
    model.train()
    model(x)
    for bn in bns:
        bn.momentum = 0.1
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the eigendecomposition alone")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    model = create_model("pyramidnet272").to(device)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(args.batch_size, 3, 32, 32, generator=g), torch.randint(0, 100, (args.batch_size,), generator=g))
            for _ in range(args.batches)]
    start = time.perf_counter()
    calibrate_batchnorm(model, data[0][0].to(device))
    calibration = time.perf_counter() - start

    start = time.perf_counter()
    for x, y in data:
        F.cross_entropy(model(x.to(device)), y.to(device)).backward()
    model.zero_grad(set_to_none=True)
    plain = time.perf_counter() - start

    start = time.perf_counter()
    stats = collect_kfac(model, data, device)
    total = time.perf_counter() - start

    runs = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        eigendecompose(stats)
        runs.append(time.perf_counter() - start)

    params = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    report = prune_step(model, stats, 0.3, 0.5, BringBackPool())
    prune = time.perf_counter() - start

    dims = [d for f in stats.layers.values() for d in (f.A.shape[0], f.G.shape[0])]
    rows = [
        (f"BN calibration forward (1 x {args.batch_size}, not part of collection)", calibration),
        (f"forward+backward, no hooks ({args.batches} x {args.batch_size})", plain),
        (f"K-FAC factors: A, G, moving average ({args.batches} x {args.batch_size})", stats.seconds["factors"]),
        (f"eigendecomposition ({len(dims)} eigh, largest {max(dims)}x{max(dims)})",
         stats.seconds["eigendecomposition"]),
        (f"  alone, median of {args.repeats} (runs {', '.join(f'{t:.2f}' for t in runs)})", statistics.median(runs)),
        (f"eigenvalue correction (replay of 1 x {args.batch_size}, per-example gradients)",
         stats.seconds["correction"]),
        ("collect_kfac total", total),
        ("prune_step at step rate 0.3 (saliency, selection, factorize)", prune),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"PyramidNet-272 on {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'phase'.ljust(width)}  seconds")
    print("-" * (width + 9))
    for name, seconds in rows:
        print(f"{name.ljust(width)}  {seconds:7.2f}")
    print(f"\n{len(stats.layers)} layers; parameters {params:,} -> {report['parameters_after']:,} after one step "
          f"({report['entries_removed']:,} of {report['entries']:,} eigen-directions removed)")


if __name__ == "__main__":
    main()
