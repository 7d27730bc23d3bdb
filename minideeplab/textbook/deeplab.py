"""The textbook DeepLabV3 (Chen et al., 2017): atrous DenseNet -> ASPP (with image pooling) -> 1x1 classifier ->
bilinear upsample to the input. Same state-dict keys as ``minideeplab.models`` (derivations: docs/derivations.md,
"ASPP and image pooling", "DeepLabV3")."""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from ..models.config import DeepLabConfig, default_rates
from ..nn.module import Module, ModuleList
from .activation import Dropout, ReLU
from .conv import Conv2d
from .densenet import DenseNet, Named
from .norm import BatchNorm2d
from .pool import AdaptiveAvgPool2d
from .resize import Upsample


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1,
                 rng: np.random.Generator | None = None, dtype=np.float32) -> Named:
    """Conv (no bias: the BN's shift replaces it) -> BN -> ReLU, children ``conv``, ``bn``, ``relu``.

    Shapes: x: (N, C_in, H, W) -> (N, C_out, H, W) (a 3x3 conv uses padding = dilation).
    """
    padding = dilation if kernel_size == 3 else 0
    return Named(conv=Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation,
                             bias=False, rng=rng, dtype=dtype),
                 bn=BatchNorm2d(out_channels, dtype=dtype), relu=ReLU())


class ASPPPooling(Named):
    """Image-level features: global average pool -> 1x1 conv -> BN -> ReLU -> bilinear upsample back to (H, W).

    In training mode a batch of one image is refused (ValueError): the BN would see one value per channel.

    Shapes: x: (N, C_in, H, W) -> (N, C_out, H, W) (every pixel of an image gets the same vector).
    """

    def __init__(self, in_channels: int, out_channels: int, rng: np.random.Generator | None = None,
                 dtype=np.float32):
        super().__init__(gap=AdaptiveAvgPool2d(1), conv=Conv2d(in_channels, out_channels, 1, bias=False, rng=rng,
                                                                dtype=dtype),
                         bn=BatchNorm2d(out_channels, dtype=dtype), relu=ReLU(),
                         upsample=Upsample(size=(1, 1), mode="bilinear", align_corners=False))

    def forward(self, x):
        if self.training and x.shape[0] < 2:
            raise ValueError(
                f"ASPP image-pooling branch (head.aspp.pooling.bn): batch norm in training mode needs at least 2 "
                f"images per batch, because global pooling leaves one value per channel and image; got input "
                f"shape {tuple(x.shape)}. Use a batch size >= 2 for training, or call model.eval() to run on "
                f"a single image.")
        self.upsample.size = tuple(x.shape[2:])      # back to the feature map's size, whatever it is
        return super().forward(x)


class ASPP(Module):
    """Atrous Spatial Pyramid Pooling: five parallel branches on the same features, concatenated and projected.

    Branch 0: 1x1 conv; branches 1-3: 3x3 atrous convs with dilation = padding = rate; image pooling
    (``ASPPPooling``); each with BN + ReLU. Concatenation (5 * out_channels) -> ``project``: 1x1 conv -> BN ->
    ReLU -> Dropout.

    Shapes: x: (N, C_in, H, W) -> out: (N, out_channels, H, W).

    Args:
        in_channels: C_in. out_channels: width of each branch and of the output.
        rates: the three atrous rates. dropout: drop probability after the projection.
        rng: Generator for the conv init and the dropout masks. dtype: parameter dtype.
    """

    def __init__(self, in_channels: int, out_channels: int = 256, rates=(6, 12, 18), dropout: float = 0.1,
                 rng: np.random.Generator | None = None, dtype=np.float32):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng()
        self.in_channels, self.out_channels, self.rates = in_channels, out_channels, tuple(rates)
        self.branches = ModuleList([conv_bn_relu(in_channels, out_channels, 1, rng=rng, dtype=dtype)] +
                                   [conv_bn_relu(in_channels, out_channels, 3, r, rng=rng, dtype=dtype)
                                    for r in rates])
        self.pooling = ASPPPooling(in_channels, out_channels, rng=rng, dtype=dtype)
        self.project = Named(conv=Conv2d(5 * out_channels, out_channels, 1, bias=False, rng=rng, dtype=dtype),
                             bn=BatchNorm2d(out_channels, dtype=dtype), relu=ReLU(), dropout=Dropout(dropout, rng=rng))

    def forward(self, x):
        ### BEGIN SOLUTION
        ### HINT: the fork: the four branches and the pooling branch all read x; the join: concatenate the five outputs along the channels, then project
        xp = get_array_module(x)
        outs = [branch(x) for branch in self.branches] + [self.pooling(x)]    # the fork: five branches read x
        return self.project(xp.concatenate(outs, axis=1))                      # the join: one concatenation
        ### END SOLUTION

    def backward(self, dout):
        ### BEGIN SOLUTION
        ### HINT: undo forward in reverse: the projection first; the join (a concatenation) splits its gradient into one
        ### HINT: channel slice per branch, in forward's order; the fork (x read five times) sums what the branches send back
        xp = get_array_module(dout)
        # the join's backward splits: each branch gets its own slice of the concatenation's gradient
        parts = xp.split(self.project.backward(dout), 5, axis=1)
        # the fork's backward sums: x was read by all five branches, so dL/dx is the sum of their input gradients
        dx = self.pooling.backward(parts[4])
        for branch, part in zip(self.branches, parts[:4]):
            dx = dx + branch.backward(part)
        return dx
        ### END SOLUTION

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, rates={self.rates}"


