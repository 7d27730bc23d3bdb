"""Gradient flow: each layer's activations and gradients during one training step, recorded with hooks.

    records = record_step(model, images, masks, BCEWithLogitsLoss())
    print(format_records(records))
    plot_gradient_flow(records, "flow.png")               # |dL/d(output)| per layer along depth, log scale
    plot_activation_histograms(records, "hist.png")       # a grid of histograms for a few layers

``record_step`` registers a forward hook and a full backward hook on every chosen layer (``nn/hooks.py``), runs one
forward, the loss and one backward in the model's current mode, removes the hooks and returns one ``LayerRecord``
per layer in module order (which is forward order, the ASPP's parallel branches one after the other). It does no
optimizer step and puts the batch-norm running statistics back as they were; the parameters' ``.grad`` hold this
step's gradients afterwards (zeroed first).

What to read from it: the norm of dL/d(layer output) along depth shows whether the gradient fades (vanishes) or
grows on its way back to the first layers; ``update_ratio`` (|grad| / |weight| of a layer's parameters, times the
learning rate: the relative size of one SGD step) whether some layers learn far faster than others; the fraction
of zeros after each ReLU how many units are off. While the hooks are on, the fast model runs its fused heads layer
by layer (the same numbers, a little slower): a record is for looking, not for timing.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from ..backend import get_array_module, to_numpy
from ..io import atomic_write
from ..nn.module import Identity, Module

QUANTITIES = {"grad_norm": "|dL/d(output)|", "grad_rms": "RMS of dL/d(output)",
              "param_grad_norm": "|dL/d(parameters)|", "update_ratio": "|dL/dW| / |W|",
              "act_std": "std of the output"}


@dataclass
class LayerRecord:
    """One layer's statistics during one step (NaN where the layer has no such thing, e.g. no parameters).

    Activation: the layer's output (forward). Gradient: dL/d(layer output) (backward's ``dout``). Parameters: the
    layer's own, after the step's backward. ``act_hist``/``grad_hist``: ``(counts, edges)`` of all values."""

    index: int
    name: str
    type: str
    shape: tuple = ()
    act_mean: float = math.nan
    act_std: float = math.nan
    act_min: float = math.nan
    act_max: float = math.nan
    act_zero_fraction: float = math.nan
    grad_norm: float = math.nan
    grad_rms: float = math.nan
    grad_mean: float = math.nan
    grad_std: float = math.nan
    param_grad_norm: float = math.nan
    weight_norm: float = math.nan
    update_ratio: float = math.nan
    act_hist: tuple | None = field(default=None, repr=False)
    grad_hist: tuple | None = field(default=None, repr=False)


def default_layers(model: Module) -> list[tuple[str, Module]]:
    """The layers ``record_step`` watches by default: every leaf module (no children) but ``Identity``."""
    return [(n, m) for n, m in model.named_modules() if not m._modules and not isinstance(m, Identity)]


def _histogram(a, bins: int):
    xp = get_array_module(a)
    lo, hi = float(a.min()), float(a.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    counts, edges = xp.histogram(a, bins=bins, range=(lo, hi) if hi > lo else (lo - 0.5, lo + 0.5))
    return to_numpy(counts), to_numpy(edges)


def _activation(record: LayerRecord, out, bins: int) -> None:
    if getattr(out, "shape", None) is None:
        return
    xp = get_array_module(out)
    record.shape = tuple(out.shape)
    record.act_mean = float(xp.mean(out, dtype=xp.float64))
    record.act_std = float(xp.std(out, dtype=xp.float64))
    record.act_min, record.act_max = float(out.min()), float(out.max())
    record.act_zero_fraction = float(xp.count_nonzero(out == 0)) / max(out.size, 1)
    record.act_hist = _histogram(out, bins)


def _gradient(record: LayerRecord, dout, bins: int) -> None:
    if getattr(dout, "shape", None) is None:      # a loss's dout = 1.0 (not a layer)
        return
    xp = get_array_module(dout)
    sq = float(xp.sum(xp.square(dout, dtype=xp.float64)))
    record.grad_norm, record.grad_rms = math.sqrt(sq), math.sqrt(sq / max(dout.size, 1))
    record.grad_mean = float(xp.mean(dout, dtype=xp.float64))
    record.grad_std = float(xp.std(dout, dtype=xp.float64))
    record.grad_hist = _histogram(dout, bins)


def _parameters(record: LayerRecord, module: Module) -> None:
    params = list(module._parameters.values())
    if not params:
        return
    g2 = sum(float(get_array_module(p.grad).sum(p.grad.astype("float64") ** 2)) for p in params)
    w2 = sum(float(get_array_module(p.data).sum(p.data.astype("float64") ** 2)) for p in params)
    record.param_grad_norm, record.weight_norm = math.sqrt(g2), math.sqrt(w2)
    record.update_ratio = record.param_grad_norm / record.weight_norm if w2 > 0 else math.inf


def record_step(model: Module, x, target, loss_fn, layers=None, bins: int = 60) -> list[LayerRecord]:
    """One forward, loss and backward of ``model`` on ``(x, target)`` with every layer watched; one record per layer.

    Args:
        model: a fast or textbook model (any ``Module`` with ``forward``/``backward``), in the mode to record
            (``train()``: batch statistics and dropout, as a training step; ``eval()``).
        x, target: a batch and its target, as ``loss_fn(model(x), target)`` takes them.
        loss_fn: a loss module (``BCEWithLogitsLoss()``, ...): ``loss_fn.backward()`` gives dL/dlogits.
        layers: which modules: None (every leaf layer but ``Identity``), a list of dotted names, or a predicate
            ``(name, module) -> bool``.
        bins: histogram bins per layer (range: the layer's min to max).

    Returns:
        ``LayerRecord`` per layer in module order. The loss value is ``records.loss`` (a ``FlowRecords`` list).

    Shapes: x: what the model takes, e.g. (N, 3, H, W); target: what the loss takes, e.g. (N, 1, H, W).
    """
    named = dict(model.named_modules())
    if layers is None:
        chosen = default_layers(model)
    elif callable(layers):
        chosen = [(n, m) for n, m in model.named_modules() if layers(n, m)]
    else:
        missing = [n for n in layers if n not in named]
        if missing:
            raise ValueError(f"record_step: no module named {missing[0]!r} in {type(model).__name__} "
                             f"(names as model.named_modules() gives them, e.g. {next(iter(named), '')!r})")
        wanted = set(layers)
        chosen = [(n, m) for n, m in model.named_modules() if n in wanted]
    if not chosen:
        raise ValueError(f"record_step: no layer of {type(model).__name__} chosen to record")
    records = FlowRecords(LayerRecord(i, n, type(m).__name__) for i, (n, m) in enumerate(chosen))
    buffers = {k: b.copy() for k, b in model.named_buffers() if b is not None}
    handles = []
    try:
        for record, (_, m) in zip(records, chosen):
            handles.append(m.register_forward_hook(lambda _m, _in, out, r=record: _activation(r, out, bins)))
            handles.append(m.register_full_backward_hook(lambda _m, _gi, go, r=record: _gradient(r, go[0], bins)
                                                         if go else None))
        model.zero_grad()
        loss = loss_fn(model(x), target)
        model.backward(loss_fn.backward())
    finally:
        for h in handles:
            h.remove()
        for key, value in model.named_buffers():        # a record is no training step: running statistics back
            if key in buffers:
                value[...] = buffers[key]
    records.loss = float(loss)
    for record, (_, m) in zip(records, chosen):
        _parameters(record, m)
    return records


class FlowRecords(list):
    """The list of ``LayerRecord`` that ``record_step`` returns, with the step's ``loss``."""

    loss: float = math.nan


def format_records(records, every: int = 1) -> str:
    """A text table of the records (every ``every``-th row): name, type, output shape and the main statistics."""
    head = (f"{'#':>3} {'layer':<44} {'type':<12} {'act mean':>9} {'act std':>9} {'zeros':>6} "
            f"{'|dL/dout|':>10} {'|dL/dW|/|W|':>11}")
    rows = [head]
    for r in list(records)[::every]:
        rows.append(f"{r.index:>3} {short_name(r.name)[-44:]:<44} {r.type[:12]:<12} {r.act_mean:>9.3g} {r.act_std:>9.3g} "
                    f"{r.act_zero_fraction:>6.1%} {r.grad_norm:>10.3g} {r.update_ratio:>11.3g}")
    return "\n".join(rows)


def stage_of(name: str) -> str:
    """The stage a layer belongs to, for labels: ``denseblock2``, ``transition1``, ``aspp``, ``classifier``, the
    stem's ``conv0``... (the first part of its dotted name past ``backbone``, ``features`` and ``head``)."""
    parts = [p for p in name.split(".") if p not in ("backbone", "features", "head")]
    stage = parts[0] if parts else name
    return "stem" if re.fullmatch(r"(conv|norm|relu|pool)0", stage) else stage


def short_name(name: str) -> str:
    """A layer's name without ``backbone.features.`` and ``head.``: ``denseblock2.denselayer1.conv1``."""
    for prefix in ("backbone.features.", "backbone.", "features.", "head."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _new_figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> str:
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
    return str(path)


def _type_colours(types):
    from matplotlib import colormaps
    cmap = colormaps["tab10"]
    return {t: cmap(i % 10) for i, t in enumerate(dict.fromkeys(types))}


def plot_gradient_flow(records, path_or_ax, quantity: str = "grad_norm", title: str | None = None):
    """``quantity`` per layer along depth (log scale), one colour per layer type, the stages shaded and labelled.

    Args:
        records: from ``record_step``.
        path_or_ax: a file path (a PNG is written atomically; returns the path) or a Matplotlib ``Axes`` to draw
            into (returns it).
        quantity: ``grad_norm`` (|dL/d(layer output)|, default), ``grad_rms``, ``param_grad_norm``,
            ``update_ratio`` or ``act_std``.
    """
    if quantity not in QUANTITIES:
        raise ValueError(f"plot_gradient_flow: quantity must be one of {sorted(QUANTITIES)}, got {quantity!r}")
    path = None if hasattr(path_or_ax, "plot") else path_or_ax
    ax = _new_figure((11, 3.8)).add_subplot() if path is not None else path_or_ax
    records = list(records)
    values = np.array([getattr(r, quantity) for r in records], dtype=float)
    shown = np.isfinite(values) & (values > 0)
    colours = _type_colours(r.type for r in records)
    stages = [stage_of(r.name) for r in records]
    start, shade = 0, False
    for i in range(1, len(records) + 1):      # shade every other stage, label the wide ones
        if i == len(records) or stages[i] != stages[start]:
            if shade:
                ax.axvspan(start - 0.5, i - 0.5, color="0.92", lw=0)
            shade = not shade
            if i - start >= 3:
                ax.text((start + i - 1) / 2, 1.0, stages[start], transform=ax.get_xaxis_transform(), ha="center",
                        va="bottom", fontsize=7, rotation=30)
            start = i
    idx = np.arange(len(records))
    ax.plot(idx[shown], values[shown], "-", color="0.6", lw=0.8, zorder=1)
    for t, colour in colours.items():
        sel = shown & np.array([r.type == t for r in records])
        if sel.any():
            ax.scatter(idx[sel], values[sel], s=12, color=colour, label=t, zorder=2)
    ax.set_yscale("log")
    ax.set_xlim(-1, len(records))
    ax.set_xlabel("layer (module order = depth; the loss is to the right)")
    ax.set_ylabel(QUANTITIES[quantity])
    if title:
        ax.set_title(title, pad=28)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False)   # beside the data
    return _save(ax.figure, path) if path is not None else ax


def plot_activation_histograms(records, path_or_fig, names=None, which: str = "activation", count: int = 8,
                               cols: int = 4):
    """A grid of histograms, one per layer: the values of its output (``which="activation"``) or of dL/d(output)
    (``which="gradient"``), log-scaled counts, with the fraction of zeros in the title.

    Args:
        records: from ``record_step``.
        path_or_fig: a file path (PNG, written atomically; returns the path) or a Matplotlib ``Figure`` to fill.
        names: the layers (dotted names); None: ``count`` of them, evenly spaced along depth.
        cols: panels per row.
    """
    if which not in ("activation", "gradient"):
        raise ValueError(f"plot_activation_histograms: which must be 'activation' or 'gradient', got {which!r}")
    records = list(records)
    attr = "act_hist" if which == "activation" else "grad_hist"
    usable = [r for r in records if getattr(r, attr) is not None]
    if names is None:
        picks = np.unique(np.linspace(0, len(usable) - 1, min(count, len(usable))).round().astype(int))
        chosen = [usable[i] for i in picks]
    else:
        by_name = {r.name: r for r in usable}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(f"plot_activation_histograms: no {which} histogram recorded for {unknown[0]!r}")
        chosen = [by_name[n] for n in names]
    if not chosen:
        raise ValueError(f"plot_activation_histograms: no layer has a recorded {which} histogram")
    from matplotlib.ticker import NullFormatter
    rows = -(-len(chosen) // cols)
    path = None if hasattr(path_or_fig, "add_subplot") else path_or_fig
    fig = _new_figure((3.2 * cols, 2.4 * rows)) if path is not None else path_or_fig
    colours = _type_colours(r.type for r in records)
    for k, r in enumerate(chosen):
        ax = fig.add_subplot(rows, cols, k + 1)
        counts, edges = getattr(r, attr)
        ax.stairs(np.maximum(counts, 0.5), edges, fill=True, color=colours[r.type], baseline=0.5)
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(NullFormatter())     # (a narrow range would label its minor ticks too)
        zeros = f", {r.act_zero_fraction:.0%} zeros" if which == "activation" else ""
        ax.set_title(f"#{r.index} {short_name(r.name)}\n{r.type}{zeros}", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _save(fig, path) if path is not None else fig
