"""Trace a module tree into the graph of its *spatial* operations (what receptive-field analysis needs).

Only the geometry matters here: which layers move or resample the spatial grid (convolutions, pooling, global
pooling, bilinear resizing) and where paths fork and join (the dense block's concatenations, the ASPP
branches). Pointwise layers (batch norm, ReLU, dropout, ...) leave the grid alone and are skipped.

The walk knows these containers:
- anything whose children run one after another (``Sequential``, ``DenseLayer``, ``Transition``, the
  DeepLab head, the DeepLabV3 model itself: backbone -> head -> upsample);
- ``DenseNet``: only its ``features`` (the ImageNet classifier, if any, is not on the segmentation path);
- ``DenseBlock``: layer ``l`` reads the concatenation of the block input and every earlier layer's output,
  and the block returns the concatenation of all of them (a join node each time);
- ``ASPP``: the ``branches`` and the ``pooling`` branch all read the same input, their outputs are joined
  and then go through ``project``.
A ``Upsample`` inside the ASPP pooling branch, or the model's final one, resizes to the size of the branch
input / the model input (that is what their forward does), whatever its constructor argument was.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..nn import (
    AdaptiveAvgPool2d,
    AvgPool2d,
    BatchNorm2d,
    Concat,
    Conv2d,
    Dropout,
    Identity,
    MaxPool2d,
    ReLU,
    Sigmoid,
    Upsample,
)
from ..nn.functional import conv_output_size, pair

POINTWISE = (BatchNorm2d, ReLU, Sigmoid, Dropout, Identity, Concat)


@dataclass
class Node:
    """One spatial operation. ``inputs`` are indices of earlier nodes (node 0 is the input image).

    ``kind`` is one of "input", "conv", "maxpool", "avgpool", "gap" (global average pooling), "upsample",
    "join" (channel concatenation of paths that see the same grid). Per-axis quantities are (h, w) pairs.
    """
    name: str
    kind: str
    inputs: tuple
    size: tuple                      # output (H, W)
    kernel: tuple = (1, 1)
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    align_corners: bool = False      # upsample only
    scale: tuple | None = None       # upsample only: the scale factor PyTorch uses for source coordinates
    channels: tuple = (0, 0)         # conv only: (in, out), for multiply-add counts


class Graph:
    """The nodes of a traced model in topological (forward) order; ``nodes[-1]`` is the output."""

    def __init__(self, input_size):
        self.nodes: list[Node] = [Node("input", "input", (), tuple(input_size))]
        self.marks: dict[str, int] = {}   # module name -> index of the node that holds its output

    def add(self, node: Node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def size(self, i: int) -> tuple:
        return self.nodes[i].size


def trace(model, input_size) -> Graph:
    """Walk ``model`` for an input of spatial size ``input_size`` (int or (H, W)) and return its ``Graph``.

    Raises:
        TypeError: a leaf module whose effect on the spatial grid is unknown.
        ValueError: the input is too small for a layer, or joined paths disagree on the map size.
    """
    size = pair(input_size, "input_size")
    graph = Graph(size)
    out = _walk(model, "", 0, graph)
    if out != len(graph.nodes) - 1:      # a model that ends in pointwise layers: make the output explicit
        graph.add(Node("output", "join", (out,), graph.size(out)))
    return graph


def _join(graph: Graph, name: str, srcs: list) -> int:
    if len(srcs) == 1:
        return srcs[0]
    sizes = {graph.size(s) for s in srcs}
    if len(sizes) != 1:
        names = [graph.nodes[s].name for s in srcs]
        raise ValueError(f"receptive field: {name} concatenates maps of different sizes {sorted(sizes)} "
                         f"(from {names})")
    return graph.add(Node(name, "join", tuple(srcs), graph.size(srcs[0])))


def _walk(module, name: str, src: int, graph: Graph, resize_to=None) -> int:
    kind = type(module).__name__
    children = list(module.named_children())

    def sub(child):
        return f"{name}.{child}" if name else child

    if isinstance(module, (Conv2d, MaxPool2d, AvgPool2d)):
        out = _spatial(module, name, src, graph)
    elif isinstance(module, AdaptiveAvgPool2d):
        out = graph.add(Node(name, "gap", (src,), (1, 1), kernel=graph.size(src)))
    elif isinstance(module, Upsample):
        H, W = graph.size(src)
        target = tuple(resize_to) if resize_to is not None else module.output_size(H, W)
        scale = module.scale_factor if resize_to is None and not module.align_corners else None
        out = graph.add(Node(name, "upsample", (src,), target, align_corners=module.align_corners, scale=scale))
    elif isinstance(module, POINTWISE):
        out = src
    elif kind == "DenseNet" and hasattr(module, "features"):
        out = _walk(module.features, sub("features"), src, graph)
    elif kind == "DenseBlock":
        feats = [src]
        for child_name, child in children:
            inp = _join(graph, f"{sub(child_name)} (input concat)", feats)
            feats.append(_walk(child, sub(child_name), inp, graph))
        out = _join(graph, f"{name} (concat)", feats)
    elif kind == "ASPP":
        outs = [_walk(b, f"{sub('branches')}.{i}", src, graph) for i, b in enumerate(module.branches)]
        if module.pooling is not None:          # None: the ablation without image pooling
            outs.append(_walk(module.pooling, sub("pooling"), src, graph, resize_to=graph.size(src)))
        joined = _join(graph, sub("concat"), outs)
        out = _walk(module.project, sub("project"), joined, graph)
    elif children:
        if kind == "DeepLabV3":
            resize_to = graph.size(0)   # its final upsample goes back to the input size
        out = src
        for child_name, child in children:
            # the model's last resize (and the pooling branch's) goes back to the size its forward asks for
            last = child_name == children[-1][0]
            out = _walk(child, sub(child_name), out, graph, resize_to=resize_to if last else None)
    else:
        raise TypeError(f"receptive field: don't know how {kind} ({name or 'the model'}) changes the spatial grid; "
                        "only Conv2d, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Upsample and pointwise layers")
    graph.marks[name] = out
    return out


def _spatial(module, name, src, graph) -> int:
    H, W = graph.size(src)
    k, s, p = module.kernel_size, module.stride, module.padding
    d = getattr(module, "dilation", (1, 1))
    Ho, Wo = conv_output_size(H, k[0], s[0], p[0], d[0]), conv_output_size(W, k[1], s[1], p[1], d[1])
    if Ho < 1 or Wo < 1:
        raise ValueError(f"receptive field: {name} ({type(module).__name__}) gets a {H}x{W} map, too small for "
                         f"kernel {k} with padding {p} and dilation {d}")
    kind = {Conv2d: "conv", MaxPool2d: "maxpool", AvgPool2d: "avgpool"}[type(module)]
    channels = (module.in_channels, module.out_channels) if kind == "conv" else (0, 0)
    return graph.add(Node(name, kind, (src,), (Ho, Wo), k, s, p, d, channels=channels))
