"""A printable table of a model's stages: output shape, parameter count, output stride."""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from ..nn import Conv2d, Upsample
from ..nn.pool import _Pool2d
from .deeplabv3 import DeepLabV3
from .densenet import DenseNet


def _stages(model):
    """(name, module) pairs that, run in order, make up the forward pass."""
    if isinstance(model, DeepLabV3):
        return ([(f"backbone.features.{n}", m) for n, m in model.backbone.features.named_children()]
                + [("head.aspp", model.head.aspp), ("head.classifier", model.head.classifier),
                   ("upsample", model.upsample)])
    if isinstance(model, DenseNet):
        return [(f"features.{n}", m) for n, m in model.features.named_children()]
    raise TypeError(f"summary: expected a DeepLabV3 or DenseNet, got {type(model).__name__}")


def _stride_of(module) -> int:
    s = 1
    for m in module.modules():
        if isinstance(m, (Conv2d, _Pool2d)):
            s *= m.stride[0]
    return s


def summary_rows(model, input_size) -> list[tuple[str, tuple, int, int]]:
    """Run one eval-mode forward on zeros and return ``(stage, output shape, params, stride)`` rows.

    ``input_size`` is (N, C, H, W), (C, H, W) or (H, W) (N defaults to 1, C to 3). The stride is the nominal
    one (product of the layer strides); the actual sizes round as the layers round.
    """
    size = tuple(int(s) for s in input_size)
    size = {2: (1, 3) + size, 3: (1,) + size, 4: size}.get(len(size))
    if size is None:
        raise ValueError(f"summary: input_size must be (H, W), (C, H, W) or (N, C, H, W), got {input_size!r}")
    first = next(model.parameters())
    xp = get_array_module(first.data)
    x = xp.zeros(size, dtype=first.data.dtype)
    was_training = model.training
    model.eval()   # running statistics: any batch size, no state changes
    rows, stride = [], 1
    try:
        for name, m in _stages(model):
            if m is getattr(model, "upsample", None):
                m.size = size[2:]   # DeepLabV3.forward sets this to the input size; so do we
            x = m(x)
            stride = 1 if isinstance(m, Upsample) else stride * _stride_of(m)
            rows.append((name, tuple(x.shape), sum(int(np.prod(p.shape)) for p in m.parameters()), stride))
    finally:
        model.train(was_training)
    return rows


def summary(model, input_size) -> str:
    """A table of each named stage with its output shape, parameter count and output stride.

    Example: ``print(summary(deeplabv3_densenet121(), (1, 3, 512, 512)))``.
    """
    rows = summary_rows(model, input_size)
    w = max(len(r[0]) for r in rows)
    lines = [f"{'stage':<{w}}  {'output shape':<22} {'params':>11}  stride", "-" * (w + 45)]
    lines += [f"{n:<{w}}  {s!s:<22} {p:>11,}  {st:>6}" for n, s, p, st in rows]
    total = sum(int(np.prod(p.shape)) for p in model.parameters())
    lines += ["-" * (w + 45), f"{'total':<{w}}  {'':<22} {total:>11,}"]
    return "\n".join(lines)
