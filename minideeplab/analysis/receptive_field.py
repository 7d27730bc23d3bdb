"""Receptive fields: the analytic table (Araujo et al., Distill 2019) and the exact dependency region.

Notation (one axis; the two spatial axes are independent and every quantity is an (h, w) pair):
``j`` the jump (distance in input pixels between neighbouring units of a map, the cumulative stride),
``r`` the receptive-field size, ``start`` the input coordinate of the centre of the first unit (pixel ``i``
of the input has centre ``i``). A layer with kernel ``k``, stride ``s``, padding ``p``, dilation ``d`` has the
effective kernel ``k_eff = d(k - 1) + 1`` and

    j_out = j_in * s,    r_out = r_in + (k_eff - 1) * j_in,    start_out = start_in + ((k_eff - 1)/2 - p) * j_in.

Where paths join (a concatenation) the field of a unit is the union of the fields of its inputs; the row says
which path gave the largest one. Global average pooling sees the whole map (r = r_in + (H_in - 1) j_in).
A bilinear resize reads two neighbouring source units, so it adds up to one ``j_in`` (the table shows the
maximum over output units) and divides the jump by the scale.

``receptive_field_region`` answers a different question exactly: which input pixels can influence one chosen
output unit, taking borders (zero padding), dilation holes and joins into account. It propagates one boolean
mask per axis backwards through the traced graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend import get_array_module, to_numpy
from ..nn.functional import pair
from ..nn.resize import bilinear_matrix
from .graph import Graph, trace


@dataclass
class RFRow:
    """One spatial layer (or join) of the receptive-field table. Per-axis fields are (h, w) pairs."""
    name: str
    kind: str
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    k_eff: tuple
    size: tuple
    jump: tuple
    rf: tuple
    start: tuple
    note: str = ""


def _fmt(pair_, digits=1):
    a, b = (round(v, digits) if isinstance(v, float) else v for v in pair_)
    a, b = (int(v) if float(v).is_integer() else v for v in (a, b))
    return f"{a}" if a == b else f"{a}x{b}"


class RFTable(list):
    """A list of ``RFRow`` (input first, model output last) that prints as a table.

    ``table.at("backbone")`` is the row holding the output of the module with that dotted name.
    """

    def __init__(self, rows, graph: Graph):
        super().__init__(rows)
        self.graph = graph

    @property
    def final(self) -> RFRow:
        return self[-1]

    def at(self, module_name: str) -> RFRow:
        if module_name not in self.graph.marks:
            raise KeyError(f"RFTable.at: no module named {module_name!r} on the spatial path")
        return self[self.graph.marks[module_name]]

    def subset(self, module_names) -> RFTable:
        """The rows holding the outputs of the named modules (e.g. the stages of a backbone), in that order."""
        return RFTable([self.at(n) for n in module_names], self.graph)

    def format(self, kinds=None, max_name: int = 58) -> str:
        """The table as text; ``kinds`` (e.g. {"conv", "join"}) keeps only those rows."""
        head = ["layer", "kind", "k", "s", "p", "d", "k_eff", "size", "jump", "RF", "start", "note"]
        body = []
        for r in self:
            if kinds is not None and r.kind not in kinds and r.kind != "input":
                continue
            name = r.name if len(r.name) <= max_name else "..." + r.name[-max_name + 3:]
            body.append([name, r.kind, _fmt(r.kernel), _fmt(r.stride), _fmt(r.padding), _fmt(r.dilation),
                         _fmt(r.k_eff), _fmt(r.size), _fmt(r.jump, 3), _fmt(r.rf), _fmt(r.start), r.note])
        widths = [max(len(str(row[i])) for row in [head] + body) for i in range(len(head))]
        lines = ["  ".join(str(c).ljust(w) if i in (0, 1, 11) else str(c).rjust(w)
                           for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in [head] + body]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()

    def _repr_pretty_(self, p, cycle):   # IPython/Jupyter display
        p.text(self.format())


def receptive_field(model, input_size) -> RFTable:
    """Analytic receptive field, jump and output size after every spatial layer of ``model``.

    Shapes:
        input_size: H or (H, W) of the image the model would receive.

    Args:
        model: a module tree (Sequential stacks, DenseNet, DeepLabV3, ...; see ``analysis.graph``).
        input_size: spatial size of the input image.

    Returns:
        ``RFTable`` (a list of ``RFRow``; ``print(table)`` shows it). Rows follow the forward order; each join
        row notes the path that gives the largest field, each global pooling row notes "whole map".
    """
    graph = trace(model, input_size)
    axes = [_axis_table(graph, a) for a in (0, 1)]
    rows = []
    for i, n in enumerate(graph.nodes):
        (jh, rh, sh, nh), (jw, rw, sw, _) = axes[0][i], axes[1][i]
        k_eff = tuple(d * (k - 1) + 1 for k, d in zip(n.kernel, n.dilation))
        rows.append(RFRow(n.name, n.kind, n.kernel, n.stride, n.padding, n.dilation, k_eff, n.size,
                          (jh, jw), (rh, rw), (sh, sw), nh))
    return RFTable(rows, graph)


def _axis_table(graph: Graph, axis: int):
    """Per node: (jump, rf, start, note) along one axis, by the recurrences of the module docstring."""
    out = []
    for n in graph.nodes:
        note = ""
        if n.kind == "input":
            j, r, start = 1, 1, 0
        elif n.kind in ("conv", "maxpool", "avgpool"):
            j0, r0, s0, _ = out[n.inputs[0]]
            k_eff = n.dilation[axis] * (n.kernel[axis] - 1) + 1
            j, r, start = j0 * n.stride[axis], r0 + (k_eff - 1) * j0, s0 + ((k_eff - 1) / 2 - n.padding[axis]) * j0
        elif n.kind == "gap":
            j0, r0, s0, _ = out[n.inputs[0]]
            size_in = graph.size(n.inputs[0])[axis]
            j, r, start, note = j0 * size_in, r0 + (size_in - 1) * j0, s0 + (size_in - 1) / 2 * j0, "whole map"
        elif n.kind == "upsample":
            j0, r0, s0, _ = out[n.inputs[0]]
            size_in = graph.size(n.inputs[0])[axis]
            A = _resize_matrix(n, size_in, axis)
            nz = A != 0
            first, last = nz.argmax(axis=1), size_in - 1 - nz[:, ::-1].argmax(axis=1)
            j = j0 * size_in / n.size[axis]
            r = r0 + int((last - first).max()) * j0
            start = s0 + float(A[0] @ np.arange(size_in)) * j0
            note = "max over output units"
        else:  # join: union of the first units' fields
            ins = [out[i] for i in n.inputs]
            lo = min(s - (r - 1) / 2 for _, r, s, _ in ins)
            hi = max(s + (r - 1) / 2 for _, r, s, _ in ins)
            best = max(range(len(ins)), key=lambda t: ins[t][1])
            j, r, start = ins[best][0], hi - lo + 1, (lo + hi) / 2
            r = int(r) if float(r).is_integer() else r
            if len(n.inputs) > 1:
                note = f"max via {graph.nodes[n.inputs[best]].name}"
        out.append((j, r, start, note))
    return out


def _resize_matrix(node, size_in: int, axis: int):
    scale = node.scale[axis] if node.scale is not None else None
    return bilinear_matrix(size_in, node.size[axis], node.align_corners, scale)


@dataclass
class RFRegion:
    """The input pixels that can influence one output unit: one boolean mask per axis (their outer product
    is the 2-D set) and its bounding box ``(top, left, bottom, right)``, inclusive."""
    position: tuple
    mask_h: np.ndarray
    mask_w: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        return self.mask_h[:, None] & self.mask_w[None, :]

    @property
    def bbox(self) -> tuple:
        rows, cols = np.flatnonzero(self.mask_h), np.flatnonzero(self.mask_w)
        return int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])


def receptive_field_region(model, input_size, position=None) -> RFRegion:
    """Exactly which input pixels can influence the output unit at ``position`` (default: the centre).

    Unlike the table's translation-invariant size, this accounts for the image border (padding reads zeros),
    the holes of dilated kernels and every path of every join.

    Args:
        model: as for ``receptive_field``.
        input_size: H or (H, W).
        position: (row, col) of the unit in the model's output map; default (Ho // 2, Wo // 2).

    Returns:
        ``RFRegion`` with the per-axis masks and the bounding box.
    """
    graph = trace(model, input_size)
    position = _output_position("receptive_field_region", position, graph.nodes[-1].size)
    masks = [_axis_region(graph, a, position[a]) for a in (0, 1)]
    return RFRegion(position, masks[0], masks[1])


def _output_position(caller: str, position, output_size) -> tuple:
    """``position`` as ints (default: the centre of the output map), or a ValueError when it lies outside."""
    Ho, Wo = output_size
    position = (Ho // 2, Wo // 2) if position is None else tuple(int(v) for v in position)
    if not (0 <= position[0] < Ho and 0 <= position[1] < Wo):
        raise ValueError(f"{caller}: position {position} is outside the {Ho}x{Wo} output map")
    return position


def _axis_region(graph: Graph, axis: int, pos: int) -> np.ndarray:
    need = [np.zeros(n.size[axis], dtype=bool) for n in graph.nodes]
    need[-1][pos] = True
    for i in range(len(graph.nodes) - 1, 0, -1):
        n, m = graph.nodes[i], need[i]
        if not m.any():
            continue
        for src in n.inputs:
            size_in = graph.size(src)[axis]
            if n.kind in ("conv", "maxpool", "avgpool"):
                k, s, p, d = n.kernel[axis], n.stride[axis], n.padding[axis], n.dilation[axis]
                idx = np.flatnonzero(m) * s - p
                taps = (idx[:, None] + d * np.arange(k)[None, :]).ravel()
                need[src][taps[(taps >= 0) & (taps < size_in)]] = True
            elif n.kind == "gap":
                need[src][:] = True
            elif n.kind == "upsample":
                need[src] |= (_resize_matrix(n, size_in, axis)[m] != 0).any(axis=0)
            else:  # join: every input path
                need[src] |= m
    return need[0]


@dataclass
class EmpiricalRF:
    """The effective receptive field of one output unit (Luo et al., 2016).

    ``grad_map`` (H, W): sum over channels of |dL/dx| for L = the chosen output unit(s); ``bbox``:
    ``(top, left, bottom, right)`` of the non-zero entries (inclusive), None if the gradient vanished.
    """
    position: tuple
    output_size: tuple
    grad_map: np.ndarray
    bbox: tuple | None

    @property
    def mask(self) -> np.ndarray:
        return self.grad_map != 0


def empirical_receptive_field(model, input_size, position=None, x=None, channel=None,
                              rng: np.random.Generator | None = None) -> EmpiricalRF:
    """Send a unit gradient from one output location back to the input through the hand-written backward.

    The model runs in its current mode (call ``model.eval()`` first for frozen batch-norm statistics).
    Parameter gradients are restored afterwards, so the call leaves ``param.grad`` as it found it.

    Shapes:
        x: (1, C, H, W) with the parameters' dtype and device; default: standard normal noise from ``rng``.
        grad_map: (H, W).

    Args:
        model: a module with ``forward``/``backward`` whose first layer is a Conv2d (to infer C).
        input_size: H or (H, W) (ignored when ``x`` is given).
        position: (row, col) in the output map; default its centre.
        x: the input to linearise at (e.g. positive values, to keep every ReLU open).
        channel: which output channel gets the unit gradient; None = all channels.
        rng: ``numpy.random.Generator`` for the default input.
    """
    params = list(model.parameters())
    if x is None:
        first = next((m for m in model.modules() if hasattr(m, "in_channels")), None)
        if first is None or not params:
            raise ValueError("empirical_receptive_field: give x: the model has no Conv2d to infer input channels")
        H, W = pair(input_size, "input_size")
        rng = rng if rng is not None else np.random.default_rng(0)
        xp = get_array_module(params[0].data)
        x = xp.asarray(rng.standard_normal((1, first.in_channels, H, W)), dtype=params[0].data.dtype)
    if x.shape[0] != 1:
        raise ValueError(f"empirical_receptive_field: expects a batch of one image, got x of shape {tuple(x.shape)}")
    xp = get_array_module(x)
    saved = [p.grad.copy() for p in params]
    out = model(x)
    Ho, Wo = out.shape[2:]
    position = _output_position("empirical_receptive_field", position, (Ho, Wo))
    dout = xp.zeros_like(out)
    dout[0, slice(None) if channel is None else channel, position[0], position[1]] = 1.0
    dx = model.backward(dout)
    for p, g in zip(params, saved):
        p.grad[...] = g
    grad_map = to_numpy(xp.abs(dx[0]).sum(axis=0)).astype(np.float64)
    rows, cols = np.flatnonzero(grad_map.any(axis=1)), np.flatnonzero(grad_map.any(axis=0))
    bbox = (int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])) if rows.size else None
    return EmpiricalRF(position, (int(Ho), int(Wo)), grad_map, bbox)
