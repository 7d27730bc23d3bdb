"""A plain PyTorch mirror of ``DeepLabV3``, with identical state-dict keys (test oracle, benchmarks, export).

Imports torch, so ``import minideeplab`` never imports this module. The backbone follows torchvision's
DenseNet forward (concatenate all earlier features before every layer, ReLU after ``norm5``), the head is
ours. ``to_torch(model)`` builds the mirror and copies the weights and running statistics::

    from minideeplab.torch_oracle import to_torch
    tmodel = to_torch(model)              # same dtype as the model, on the CPU
    logits = tmodel(torch.from_numpy(x))
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backend import to_numpy
from .models.config import DeepLabConfig

_POOLED = {32: (True, True, True), 16: (True, True, False), 8: (True, False, False)}
_DILATIONS = {32: (1, 1, 1, 1), 16: (1, 1, 1, 2), 8: (1, 1, 2, 4)}


def _bn_relu_conv(c_in, c_out, k=1, dilation=1, names=("norm", "relu", "conv")):
    pad = dilation if k == 3 else 0
    return [(names[0], nn.BatchNorm2d(c_in)), (names[1], nn.ReLU()),
            (names[2], nn.Conv2d(c_in, c_out, k, padding=pad, dilation=dilation, bias=False))]


class TorchDenseLayer(nn.Sequential):
    def __init__(self, c_in, growth_rate, bn_size, dilation):
        mid = bn_size * growth_rate
        super().__init__(OrderedDict(_bn_relu_conv(c_in, mid, 1, names=("norm1", "relu1", "conv1"))
                                     + _bn_relu_conv(mid, growth_rate, 3, dilation, ("norm2", "relu2", "conv2"))))


class TorchDenseBlock(nn.ModuleDict):
    def __init__(self, num_layers, c_in, bn_size, growth_rate, dilation):
        super().__init__({f"denselayer{i + 1}": TorchDenseLayer(c_in + i * growth_rate, growth_rate, bn_size,
                                                                dilation) for i in range(num_layers)})

    def forward(self, x):
        features = [x]
        for layer in self.values():   # torchvision: each layer sees torch.cat of all earlier features
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class TorchDenseNet(nn.Module):
    def __init__(self, config: DeepLabConfig):
        super().__init__()
        c = config.num_init_features
        layers = [("conv0", nn.Conv2d(3, c, 7, stride=2, padding=3, bias=False)), ("norm0", nn.BatchNorm2d(c)),
                  ("relu0", nn.ReLU()), ("pool0", nn.MaxPool2d(3, stride=2, padding=1))]
        pooled, dilations = _POOLED[config.output_stride], _DILATIONS[config.output_stride]
        for i, n in enumerate(config.block_config):
            layers.append((f"denseblock{i + 1}", TorchDenseBlock(n, c, config.bn_size, config.growth_rate,
                                                                 dilations[i])))
            c += n * config.growth_rate
            if i < len(config.block_config) - 1:
                t = _bn_relu_conv(c, c // 2) + [("pool", nn.AvgPool2d(2, 2) if pooled[i] else nn.Identity())]
                layers.append((f"transition{i + 1}", nn.Sequential(OrderedDict(t))))
                c //= 2
        layers.append(("norm5", nn.BatchNorm2d(c)))
        self.features = nn.Sequential(OrderedDict(layers))
        self.out_channels = c

    def forward(self, x):
        return F.relu(self.features(x))   # torchvision's DenseNet.forward applies the ReLU after norm5


def _conv_bn_relu(c_in, c_out, k=1, dilation=1):
    pad = dilation if k == 3 else 0
    return nn.Sequential(OrderedDict([("conv", nn.Conv2d(c_in, c_out, k, padding=pad, dilation=dilation,
                                                         bias=False)),
                                      ("bn", nn.BatchNorm2d(c_out)), ("relu", nn.ReLU())]))


class TorchASPPPooling(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.relu(self.bn(self.conv(self.gap(x))))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


class TorchASPP(nn.Module):
    def __init__(self, c_in, c_out, rates, dropout):
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn_relu(c_in, c_out, 1)] +
                                      [_conv_bn_relu(c_in, c_out, 3, r) for r in rates])
        self.pooling = TorchASPPPooling(c_in, c_out)
        self.project = nn.Sequential(OrderedDict([("conv", nn.Conv2d(5 * c_out, c_out, 1, bias=False)),
                                                  ("bn", nn.BatchNorm2d(c_out)), ("relu", nn.ReLU()),
                                                  ("dropout", nn.Dropout(dropout))]))

    def forward(self, x):
        return self.project(torch.cat([b(x) for b in self.branches] + [self.pooling(x)], 1))


class TorchDeepLabHead(nn.Module):
    def __init__(self, c_in, config: DeepLabConfig):
        super().__init__()
        self.aspp = TorchASPP(c_in, config.aspp_channels, config.resolved_rates, config.dropout)
        self.classifier = nn.Conv2d(config.aspp_channels, config.num_classes, 1, bias=True)

    def forward(self, x):
        return self.classifier(self.aspp(x))


class TorchDeepLabV3(nn.Module):
    """PyTorch DeepLabV3-DenseNet with minideeplab's structure and state-dict keys.

    Shapes: x: (N, 3, H, W) -> logits (N, num_classes, H, W).

    Args:
        config: a ``DeepLabConfig`` (the same one that built the NumPy model).
    """

    def __init__(self, config: DeepLabConfig | None = None):
        super().__init__()
        self.config = config if config is not None else DeepLabConfig()
        self.backbone = TorchDenseNet(self.config)
        self.head = TorchDeepLabHead(self.backbone.out_channels, self.config)

    def forward(self, x):
        logits = self.head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def to_torch(model) -> TorchDeepLabV3:
    """A ``TorchDeepLabV3`` with ``model``'s config, dtype, weights, running statistics, dropout probability and
    train/eval mode."""
    config = getattr(model, "config", None)
    if not isinstance(config, DeepLabConfig):
        raise TypeError("to_torch: the model has no DeepLabConfig in .config (build it with build_deeplab)")
    state = OrderedDict((k, torch.from_numpy(np.array(to_numpy(v)))) for k, v in model.state_dict().items())
    with torch.device("meta"):   # no random init and no allocation: every tensor is assigned below
        tmodel = TorchDeepLabV3(config)
    tmodel.load_state_dict(state, strict=True, assign=True)   # takes our (copied) arrays as its tensors
    # the model's current drop probability, which may differ from its config (parity tests set it to 0)
    tmodel.head.aspp.project.dropout.p = model.head.aspp.project.dropout.p
    return tmodel.train(model.training)
