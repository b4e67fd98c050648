"""Compression methods: structured (channels), eigendamage + factorized (low rank), sparsity, dnw, quantize."""

import torch.nn as nn


def count_parameters(model: nn.Module) -> int:
    """All parameters, the measure of structured compression (1 - params/params0)."""
    return sum(p.numel() for p in model.parameters())
