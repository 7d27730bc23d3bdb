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

``BoundaryMeter`` measures how well the *edges* are placed, which IoU hardly sees on large objects (a one-pixel
error along a contour is a small fraction of the area). Distances are chessboard distances (a pixel's 8 neighbours
are at distance 1): a pixel is within distance r of another iff it lies in the (2r+1)² square around it, so the
distance bands are square erosions (the same as r successive 3×3 erosions), counted with one summed-area table
per mask (``WindowCounts``: O(1) per pixel whatever r; no SciPy).

- Boundary IoU (Cheng et al., CVPR 2021): the boundary region of a mask M is ``M minus erode_d(M)``, the pixels of M
  within distance d of a pixel outside M, where *outside the image counts as outside M* (as the reference
  implementation, which pads with zeros: a mask cut by the image border has a contour there). d = max(1,
  round(dilation_ratio · image diagonal)), 2 % by default (3 px at 96×96). Boundary IoU = |B(G) ∩ B(P)| / |B(G) ∪
  B(P)| for ground truth G and prediction P.
- Trimap IoU (DeepLab v1/v2): the band of width w is the set of pixels within distance w of a pixel of the other
  ground-truth class, i.e. ``dilate_w(G) minus erode_w(G)``; pixels outside the image are ignored here (the image
  border is not an object boundary). Trimap IoU(w) = tp / (tp + fp + fn), counted over the band only, for each width.

Both are accumulated like ``ConfusionMeter``: intersections and unions are summed over every image, and the data
set's score is their ratio (one score over the data set, not a mean of per-image ratios; per-image ratios would
give an image with a few boundary pixels the weight of one with thousands). Empty masks:
- both G and P empty: their boundary regions are empty, the image adds 0 to both sums (it changes nothing); a data
  set with no boundary pixel at all scores Boundary IoU 1 (0/0, read as perfect, as IoU does);
- one of them empty: the image adds the other's boundary pixels to the union and 0 to the intersection (penalised);
- trimap: an image whose ground truth is empty (or all foreground) has no band and adds nothing, *even when the
  prediction has false positives*: trimap IoU measures accuracy near true boundaries only (read it beside IoU). A
  data set without any band pixel has an undefined trimap IoU: nan.
