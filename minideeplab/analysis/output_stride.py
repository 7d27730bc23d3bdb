"""Output stride vs cost: feature-map size, receptive field, multiply-adds and parameters at OS 8/16/32."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .graph import Graph, trace
from .receptive_field import receptive_field


@dataclass
class OSRow:
    """One output stride: backbone map size, its receptive field and jump, and the cost of the whole model."""
    output_stride: int
    feature_size: tuple
    backbone_rf: tuple
    backbone_jump: tuple
    backbone_macs: int
    total_macs: int
    params: int


def count_macs(model, input_size, under: str | None = None) -> int:
    """Multiply-adds of every Conv2d for one image of size ``input_size``: C_in * k_h * k_w * C_out * H_o * W_o
    per convolution (the GEMM of im2col), optionally only for modules whose name starts with ``under``."""
    return _conv_macs(trace(model, input_size), under)


def _conv_macs(graph: Graph, under: str | None = None) -> int:
    total = 0
    for n in graph.nodes:
        if n.kind == "conv" and (under is None or n.name == under or n.name.startswith(under + ".")):
            c_in, c_out = n.channels
            total += c_in * n.kernel[0] * n.kernel[1] * c_out * n.size[0] * n.size[1]
    return int(total)


def count_params(model) -> int:
    """Number of trainable scalars."""
    return int(sum(int(np.prod(p.shape)) for p in model.parameters()))


class OSTable(list):
    """A list of ``OSRow`` that prints as a table."""

    def format(self) -> str:
        head = f"{'OS':>3}  {'feature map':>11}  {'backbone RF':>11}  {'jump':>4}  {'backbone GMACs':>14}  " \
               f"{'total GMACs':>11}  {'params (M)':>10}"
        lines = [head, "-" * len(head)]
        for r in self:
            fm = f"{r.feature_size[0]}x{r.feature_size[1]}"
            rf = str(r.backbone_rf[0]) if r.backbone_rf[0] == r.backbone_rf[1] else f"{r.backbone_rf[0]}x{r.backbone_rf[1]}"
            lines.append(f"{r.output_stride:>3}  {fm:>11}  {rf:>11}  {r.backbone_jump[0]:>4}  "
                         f"{r.backbone_macs / 1e9:>14.2f}  {r.total_macs / 1e9:>11.2f}  {r.params / 1e6:>10.3f}")
        return "\n".join(lines)

    __str__ = format

    def _repr_pretty_(self, p, cycle):
        p.text(self.format())


def output_stride_table(model_builder, input_size, output_strides=(32, 16, 8), backbone: str = "backbone") -> OSTable:
    """Build the model at each output stride and tabulate what the stride buys and costs.

    Args:
        model_builder: ``output_stride -> model`` (e.g. ``lambda os: build_deeplab(DeepLabConfig(output_stride=os))``).
        input_size: H or (H, W) of the image.
        output_strides: the strides to compare.
        backbone: dotted name of the feature extractor inside the model ("" for the model itself).

    Returns:
        ``OSTable`` of ``OSRow`` (``print`` it).
    """
    rows = OSTable()
    for os_ in output_strides:
        model = model_builder(os_)
        table = receptive_field(model, input_size)
        feat = table.at(backbone)
        rows.append(OSRow(os_, feat.size, feat.rf, feat.jump, _conv_macs(table.graph, backbone or None),
                          _conv_macs(table.graph), count_params(model)))   # one trace serves the table and the MACs
    return rows
