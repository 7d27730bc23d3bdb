"""minideeplab: DeepLabV3 with a DenseNet121 backbone, from scratch on NumPy or CuPy."""
from . import nn
from .backend import cuda_available, get_array_module, to_device, to_numpy

__version__ = "0.1.0"
__all__ = ["nn", "get_array_module", "to_numpy", "to_device", "cuda_available", "__version__"]
