"""bnlib: Batch Normalization for NumPy and PyTorch, the library of The BatchNorm Book.

- :mod:`bnlib.functional`: the mathematics, for any array-API array (NumPy, torch on CPU or CUDA).
- :mod:`bnlib.nn`: PyTorch modules, subclasses of ``torch.nn.BatchNorm1d/2d/3d`` computed by
  bnlib, usable wherever torch's are (imported on demand: ``import bnlib.nn``; needs torch).
- :mod:`bnlib.plotting`, :mod:`bnlib.printing`: the book's figure style and number formatting.
"""

from . import functional

__version__ = "0.1.0"
__all__ = ["functional"]