"""
from __future__ import annotations

import math

from .backend import get_array_module

METRIC_NAMES = ("iou", "dice", "precision", "recall", "accuracy")
TRIMAP_WIDTHS = (1, 2, 4, 8, 16)
COUNT_NAMES = ("tp", "fp", "fn", "tn")


def _ratio(num: int, den: int) -> float:
    """num / den, with 0/0 read as the vacuously perfect score 1 (see the module docstring)."""
    return 1.0 if den == 0 else num / den


def _prediction_and_truth(name: str, probs, target, threshold: float):
    """``(xp, pred, truth)``: boolean arrays of a batch after checking it (``name`` leads every error message).
    ``probs`` are probabilities in [0, 1] (pred = probs > threshold) or a boolean prediction; ``target`` a {0, 1}
    (or boolean) mask of the same shape."""
    xp = get_array_module(probs, target)
    probs, target = xp.asarray(probs), xp.asarray(target)
    if tuple(probs.shape) != tuple(target.shape):
        raise ValueError(f"{name}.update: probs and target must have the same shape, "
                         f"got {tuple(probs.shape)} and {tuple(target.shape)}")
    if probs.dtype.kind == "b":
        pred = probs
    elif probs.dtype.kind == "f":
        if probs.size and (float(probs.min()) < 0 or float(probs.max()) > 1):
            raise ValueError(f"{name}.update: probs must be probabilities in [0, 1], got values in "
                             f"[{float(probs.min()):.4g}, {float(probs.max()):.4g}] (logits? apply a sigmoid first)")
        pred = probs > threshold
    else:
        raise TypeError(f"{name}.update: probs must be a float or boolean array, got {probs.dtype}")
    if target.dtype.kind not in "biuf":
        raise TypeError(f"{name}.update: target must be a {{0, 1}} mask, got dtype {target.dtype}")
    if bool(xp.any((target != 0) & (target != 1))):
        raise ValueError(f"{name}.update: target must be a binary mask with values in {{0, 1}}")
    return xp, pred, target == 1


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
        xp, pred, truth = _prediction_and_truth("ConfusionMeter", probs, target, self.threshold)
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


class WindowCounts:
    """How many pixels of a boolean mask are True in the (2r+1)×(2r+1) window around each pixel, for any radius
    r <= ``max_radius``, from ONE summed-area table (integral image) of the last two axes: four slices per radius, O(1)
    per pixel whatever r. Pixels beyond the image count as False.

    A square window of radius r holds the pixels within chessboard distance r, so ``count(r) == (2r+1)²`` is the
    erosion by r, the same as r successive 3×3 erosions (see ``erode``).

    Shapes: mask (..., H, W) bool; ``count(r)`` -> (..., H, W) int32; ``inside(r)`` -> (H, W) int32, the number of
    the window's pixels that lie in the image.
    """

    def __init__(self, mask, max_radius: int):
        xp = self.xp = get_array_module(mask)
        self.H, self.W = mask.shape[-2:]
        self.pad = p = int(max_radius)
        widths = [(0, 0)] * (mask.ndim - 2) + [(p + 1, p), (p + 1, p)]   # one leading zero row/column more
        table = xp.pad(mask.astype(xp.int32), widths)
        xp.cumsum(table, axis=-1, out=table)
        xp.cumsum(table, axis=-2, out=table)
        self.table = table

    def count(self, r: int):
        if not 0 <= r <= self.pad:
            raise ValueError(f"WindowCounts.count: radius must be in [0, {self.pad}], got {r}")
        S, H, W = self.table, self.H, self.W
        hi, lo = self.pad + 1 + r, self.pad - r       # window rows i-r..i+r are table rows lo+i+1..hi+i
        return (S[..., hi:hi + H, hi:hi + W] - S[..., lo:lo + H, hi:hi + W]
                - S[..., hi:hi + H, lo:lo + W] + S[..., lo:lo + H, lo:lo + W])

    def inside(self, r: int):
        xp = self.xp

        def span(n):
            i = xp.arange(n)
            return xp.minimum(i + r, n - 1) - xp.maximum(i - r, 0) + 1
        return (span(self.H)[:, None] * span(self.W)[None, :]).astype(xp.int32)


def erode(mask, radius: int, outside: bool = False):
    """Square (chessboard) erosion of the last two axes: True where every pixel within ``radius`` (a (2r+1)² window)
    is True, the same as ``radius`` 3×3 erosions. Pixels beyond the image count as ``outside`` (False: background,
    so the image border erodes; True: they are ignored).

    Shapes: mask (..., H, W) bool -> same."""
    if radius <= 0:
        return mask
    counts = WindowCounts(mask, radius)
    return counts.count(radius) == (counts.inside(radius) if outside else (2 * radius + 1) ** 2)


def boundary_region(mask, distance: int, counts: WindowCounts | None = None):
    """The pixels of ``mask`` within chessboard distance ``distance`` of a pixel outside it (outside the image counts
    as outside: Boundary IoU's contour). ``counts``: the mask's ``WindowCounts``, when already made.

    Shapes: (..., H, W) bool -> same."""
    counts = counts if counts is not None else WindowCounts(mask, distance)
    return mask & (counts.count(distance) < (2 * distance + 1) ** 2)


def trimap_band(truth, width: int, counts: WindowCounts | None = None):
    """The pixels within chessboard distance ``width`` of a pixel of the other class (both sides of every contour;
    pixels beyond the image are ignored): windows that hold both classes. ``counts``: the mask's ``WindowCounts``.

    Shapes: (..., H, W) bool -> same."""
    counts = counts if counts is not None else WindowCounts(truth, width)
    c = counts.count(width)
    return (c > 0) & (c < counts.inside(width))


def boundary_distance(height: int, width: int, dilation_ratio: float = 0.02) -> int:
    """Boundary IoU's d: max(1, round(dilation_ratio · diagonal)) pixels (3 for 96×96, 2 for 64×64)."""
    return max(1, int(round(dilation_ratio * math.hypot(height, width))))


class BoundaryMeter:
    """Boundary IoU and trimap IoU of a binary segmentation, accumulated over batches (see the module docstring).

    Shapes: ``update(probs, target)``: probs (..., H, W) (e.g. (N, 1, H, W)), target the same, on any backend; the
    last two axes are the image, every leading axis indexes images.

    Args:
        threshold: a pixel is predicted foreground when its probability is > threshold.
        widths: the trimap band widths in pixels (DeepLab's curve of IoU against the band width).
        dilation_ratio: Boundary IoU's d as a fraction of the image diagonal.
        distance: a fixed d in pixels instead (None: from ``dilation_ratio``).
    """

    def __init__(self, threshold: float = 0.5, widths=TRIMAP_WIDTHS, dilation_ratio: float = 0.02,
                 distance: int | None = None):
        if not 0 <= threshold <= 1:
            raise ValueError(f"BoundaryMeter: threshold must be in [0, 1], got {threshold}")
        self.widths = tuple(int(w) for w in widths)
        if any(w < 1 for w in self.widths) or len(set(self.widths)) != len(self.widths):
            raise ValueError(f"BoundaryMeter: widths must be distinct ints >= 1, got {widths!r}")
        if not dilation_ratio > 0 or (distance is not None and int(distance) < 1):
            raise ValueError(f"BoundaryMeter: need dilation_ratio > 0 and distance >= 1 (or None), got "
                             f"{dilation_ratio!r} and {distance!r}")
        self.threshold, self.dilation_ratio = float(threshold), float(dilation_ratio)
        self.distance = None if distance is None else int(distance)
        self.reset()

    def reset(self) -> None:
        """Forget all counts."""
        self.images = self.boundary_intersection = self.boundary_union = 0
        self.trimap_intersection = dict.fromkeys(self.widths, 0)
        self.trimap_union = dict.fromkeys(self.widths, 0)

    def update(self, probs, target) -> None:
        """Add one batch's intersections and unions."""
        xp, pred, truth = _prediction_and_truth("BoundaryMeter", probs, target, self.threshold)
        if pred.ndim < 2:
            raise ValueError(f"BoundaryMeter.update: expected masks of shape (..., H, W), got {tuple(pred.shape)}")
        H, W = pred.shape[-2:]
        d = self.distance or boundary_distance(H, W, self.dilation_ratio)
        true_counts = WindowCounts(truth, max(d, *self.widths))      # one table serves every width
        b_true, b_pred = boundary_region(truth, d, true_counts), boundary_region(pred, d)
        self.boundary_intersection += int(xp.count_nonzero(b_true & b_pred))
        self.boundary_union += int(xp.count_nonzero(b_true | b_pred))
        hit, either = pred & truth, pred | truth
        for w in self.widths:
            band = trimap_band(truth, w, true_counts)
            self.trimap_intersection[w] += int(xp.count_nonzero(band & hit))
            self.trimap_union[w] += int(xp.count_nonzero(band & either))
        self.images += int(math.prod(pred.shape[:-2]))

    def compute(self) -> dict:
        """``boundary_iou`` and ``trimap_iou_<w>px`` for each width, as floats."""
        if self.images == 0:
            raise RuntimeError("BoundaryMeter.compute: no images counted yet (call update first)")
        out = {"boundary_iou": _ratio(self.boundary_intersection, self.boundary_union)}
        for w in self.widths:
            u = self.trimap_union[w]
            out[f"trimap_iou_{w}px"] = self.trimap_intersection[w] / u if u else float("nan")
        return out

    def __repr__(self) -> str:
        return (f"BoundaryMeter(threshold={self.threshold}, widths={self.widths}, images={self.images}, "
                f"boundary {self.boundary_intersection}/{self.boundary_union})")


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


__all__ = ["BoundaryMeter", "ConfusionMeter", "WindowCounts", "boundary_distance", "boundary_region", "erode",
           "format_metrics", "trimap_band"]
