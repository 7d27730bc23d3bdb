"""Atrous Spatial Pyramid Pooling (Chen et al., 2017, "Rethinking Atrous Convolution"), with image pooling."""
from __future__ import annotations

import numpy as np

from ..nn import AdaptiveAvgPool2d, BatchNorm2d, Concat, Conv2d, Dropout, Module, ModuleList, ReLU, Upsample
from ..nn.functional import check_input
from .densenet import _Named


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1,
                 rng: np.random.Generator | None = None, dtype=np.float32) -> _Named:
    """Conv (no bias: the BN's shift replaces it) → BN → ReLU, children ``conv``, ``bn``, ``relu``.

    Shapes: x: (N, C_in, H, W) -> (N, C_out, H, W) (3×3 convs use padding = dilation).
    """
    padding = dilation if kernel_size == 3 else 0
    return _Named(conv=Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation,
                              bias=False, rng=rng, dtype=dtype),
                  bn=BatchNorm2d(out_channels, dtype=dtype), relu=ReLU(inplace=True))


class ASPPPooling(Module):
    """Image-level features: global average pool → 1×1 conv → BN → ReLU → bilinear upsample to (H, W).

    Batch size 1 in training mode is refused with a ValueError: the BN would see a single value per
    channel, whose batch variance is 0 (PyTorch raises here too). Use a batch of at least 2, or eval mode,
    where the BN uses its running statistics and any batch size works.

    Shapes: x: (N, C_in, H, W) -> (N, C_out, H, W) (every pixel of an image gets the same vector).

    Textbook twin: ``minideeplab.textbook.ASPPPooling``, the same five layers and the same error for batch 1.
    """

    def __init__(self, in_channels: int, out_channels: int, rng: np.random.Generator | None = None,
                 dtype=np.float32):
        super().__init__()
        self.gap = AdaptiveAvgPool2d(1)
        self.conv = Conv2d(in_channels, out_channels, 1, bias=False, rng=rng, dtype=dtype)
        self.bn = BatchNorm2d(out_channels, dtype=dtype)
        self.relu = ReLU(inplace=True)
        self.upsample = Upsample(size=(1, 1), mode="bilinear", align_corners=False)

    def forward(self, x):
        check_input("ASPP image pooling (aspp.pooling)", x, self.conv.in_channels)
        if self.training and x.shape[0] < 2:
            raise ValueError(
                f"ASPP image-pooling branch (head.aspp.pooling.bn): batch norm in training mode needs at least 2 "
                f"images per batch, because global pooling leaves one value per channel and image; got input "
                f"shape {tuple(x.shape)}. Use a batch size >= 2 for training, or call model.eval() to run on "
                f"a single image.")
        y = self.relu(self.bn(self.conv(self.gap(x))))
        self.upsample.size = tuple(x.shape[2:])      # back to the feature map's size, whatever it is
        return self.upsample(y)

    def backward(self, dout):
        d = self.upsample.backward(dout)
        return self.gap.backward(self.conv.backward(self.bn.backward(self.relu.backward(d))))


class ASPP(Module):
    """Five parallel branches on the same features, concatenated and projected.

    Branch 0: 1×1 conv; branches 1-3: 3×3 atrous convs with dilation = padding = rate; image pooling
    (``ASPPPooling``); each with BN + ReLU. Concat (5 * out_channels) → ``project``: 1×1 conv → BN → ReLU →
    Dropout(``dropout``, default 0.1 as in torchvision's DeepLabV3 head).

    Ablations (the ``aspp`` experiment): ``rates=()`` keeps only the 1×1 branch, ``image_pooling=False`` drops the
    pooling branch (``pooling`` is then None); the projection takes (1 + len(rates) + image_pooling) branches. The
    default keeps torchvision's five branches and state-dict keys.

    Shapes: x: (N, C_in, H, W) -> out: (N, out_channels, H, W).

    Args:
        in_channels: C_in (1024 for DenseNet-121).
        out_channels: width of each branch and of the output (256 in the paper).
        rates: the atrous rates, one 3×3 branch each ((6, 12, 18) at output stride 16, doubled at 8).
        dropout: drop probability after the projection (0 disables it).
        rng: Generator for the conv init and the dropout masks.
        dtype: parameter dtype.
        image_pooling: include the image-pooling branch.

    Textbook twin: ``minideeplab.textbook.ASPP``: the same branches, fork and join. The difference is in the layers:
    the atrous convs take the taps and kn2row paths (``nn.conv``), which skip what reads only padding: 181 ms against
    the textbook's 441 forward+backward for 1024 -> 256 at 16x16 (rates 6, 12, 18, batch 2, one thread,
    benchmarks/textbook_layers.py).
    """

    def __init__(self, in_channels: int, out_channels: int = 256, rates=(6, 12, 18), dropout: float = 0.1,
                 rng: np.random.Generator | None = None, dtype=np.float32, image_pooling: bool = True):
        super().__init__()
        rates = tuple(int(r) for r in rates)
        if any(r < 1 for r in rates):
            raise ValueError(f"ASPP: rates must be positive ints, got {rates}")
        rng = rng if rng is not None else np.random.default_rng()
        self.in_channels, self.out_channels, self.rates = int(in_channels), int(out_channels), rates
        self.branches = ModuleList([conv_bn_relu(in_channels, out_channels, 1, rng=rng, dtype=dtype)] +
                                   [conv_bn_relu(in_channels, out_channels, 3, r, rng=rng, dtype=dtype)
                                    for r in rates])
        self.pooling = ASPPPooling(in_channels, out_channels, rng=rng, dtype=dtype) if image_pooling else None
        self.concat = Concat(dim=1)
        n_branches = 1 + len(rates) + bool(image_pooling)
        self.project = _Named(conv=Conv2d(n_branches * out_channels, out_channels, 1, bias=False, rng=rng,
                                          dtype=dtype),
                              bn=BatchNorm2d(out_channels, dtype=dtype), relu=ReLU(inplace=True),
                              dropout=Dropout(dropout, rng=rng))

    def forward(self, x):
        check_input("ASPP", x, self.in_channels)
        outs = [b(x) for b in self.branches] + ([self.pooling(x)] if self.pooling is not None else [])
        return self.project(self.concat(*outs))

    def backward(self, dout):
        # The concat splits the gradient into one slice per branch; the branches all read the same x,
        # so the gradient with respect to x is the *sum* of the branch input-gradients (the fork).
        parts = self.concat.backward(self.project.backward(dout))
        dx = self.pooling.backward(parts[-1]) if self.pooling is not None else None
        for branch, d in zip(self.branches, parts):
            g = branch.backward(d)
            if dx is None:
                dx = g
            else:
                dx += g
        return dx

    def extra_repr(self):
        pooling = "" if self.pooling is not None else ", image_pooling=False"
        return f"{self.in_channels}, {self.out_channels}, rates={self.rates}{pooling}"
