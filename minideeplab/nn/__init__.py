"""Layers with forward and hand-written backward, under PyTorch's names."""
from .activation import Dropout, ReLU, Sigmoid, sigmoid
from .concat import Concat
from .conv import Conv2d
from .module import Identity, Module, ModuleList, Parameter, Sequential, is_grad_enabled, no_grad
from .norm import BatchNorm2d
from .pool import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d
from .resize import Upsample, interpolate

__all__ = [
    "Module", "Parameter", "Sequential", "ModuleList", "Identity",
    "Conv2d", "BatchNorm2d", "ReLU", "Sigmoid", "Dropout", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d",
    "Upsample", "Concat", "sigmoid", "interpolate", "no_grad", "is_grad_enabled",
]
