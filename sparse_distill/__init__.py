"""Sparse Distillation: distil a transformer text classifier into a fast n-gram Deep Averaging Network."""

__version__ = "0.1.0"
