"""The textbook DenseNet-BC (Huang et al., 2017) as an atrous backbone: output stride 8, 16 or 32.

Module names follow torchvision's ``densenet121`` (``features.denseblock1.denselayer1.norm1``, ...), and the state
dict is key for key that of ``minideeplab.models.DenseNet`` (derivations: docs/derivations.md, "Dense layer, dense
block and transition").
"""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from ..nn.module import Identity, Module, Sequential
from .activation import ReLU
from .conv import Conv2d
from .norm import BatchNorm2d
from .pool import AvgPool2d, MaxPool2d

OUTPUT_STRIDES = (8, 16, 32)
POOLED = {32: (True, True, True), 16: (True, True, False), 8: (True, False, False)}   # transition1..3 pool?
DILATIONS = {32: (1, 1, 1, 1), 16: (1, 1, 1, 2), 8: (1, 1, 2, 4)}                     # denseblock1..4's 3x3


class Named(Sequential):
    """A Sequential whose children have names (``norm1``, ``conv``, ...) instead of indices; they run in the order
    given, and backward runs them in reverse (the chain rule)."""

    def __init__(self, **children: Module):
        super().__init__()
        for name, m in children.items():
            self.add_module(name, m)


class DenseLayer(Named):
    """BN -> ReLU -> 1x1 conv (``bn_size * growth_rate``) -> BN -> ReLU -> 3x3 conv (``growth_rate``).

    Returns only the *new* features; the block concatenates them to what came before.

    Shapes:
        x: (N, C_in, H, W) -> new: (N, growth_rate, H, W) (padding = dilation keeps H, W).

    Args:
        num_input_features: C_in. growth_rate: k, the channels this layer adds. bn_size: bottleneck factor.
        dilation: dilation (and padding) of the 3x3 conv: 1, or 2/4 in atrous blocks.
        rng, dtype: parameter initialisation and dtype.
    """

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, dilation: int = 1,
                 rng: np.random.Generator | None = None, dtype=np.float32):
        mid = bn_size * growth_rate
        super().__init__(
            norm1=BatchNorm2d(num_input_features, dtype=dtype), relu1=ReLU(),
            conv1=Conv2d(num_input_features, mid, 1, bias=False, rng=rng, dtype=dtype),
            norm2=BatchNorm2d(mid, dtype=dtype), relu2=ReLU(),
            conv2=Conv2d(mid, growth_rate, 3, padding=dilation, dilation=dilation, bias=False, rng=rng, dtype=dtype))


class DenseBlock(Module):
    """``num_layers`` DenseLayers; layer l reads the concatenation of the block input and the l - 1 earlier outputs.

    Shapes:
        x: (N, C_in, H, W) -> out: (N, C_in + num_layers * growth_rate, H, W) = concat(x, new_1, ..., new_L).

    Args:
        num_layers, num_input_features, bn_size, growth_rate: as in the paper / torchvision.
        dilation: dilation of every 3x3 conv in the block.
        rng, dtype: parameter initialisation and dtype.
    """

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 dilation: int = 1, rng: np.random.Generator | None = None, dtype=np.float32):
        super().__init__()
        self.num_input_features, self.growth_rate, self.num_layers = num_input_features, growth_rate, num_layers
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(num_input_features + i * growth_rate, growth_rate,
                                                             bn_size, dilation, rng=rng, dtype=dtype))
        self.out_channels = num_input_features + num_layers * growth_rate

    def forward(self, x):
        xp = get_array_module(x)
        features = [x]
        for layer in self.children():   # an explicit concatenation of everything so far before every layer
            features.append(layer(xp.concatenate(features, axis=1)))
        return xp.concatenate(features, axis=1)

    def backward(self, dout):
        ### BEGIN SOLUTION
        ### HINT: walk the layers last to first; layer l wrote channels [c, c + k) of the output and read channels [0, c).
        ### HINT: Every tensor is read by all later layers: what flows back into it must be summed. Copy dout first
        grad = dout.copy()   # channel slice c of grad: dL/d(that channel of the concatenation); dout stays intact
        c = self.out_channels
        for layer in reversed(list(self.children())):
            c -= self.growth_rate
            # the split: this layer's output is the slice [c, c + k), complete now that every later layer (which
            # read it) has added its part; the sum: the layer read concat(slices [0, c)), so its dx adds onto them
            grad[:, :c] += layer.backward(grad[:, c:c + self.growth_rate])
        return grad[:, :self.num_input_features]
        ### END SOLUTION

    def extra_repr(self):
        return f"num_layers={self.num_layers}, in={self.num_input_features}, growth_rate={self.growth_rate}"


