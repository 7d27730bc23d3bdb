"""Training figures with Matplotlib's Agg canvas (no display, no global pyplot state), written atomically."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .data.transforms import denormalize
from .io import atomic_write


def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)
    return path


def overlay(image: np.ndarray, mask: np.ndarray, colour=(1.0, 0.15, 0.1), alpha: float = 0.5) -> np.ndarray:
    """Tint the mask's pixels. Shapes: image (H, W, 3) in [0, 1], mask (H, W) bool -> (H, W, 3) in [0, 1]."""
    out = image.copy()
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(colour, dtype=out.dtype)
    return out


def plot_curves(history: list, path) -> Path:
    """``curves.png``: loss (train, validation) and IoU (train, validation) per epoch."""
    fig = _figure((9, 3.5))
    ax_loss, ax_iou = fig.subplots(1, 2)
    epochs = [row["epoch"] for row in history]
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        ax_loss.plot(epochs, [row[key] for row in history], marker="o", label=label)
    for key, label in (("train_iou", "train (running)"), ("val_iou", "validation")):
        ax_iou.plot(epochs, [row[key] for row in history], marker="o", label=label)
    ax_loss.set(title="loss", xlabel="epoch")
    ax_iou.set(title="IoU", xlabel="epoch", ylim=(0, 1))
    from matplotlib.ticker import MaxNLocator
    for ax in (ax_loss, ax_iou):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_predictions(images, masks, probs, path, threshold: float = 0.5) -> Path:
    """``predictions.png``: one row per image - image / ground truth / prediction / overlay.

    Shapes: images (N, 3, H, W) ImageNet-normalised, masks (N, 1, H, W), probs (N, 1, H, W) on the host.
    """
    n = len(images)
    fig = _figure((8, 2.1 * n))
    axes = np.asarray(fig.subplots(n, 4, squeeze=False))
    for i in range(n):
        img = denormalize(images[i])
        pred = np.asarray(probs[i, 0]) > threshold        # as model.predict and the metrics
        panels = [(img, "image"), (masks[i, 0], "ground truth"), (pred, "prediction"),
                  (overlay(img, pred), "overlay")]
        for ax, (panel, title) in zip(axes[i], panels):
            ax.imshow(panel, cmap="gray" if panel.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            ax.set_axis_off()
            if i == 0:
                ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)
