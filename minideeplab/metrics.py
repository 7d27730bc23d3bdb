"""Segmentation metrics from confusion counts accumulated over batches.

``ConfusionMeter`` thresholds probabilities (``pred = probs > threshold``, as ``model.predict`` does),
counts true/false positives and negatives over every pixel it is given, and derives the metrics from the
totals (micro-averaging: one IoU over the whole data set, not a mean of per-image IoUs).

Conventions for the 0/0 cases (a ratio with nothing to count):
- IoU = tp / (tp + fp + fn) and Dice = 2tp / (2tp + fp + fn) are 1 when mask and prediction are both empty
  (a perfect empty prediction).
- precision = tp / (tp + fp) is 1 when nothing is predicted positive (no false claim was made);
  recall = tp / (tp + fn) is 1 when the mask has no foreground (nothing was missed). With these, Dice equals
  the F1 score 2PR / (P + R) in every case (e.g. an empty prediction of a non-empty mask: P = 1, R = 0, F1 = 0).
- accuracy = (tp + tn) / pixels; ``compute()`` before any pixel was counted is a RuntimeError.
"""
from __future__ import annotations

from .backend import get_array_module

METRIC_NAMES = ("iou", "dice", "precision", "recall", "accuracy")
COUNT_NAMES = ("tp", "fp", "fn", "tn")


def _ratio(num: int, den: int) -> float:
    """num / den, with 0/0 read as the vacuously perfect score 1 (see the module docstring)."""
    return 1.0 if den == 0 else num / den


class ConfusionMeter:
    """Accumulates TP/FP/FN/TN of a binary segmentation over batches.

    Shapes: ``update(probs, target)``: probs (N, 1, H, W) or any shape, target (same), on any backend.

    Args:
        threshold: a pixel is predicted foreground when its probability is > threshold (strictly, like
            ``DeepLabV3.predict``: a logit of exactly 0 is background).
    """

    def __init__(self, threshold: float = 0.5):
        if not 0 <= threshold <= 1:
            raise ValueError(f"ConfusionMeter: threshold must be in [0, 1], got {threshold}")
        self.threshold = float(threshold)
        self.reset()

    def reset(self) -> None:
        """Forget all counts."""
        self.tp = self.fp = self.fn = self.tn = 0

    def update(self, probs, target) -> None:
        """Add the counts of one batch. ``probs`` are probabilities in [0, 1] (or a boolean prediction);
        ``target`` a {0, 1} (or boolean) mask of the same shape."""
        xp = get_array_module(probs, target)
        probs, target = xp.asarray(probs), xp.asarray(target)
        if tuple(probs.shape) != tuple(target.shape):
            raise ValueError(f"ConfusionMeter.update: probs and target must have the same shape, "
                             f"got {tuple(probs.shape)} and {tuple(target.shape)}")
        if probs.dtype.kind == "b":
            pred = probs
        elif probs.dtype.kind == "f":
            if probs.size and (float(probs.min()) < 0 or float(probs.max()) > 1):
                raise ValueError(f"ConfusionMeter.update: probs must be probabilities in [0, 1], got values in "
                                 f"[{float(probs.min()):.4g}, {float(probs.max()):.4g}] "
                                 "(logits? apply a sigmoid first)")
            pred = probs > self.threshold
        else:
            raise TypeError(f"ConfusionMeter.update: probs must be a float or boolean array, got {probs.dtype}")
        if target.dtype.kind not in "biuf":
            raise TypeError(f"ConfusionMeter.update: target must be a {{0, 1}} mask, got dtype {target.dtype}")
        if bool(xp.any((target != 0) & (target != 1))):
            raise ValueError("ConfusionMeter.update: target must be a binary mask with values in {0, 1}")
        truth = target == 1
        tp = int(xp.count_nonzero(pred & truth))
        n_pred, n_true = int(xp.count_nonzero(pred)), int(xp.count_nonzero(truth))
        self.tp += tp
        self.fp += n_pred - tp
        self.fn += n_true - tp
        self.tn += int(pred.size) - n_pred - n_true + tp

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    def compute(self) -> dict:
        """``dict(iou, dice, precision, recall, accuracy)`` as floats plus the counts ``tp, fp, fn, tn``."""
        if self.total == 0:
            raise RuntimeError("ConfusionMeter.compute: no pixels counted yet (call update first)")
        tp, fp, fn, tn = self.tp, self.fp, self.fn, self.tn
        return {
            "iou": _ratio(tp, tp + fp + fn),
            "dice": _ratio(2 * tp, 2 * tp + fp + fn),
            "precision": _ratio(tp, tp + fp),
            "recall": _ratio(tp, tp + fn),
            "accuracy": (tp + tn) / self.total,
            "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        }

    def __repr__(self) -> str:
        return (f"ConfusionMeter(threshold={self.threshold}, tp={self.tp}, fp={self.fp}, fn={self.fn}, "
                f"tn={self.tn})")


def format_metrics(metrics: dict, title: str | None = None) -> str:
    """A two-column text table of a metrics dict: the standard metrics first, then any other keys, then
    the counts. Floats print with 4 decimals, integers as they are."""
    keys = [k for k in METRIC_NAMES if k in metrics]
    keys += [k for k in metrics if k not in METRIC_NAMES and k not in COUNT_NAMES]
    keys += [k for k in COUNT_NAMES if k in metrics]

    def fmt(v) -> str:
        if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "item"):
            return str(v)
        v = v.item() if hasattr(v, "item") else v
        return str(v) if isinstance(v, int) else f"{v:.4f}"

    cells = [(k, fmt(metrics[k])) for k in keys]
    kw = max([len(k) for k, _ in cells] + [len("metric")])
    vw = max([len(v) for _, v in cells] + [len("value")])
    rule = "-" * (kw + vw + 3)
    lines = ([title] if title else []) + [f"{'metric':<{kw}} | {'value':>{vw}}", rule]
    lines += [f"{k:<{kw}} | {v:>{vw}}" for k, v in cells]
    return "\n".join(lines)


__all__ = ["ConfusionMeter", "format_metrics"]