class DeepLabV3(Module):
    """Segmentation network: ``backbone`` -> ``head`` (``aspp`` -> ``classifier``) -> ``upsample`` to the input.

    Shapes:
        x: (N, 3, H, W) -> logits: (N, num_classes, H, W), any H, W (bilinear, align_corners=False).

    Args:
        backbone: a ``DenseNet``; its ``out_channels`` feed the ASPP.
        num_classes: logit channels. output_stride: the backbone's. rates: None means (6, 12, 18) * 16 / OS.
        aspp_channels: ASPP width. dropout: after the ASPP projection. rng, dtype: init Generator, dtype.
    """

    def __init__(self, backbone: DenseNet, num_classes: int = 1, output_stride: int = 16, rates=None,
                 aspp_channels: int = 256, dropout: float = 0.1, rng: np.random.Generator | None = None,
                 dtype=np.float32):
        super().__init__()
        if backbone.output_stride != output_stride:
            raise ValueError(f"DeepLabV3: output_stride={output_stride} but the backbone was built with "
                             f"output_stride={backbone.output_stride}")
        rng = rng if rng is not None else np.random.default_rng()
        rates = tuple(rates) if rates is not None else default_rates(output_stride)
        self.output_stride, self.rates, self.num_classes = output_stride, rates, num_classes
        self.backbone = backbone
        self.head = Named(aspp=ASPP(backbone.out_channels, aspp_channels, rates, dropout, rng=rng, dtype=dtype),
                          classifier=Conv2d(aspp_channels, num_classes, 1, bias=True, rng=rng, dtype=dtype))
        self.upsample = Upsample(size=(1, 1), mode="bilinear", align_corners=False)
        self.config = None   # set by build_deeplab (io.save stores it)

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"DeepLabV3: expected images (N, 3, H, W), got {tuple(x.shape)}")
        self.upsample.size = tuple(x.shape[2:])   # back to the input size, whatever the rounding was
        return self.upsample(self.head(self.backbone(x)))

    def backward(self, dlogits, input_grad: bool = True):
        """dL/d(image) from dL/d(logits) (None if ``input_grad`` is False, as the fast model's Trainer asks)."""
        # the chain rule, last stage first: upsample, then head, then backbone
        dx = self.backbone.backward(self.head.backward(self.upsample.backward(dlogits)))
        return dx if input_grad else None

    def set_output_stride(self, output_stride: int) -> DeepLabV3:
        """Switch to ``output_stride`` (8, 16 or 32) in place, keeping every weight: DeepLabV3's "train at 16,
        evaluate at 8". The backbone drops or puts back its pools and rescales its dilations
        (``DenseNet.set_output_stride``); each ASPP rate becomes rate x old / new, so that its taps reach as far in
        image pixels as before (a ValueError, before anything changes, when that is not a whole number).
        ``minideeplab.models.set_output_stride`` does the same to the fast model.

        Shapes: unchanged: x: (N, 3, H, W) -> logits: (N, num_classes, H, W).
        """
        old = self.output_stride
        if output_stride not in (8, 16, 32):
            raise ValueError(f"DeepLabV3: output_stride must be one of (8, 16, 32), got {output_stride!r}")
        for r in self.rates:
            if r * old % output_stride:
                raise ValueError(f"DeepLabV3: ASPP rate {r} at output stride {old} becomes "
                                 f"{r * old / output_stride:g} at {output_stride}, not a whole number of pixels")
        rates = tuple(r * old // output_stride for r in self.rates)
        self.backbone.set_output_stride(output_stride)
        for branch, rate in zip(list(self.head.aspp.branches)[1:], rates):      # branch 0 is the 1x1 conv
            branch.conv.dilation = branch.conv.padding = (rate, rate)
        self.output_stride, self.rates, self.head.aspp.rates = output_stride, rates, rates
        if self.config is not None:   # describe the model as it now is (io.save stores it)
            default = self.config.rates is None and rates == default_rates(output_stride)
            self.config = type(self.config)(**{**vars(self.config), "output_stride": output_stride,
                                               "rates": None if default else rates})
        return self

    def extra_repr(self):
        return f"num_classes={self.num_classes}, output_stride={self.output_stride}, rates={self.rates}"


def build_deeplab(config: DeepLabConfig | None = None, rng: np.random.Generator | None = None,
                  dtype=np.float32) -> DeepLabV3:
    """The textbook network ``config`` describes (default: DeepLabV3-DenseNet121, output stride 16); with the same
    ``rng`` state, the same initial weights as ``minideeplab.models.build_deeplab``."""
    config = config if config is not None else DeepLabConfig()
    rng = rng if rng is not None else np.random.default_rng()
    backbone = DenseNet(config.growth_rate, config.block_config, config.num_init_features, config.bn_size,
                        output_stride=config.output_stride, rng=rng, dtype=dtype)
    model = DeepLabV3(backbone, config.num_classes, config.output_stride, config.resolved_rates,
                      config.aspp_channels, config.dropout, rng=rng, dtype=dtype)
    model.config = config
    return model


def deeplabv3_densenet121(num_classes: int = 1, output_stride: int = 16, rates=None,
                          rng: np.random.Generator | None = None, dtype=np.float32) -> DeepLabV3:
    """The textbook DeepLabV3 on DenseNet-121 (growth 32, blocks (6, 12, 24, 16)): ``minideeplab.models``'s
    ``deeplabv3_densenet121``, layer for layer, in the plainest correct form."""
    return build_deeplab(DeepLabConfig(num_classes=num_classes, output_stride=output_stride, rates=rates),
                         rng=rng, dtype=dtype)
