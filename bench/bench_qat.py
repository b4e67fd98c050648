"""Images per second of one quantization-aware training step (forward, backward, SGD) of KAIST's MicroNet ver1 at
60 % sparsity, quantized as pipelines/kaist-wave quantizes it (9-bit weights with one exponent per output channel,
12-bit depthwise convs, 12-bit activations at every computed output), against the float step of the same net: what
an epoch of real CIFAR-100 costs on this machine. Random weights (the speed does not depend on them).

Run: python bench/bench_qat.py [--batch 64] [--steps 5] [--channels-last]. Prints the median step of `--steps`
after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from micronet.compression.quantize import QuantizationAware, quantize_model
from micronet.importers import synthetic_kaist_model
from micronet.scoring import foldable_batchnorms


def step_seconds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if i:  # the first step warms the allocator and kernels up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    net, _ = synthetic_kaist_model("kaist_micronet_v1", 0.6)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 100, (args.batch,))
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    float_s = step_seconds(net.to(memory_format=fmt), x.to(memory_format=fmt), y, args.steps)
    net.eval()
    quantize_model(net, foldable_batchnorms(net, (3, 32, 32)), [x], weight_bits=9, activation_bits=12,
                   layer_bits={"layers.*.conv2": 12}, per_channel=True, example=x[:1])
    qat = QuantizationAware(net).to(memory_format=fmt)
    qat_s = step_seconds(qat, x.to(memory_format=fmt), y, args.steps)
    print(f"KAIST v1 60 %, batch {args.batch}, {torch.get_num_threads()} threads"
          f"{', channels_last' if args.channels_last else ''}:")
    print(f"  float step  {args.batch / float_s:7.1f} images/s")
    print(f"  QAT step    {args.batch / qat_s:7.1f} images/s ({qat_s / float_s:.2f}x the float step); an epoch of "
          f"45,000 images: {45000 / (args.batch / qat_s) / 60:.1f} min")


if __name__ == "__main__":
    main()
