"""Inference options of DeepLabV3's Table 10: multi-scale inputs ("MS"), left-right flips ("Flip") and evaluating at
another output stride than the one trained at ("train 16, eval 8"), plus an evaluation loop with boundary metrics.

``predict_proba(model, x, scales, flip)`` runs the model on the batch resized bilinearly to each scale (and on its
mirror image), resizes each result back to the input size and averages the probabilities, as DeepLab's own code
does. The logits are resized before the sigmoid: the model itself upsamples its logits, not its probabilities, to
the input size, so each scale's output is what that model would predict for an input of that size. With
``scales=(1.0,)`` and no flip it is exactly ``sigmoid(model(x))`` run under ``nn.no_grad``. Every pass runs under ``nn.no_grad`` (nothing is
kept for a backward, as ``DeepLabV3.predict_proba``) and its logits are checked to be finite (``finite.check_logits``:
a diverged checkpoint is refused instead of printing scores of NaN masks).
"""
from __future__ import annotations

import time

from .backend import get_array_module, synchronize, to_device
from .finite import check_logits
from .metrics import TRIMAP_WIDTHS, BoundaryMeter, ConfusionMeter
from .nn import interpolate, no_grad, sigmoid

PAPER_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)   # DeepLabV3's multi-scale inputs


def _check_scales(scales) -> tuple:
    scales = tuple(float(s) for s in scales)
    if not scales or any(not s > 0 for s in scales):
        raise ValueError(f"inference: scales must be one or more positive numbers, got {scales!r}")
    return scales


def predict_proba(model, x, scales=(1.0,), flip: bool = False):
    """Foreground probabilities averaged over input scales and (``flip``) left-right mirror images, in eval mode.

    Each scale s runs the model on x resized bilinearly (align_corners=False) to (round(s·H), round(s·W)); its logits
    are resized back to (H, W) and mirrored back where the input was mirrored; the mean of the sigmoids over the
    len(scales) × (2 if flip else 1) passes is returned. The model is put in eval mode (batch norm's running
    statistics; the result does not depend on the rest of the batch) and runs under ``nn.no_grad``. Logits that are
    not finite raise ``finite.NonFiniteError`` (a ValueError).

    Shapes: x (N, 3, H, W) on the model's device -> probabilities (N, num_classes, H, W).

    Args:
        model: a DeepLabV3 (anything mapping an image batch to logits of its size).
        x: the ImageNet-normalised batch (NumPy or CuPy).
        scales: input scales; ``PAPER_SCALES`` is DeepLabV3's (0.5, 0.75, 1.0, 1.25, 1.5, 1.75).
        flip: also average over the mirrored inputs.
    """
    scales = _check_scales(scales)
    xp = get_array_module(x)
    model.eval()
    H, W = x.shape[2:]
    total, passes, many = None, 0, len(scales) > 1 or flip
    for s in scales:
        size = (max(1, round(H * s)), max(1, round(W * s)))
        xs = x if size == (H, W) else interpolate(x, size)
        for mirrored in ((False, True) if flip else (False,)):
            with no_grad():
                logits = model(xp.ascontiguousarray(xs[..., ::-1]) if mirrored else xs)
            check_logits(logits, f" at scale {s:g}{', mirrored' if mirrored else ''}" if many else "")
            if mirrored:
                logits = logits[..., ::-1]
            if size != (H, W):
                logits = interpolate(xp.ascontiguousarray(logits), (H, W))
            p = sigmoid(logits)
            if total is None:
                total = p
            else:
                total += p        # p is fresh, and so is the first one (sigmoid allocates)
            passes += 1
    if passes > 1:
        total *= 1.0 / passes
    return total


def evaluate_model(model, loader, *, scales=(1.0,), flip: bool = False, output_stride: int | None = None,
                   threshold: float = 0.5, widths=TRIMAP_WIDTHS, device: str = "cpu", progress: bool = False) -> dict:
    """The metrics of ``model`` over ``loader`` with the inference options: IoU, Dice, precision, recall, accuracy,
    counts, Boundary IoU, trimap IoU per width, and ``seconds_per_image`` (the inference time, metrics excluded).

    Args:
        model: a DeepLabV3 (put in eval mode).
        loader: yields (images (N, 3, H, W), masks (N, 1, H, W)) host batches.
        scales, flip: see ``predict_proba``.
        output_stride: evaluate at this output stride (``models.set_output_stride``), then switch back to the
            model's own; None keeps it.
        threshold: for the binary prediction. widths: trimap band widths. device: where to run.
        progress: a tqdm bar.
    """
    from tqdm import tqdm
    _check_scales(scales)
    own = getattr(model, "output_stride", None)
    if output_stride is not None and output_stride != own:
        from .models import set_output_stride
        set_output_stride(model, output_stride)
    try:
        meter, boundary = ConfusionMeter(threshold), BoundaryMeter(threshold, widths)
        seconds, images = 0.0, 0
        for batch, masks in tqdm(loader, desc="evaluate", leave=False, disable=not progress):
            x, t = to_device(batch, device), to_device(masks, device)
            start = time.perf_counter()
            probs = predict_proba(model, x, scales, flip)
            synchronize(probs)
            seconds += time.perf_counter() - start
            images += len(batch)
            meter.update(probs, t)
            boundary.update(probs, t)
        if images == 0:
            raise ValueError("evaluate_model: the loader yielded no images")
    finally:
        if output_stride is not None and output_stride != own:
            set_output_stride(model, own)
    return {**meter.compute(), **boundary.compute(), "seconds_per_image": seconds / images}


__all__ = ["PAPER_SCALES", "evaluate_model", "predict_proba"]
