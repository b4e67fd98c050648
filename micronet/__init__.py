"""micronet: reproducible MicroNet Challenge pipelines (train, prune, sparsify, quantize, score)."""

__version__ = "0.1.0"
