"""The figures of the docs and notebooks, computed by the package.

``python -m minideeplab.analysis.figures [--out docs/figures] [--quick]`` regenerates the PNGs under
``docs/figures/``. Each ``*_figure`` function returns a ``matplotlib.figure.Figure`` (no pyplot state, so it
works the same in a notebook, a script or a test).
"""
from __future__ import annotations

import argparse
import os

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch, Rectangle

from ..io import atomic_write
from .receptive_field import empirical_receptive_field, receptive_field, receptive_field_region
from .valid_weights import valid_weight_curves

STAGES = ["conv0", "pool0", "denseblock1", "transition1", "denseblock2", "transition2", "denseblock3",
          "transition3", "denseblock4"]


def save_figure(fig: Figure, path, dpi: int = 110) -> str:
    """Write ``fig`` as PNG atomically (temporary file in the same folder + ``os.replace``)."""
    path = os.fspath(path)
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight")
    return path


def valid_weights_figure(feature_size: int = 65, kernel_size: int = 3) -> Figure:
    """DeepLabV3's Figure 4: fraction of positions with 1, 4 or 9 valid weights of a 3x3 filter vs the rate."""
    rates, curves = valid_weight_curves(feature_size, kernel_size=kernel_size)   # rates 1..S
    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot()
    for m, style in zip(curves, ("-", "--", ":")):
        ax.plot(rates, curves[m], style, lw=2, label=f"{m} valid weight{'s' if m > 1 else ''}")
    ax.set_xlabel("atrous rate")
    ax.set_ylabel("fraction of output positions")
    ax.set_title(f"{kernel_size}x{kernel_size} atrous filter on a {feature_size}x{feature_size} map")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def output_stride_figure(builder, input_size: int = 512, output_strides=(32, 16, 8)) -> Figure:
    """Map size and receptive field after each DenseNet stage, one line per output stride.

    Args:
        builder: ``output_stride -> DenseNet`` (e.g. ``lambda os: densenet121(os)``).
    """
    fig = Figure(figsize=(10, 3.6))
    ax_size, ax_rf = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    x = np.arange(len(STAGES))
    for os_, marker in zip(output_strides, "os^"):
        table = receptive_field(builder(os_), input_size)
        rows = [table.at(f"features.{s}") for s in STAGES]
        ax_size.plot(x, [r.size[0] for r in rows], marker + "-", label=f"OS {os_}")
        ax_rf.plot(x, [r.rf[0] for r in rows], marker + "-", label=f"OS {os_}")
    ax_size.set_yscale("log", base=2)
    ax_rf.set_yscale("log", base=2)
    ax_size.set_ylabel(f"feature-map side (input {input_size})")
    ax_rf.set_ylabel("receptive field (pixels)")
    ax_rf.axhline(input_size, color="gray", lw=1, ls="--")
    ax_rf.text(0, input_size * 1.15, "input size", color="gray", fontsize=8)
    for ax in (ax_size, ax_rf):
        ax.set_xticks(x, STAGES, rotation=45, ha="right", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("DenseNet121: atrous blocks keep the resolution while the receptive field stays about the same")
    return fig


def effective_rf_figure(models: dict, input_size, rng: np.random.Generator | None = None) -> Figure:
    """Heat maps of |dL/dx| for the centre output unit (the effective field) with the exact region's box.

    Args:
        models: label -> model (in the mode it should run, usually eval).
        input_size: H or (H, W).
        rng: Generator for the random input.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    fig = Figure(figsize=(3.4 * len(models), 3.6))
    for i, (label, model) in enumerate(models.items()):
        ax = fig.add_subplot(1, len(models), i + 1)
        emp = empirical_receptive_field(model, input_size, rng=rng)
        region = receptive_field_region(model, input_size, position=emp.position)
        ax.imshow(emp.grad_map / emp.grad_map.max(), cmap="magma", vmin=0, vmax=1)
        top, left, bottom, right = region.bbox
        ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left + 1, bottom - top + 1, fill=False,
                               ec="cyan", lw=1.5, ls="--"))
        ax.set_title(f"{label}\noutput {emp.output_size[0]}x{emp.output_size[1]}, unit {emp.position}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("effective receptive field: |gradient| of the centre unit, scaled to 1 (dashed box: every pixel "
                 "that can influence it)", fontsize=10)
    return fig


def _box(ax, x, y, w, h, text, color):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02", fc=color, ec="black", lw=0.8))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=7)


def _arrow(ax, x0, y0, x1, y1):
    ax.annotate("", (x1, y1), (x0, y0), arrowprops={"arrowstyle": "->", "lw": 0.8})


def architecture_figure(model, input_size: int = 512) -> Figure:
    """DeepLabV3 on DenseNet: the stages with their (channels, map size) read from ``model`` itself."""
    table = receptive_field(model, input_size)
    feats = model.backbone.features
    fig = Figure(figsize=(17.5, 4.8))
    ax = fig.add_subplot()
    ax.set_xlim(0, 17.5)
    ax.set_ylim(0, 4.6)
    ax.axis("off")
    x, y, w, h = 0.1, 3.2, 1.55, 0.9
    _box(ax, x, y, w, h, f"input\n3 x {input_size}", "#eeeeee")
    steps = [("conv0", "7x7 conv s2\n+ 3x3 max pool s2", "pool0", feats.conv0.out_channels)]
    for i in range(1, 5):
        block = getattr(feats, f"denseblock{i}")
        steps.append((f"denseblock{i}", f"dense block {i}\n{block.num_layers} layers, d={block.dilation}",
                      f"denseblock{i}", block.out_channels))
        if i < 4:
            tr = getattr(feats, f"transition{i}")
            pooled = type(tr.pool).__name__ != "Identity"
            steps.append((f"transition{i}", f"transition {i}\n1x1 conv{' + 2x2 avg' if pooled else ' (no pool)'}",
                          f"transition{i}", tr.conv.out_channels))
    for _, label, mark, channels in steps:
        row = table.at(f"backbone.features.{mark}")
        _arrow(ax, x + w, y + h / 2, x + w + 0.2, y + h / 2)
        x += w + 0.2
        color = "#cfe2ff" if "dense" in label else "#fde2c8"
        _box(ax, x, y, w, h, f"{label}\n{channels} x {row.size[0]}  (RF {row.rf[0]})", color)
    aspp = model.head.aspp
    xa = 1.5
    branch_labels = ["1x1 conv"] + [f"3x3 conv rate {r}" for r in aspp.rates] + ["image pooling\n(GAP, 1x1, upsample)"]
    feat_size = table.at("backbone").size[0]
    _arrow(ax, x + w / 2, y, xa + 2.5, 2.45)
    ax.text(xa + 2.6, 2.55, f"features {model.backbone.out_channels} x {feat_size}  (output stride "
            f"{model.output_stride})", fontsize=8)
    for i, label in enumerate(branch_labels):
        _box(ax, xa + 3.1 * i, 1.3, 2.6, 0.75, f"{label}\n+ BN + ReLU -> {aspp.out_channels}", "#d9f2d9")
    head_steps = [f"concat\n{5 * aspp.out_channels} x {feat_size}",
                  f"1x1 conv + BN + ReLU\n+ dropout -> {aspp.out_channels}",
                  f"classifier 1x1\n-> {model.num_classes} logit",
                  f"bilinear upsample\nx{model.output_stride} -> {input_size}",
                  "sigmoid\nmask probability"]
    xs = 1.5
    for i, label in enumerate(head_steps):
        _box(ax, xs, 0.1, 2.6, 0.75, label, "#f3d9fa" if i < 2 else "#eeeeee")
        if i:
            _arrow(ax, xs - 0.5, 0.475, xs, 0.475)
        xs += 3.1
    ax.text(0.1, 1.65, "ASPP", fontsize=10, weight="bold")
    ax.text(0.1, 0.45, "head", fontsize=10, weight="bold")
    fig.suptitle("DeepLabV3 with a DenseNet121 backbone (channels x map side for a "
                 f"{input_size}x{input_size} input, RF = receptive field)", fontsize=10)
    return fig


def main(argv=None) -> int:
    """Regenerate every figure of the docs (takes about a minute on a laptop CPU; ``--quick`` a few seconds)."""
    from ..models import DeepLabConfig, build_deeplab, deeplabv3_densenet121, densenet121

    parser = argparse.ArgumentParser(prog="python -m minideeplab.analysis.figures", description=main.__doc__)
    parser.add_argument("--out", default=os.path.join("docs", "figures"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="small models for the effective-RF maps")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    written = [save_figure(valid_weights_figure(), os.path.join(args.out, "valid_weights.png")),
               save_figure(output_stride_figure(lambda os_: densenet121(os_, rng=rng)),
                           os.path.join(args.out, "rf_output_stride.png")),
               save_figure(architecture_figure(deeplabv3_densenet121(rng=rng)),
                           os.path.join(args.out, "architecture.png"))]
    if args.quick:
        models = {f"small DenseNet, OS {s}": build_deeplab(DeepLabConfig.small(output_stride=s), rng=rng).backbone.eval()
                  for s in (32, 16, 8)}
        size = 256
    else:
        models = {f"DenseNet121, OS {s}": densenet121(s, rng=rng).eval() for s in (32, 16, 8)}
        size = 224
    written.append(save_figure(effective_rf_figure(models, size, rng), os.path.join(args.out, "effective_rf.png")))
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