class Transition(Named):
    """BN -> ReLU -> 1x1 conv (``num_output_features``) -> 2x2 average pool, stride 2 (``Identity`` with
    ``pool=False``: the atrous variants keep the resolution).

    Shapes:
        x: (N, C_in, H, W) -> out: (N, C_out, floor(H/2), floor(W/2)), or (N, C_out, H, W) without pooling.
    """

    def __init__(self, num_input_features: int, num_output_features: int, pool: bool = True,
                 rng: np.random.Generator | None = None, dtype=np.float32):
        super().__init__(norm=BatchNorm2d(num_input_features, dtype=dtype), relu=ReLU(),
                         conv=Conv2d(num_input_features, num_output_features, 1, bias=False, rng=rng, dtype=dtype),
                         pool=AvgPool2d(2, 2) if pool else Identity())


class DenseNet(Module):
    """DenseNet-BC feature extractor (no classifier) with output stride 8, 16 or 32.

    32 is the plain network. 16: ``transition3`` drops its pooling and ``denseblock4`` uses dilation 2. 8:
    ``transition2`` and ``transition3`` drop their pooling, ``denseblock3`` uses dilation 2 and ``denseblock4``
    dilation 4, so each 3x3 conv after a dropped pooling keeps its receptive field (DeepLab's atrous trick).
    ``norm5`` is followed by a ReLU (``relu5``), as in torchvision's forward.

    Shapes:
        x: (N, 3, H, W) -> features: (N, C, H', W'), C = 1024 for densenet121, H' ~ H / output_stride.

    Args:
        growth_rate, block_config, num_init_features, bn_size: torchvision's meaning.
        output_stride: 8, 16 or 32.
        rng: ``numpy.random.Generator`` for the conv init. dtype: parameter dtype.
    """

    def __init__(self, growth_rate: int = 32, block_config=(6, 12, 24, 16), num_init_features: int = 64,
                 bn_size: int = 4, output_stride: int = 32, rng: np.random.Generator | None = None,
                 dtype=np.float32):
        super().__init__()
        if output_stride not in OUTPUT_STRIDES or len(block_config) != 4:
            raise ValueError(f"DenseNet: output_stride must be one of {OUTPUT_STRIDES} and block_config have 4 "
                             f"blocks, got {output_stride!r} and {block_config!r}")
        rng = rng if rng is not None else np.random.default_rng()
        pooled, dilations = POOLED[output_stride], DILATIONS[output_stride]
        self.output_stride, self.block_config, self.growth_rate = output_stride, tuple(block_config), growth_rate
        features = Named(conv0=Conv2d(3, num_init_features, 7, stride=2, padding=3, bias=False, rng=rng, dtype=dtype),
                         norm0=BatchNorm2d(num_init_features, dtype=dtype), relu0=ReLU(),
                         pool0=MaxPool2d(3, stride=2, padding=1))
        c = num_init_features
        for i, n in enumerate(block_config):
            features.add_module(f"denseblock{i + 1}", DenseBlock(n, c, bn_size, growth_rate, dilations[i],
                                                                 rng=rng, dtype=dtype))
            c += n * growth_rate
            if i < 3:
                features.add_module(f"transition{i + 1}", Transition(c, c // 2, pooled[i], rng=rng, dtype=dtype))
                c //= 2
        features.add_module("norm5", BatchNorm2d(c, dtype=dtype))
        features.add_module("relu5", ReLU())
        self.features, self.out_channels = features, c

    def forward(self, x):
        return self.features(x)

    def backward(self, dout):
        # dL/dx: the chain rule through ``features``, last layer first
        return self.features.backward(dout)

    def set_output_stride(self, output_stride: int) -> DenseNet:
        """Make this network the one ``__init__`` builds at ``output_stride`` (8, 16 or 32), keeping every weight.

        Nothing learnt depends on the stride (a 2x2 average pool has no parameters, nor has a dilation), so only the
        geometry changes: each transition's pool is put back or dropped, and each block's 3x3 convs get the block's
        dilation, which keeps what every tap reads in image pixels the same (DeepLabV3's "train at 16, evaluate at 8").

        Shapes: x: (N, 3, H, W) -> features: (N, C, H', W'), H' ~ H / output_stride.
        """
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"DenseNet: output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")
        for i, pooled in enumerate(POOLED[output_stride], start=1):
            transition = getattr(self.features, f"transition{i}")
            transition.pool = AvgPool2d(2, 2) if pooled else Identity()     # pool is the last child: order kept
        for i, dilation in enumerate(DILATIONS[output_stride], start=1):
            for layer in getattr(self.features, f"denseblock{i}").children():
                layer.conv2.dilation = layer.conv2.padding = (dilation, dilation)   # padding = dilation: same size
        self.output_stride = output_stride
        return self

    def extra_repr(self):
        return f"output_stride={self.output_stride}, out_channels={self.out_channels}"
