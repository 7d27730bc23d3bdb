"""The textbook tier: the whole network in its plainest correct form, for reading and stepping through.

One class per layer, forward and backward side by side on one screen, the derivative in one comment line
(derivations: docs/derivations.md). No speed tricks: no algorithm choice, no fusion, no shared buffers, no lazy
gradients, no GPU-only machinery; the same array code runs on NumPy and CuPy (``get_array_module``). The layers use
the ``minideeplab.nn.module`` protocol (``Module``, ``Parameter``), so optimizers, checkpoints, ``to("cuda")``,
``double()`` and ``train()/eval()`` work unchanged, and the models have the state-dict keys of
``minideeplab.models``: weights move both ways. ``minideeplab.nn`` and ``minideeplab.models`` compute the same
numbers faster (docs/fast_paths.md); tests/test_textbook*.py tie the two tiers together.

    from minideeplab.textbook import deeplabv3_densenet121
    model = deeplabv3_densenet121(rng=np.random.default_rng(0))
"""
from ..nn.module import Identity, Module, ModuleList, Parameter, Sequential
from .activation import Dropout, ReLU, Sigmoid
from .conv import Conv2d, col2im, conv_output_size, im2col
from .deeplab import ASPP, ASPPPooling, DeepLabV3, build_deeplab, conv_bn_relu, deeplabv3_densenet121
from .densenet import DenseBlock, DenseLayer, DenseNet, Named, Transition
from .loss import BCEWithLogitsLoss, DiceLoss, sigmoid, softplus
from .norm import BatchNorm2d
from .pool import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d
from .resize import Upsample, interpolation_matrix

__all__ = [
    "Module", "Parameter", "Sequential", "ModuleList", "Identity", "Named",
    "Conv2d", "im2col", "col2im", "conv_output_size", "BatchNorm2d", "ReLU", "Sigmoid", "Dropout",
    "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "Upsample", "interpolation_matrix",
    "BCEWithLogitsLoss", "DiceLoss", "sigmoid", "softplus",
    "DenseLayer", "DenseBlock", "Transition", "DenseNet", "ASPPPooling", "ASPP", "DeepLabV3", "conv_bn_relu",
    "build_deeplab", "deeplabv3_densenet121",
]
