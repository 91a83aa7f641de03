"""bnlib: Batch Normalization for NumPy and PyTorch, the library of The BatchNorm Book."""

__version__ = "0.1.0"
