"""Valid filter weights of an atrous convolution (DeepLabV3, Section 3.3 and Figure 4).

A k x k filter with rate ``d`` and "same" padding ``d(k - 1)/2`` placed at output pixel (i, j) of an S x S
map reads the taps (i + d*a, j + d*b), a, b in {-(k-1)/2, ..., (k-1)/2}. A tap is *valid* when it lands inside
the map, not on zero padding. Along one axis the count of valid taps at row i is
``c(i) = #{a : 0 <= i + d*a < S}``; in 2-D the count is ``c(i) * c(j)``. When ``d >= S`` only the centre tap
is ever valid: the 3x3 filter has degenerated into a 1x1 filter, which is why DeepLabV3 adds the image-level
(global pooling) branch to ASPP instead of ever larger rates.
"""
from __future__ import annotations

import numpy as np


def valid_taps_per_axis(feature_size: int, rate: int, kernel_size: int = 3) -> np.ndarray:
    """``c(i)`` for i = 0..S-1: the number of taps of one kernel row that fall inside the map."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"valid_taps_per_axis: kernel_size must be odd and >= 1, got {kernel_size}")
    if feature_size < 1 or rate < 1:
        raise ValueError(f"valid_taps_per_axis: feature_size and rate must be >= 1, got {feature_size}, {rate}")
    half = (kernel_size - 1) // 2
    pos = np.arange(feature_size)[:, None] + rate * np.arange(-half, half + 1)[None, :]
    return ((pos >= 0) & (pos < feature_size)).sum(axis=1)


def valid_weight_histogram(feature_size: int, rate: int, kernel_size: int = 3) -> np.ndarray:
    """Fraction of output positions at which exactly m filter taps are valid, for m = 0..k*k.

    Shapes:
        returns: (k*k + 1,) float64, summing to 1 (entry m = fraction of positions with m valid taps).

    Args:
        feature_size: S, the side of the square feature map (65 in the paper's figure).
        rate: the atrous rate d (padding = d * (k - 1) / 2 keeps the map size).
        kernel_size: k (odd).
    """
    c = valid_taps_per_axis(feature_size, rate, kernel_size)
    counts = (c[:, None] * c[None, :]).ravel()
    return np.bincount(counts, minlength=kernel_size * kernel_size + 1) / counts.size


def valid_weight_curves(feature_size: int = 65, rates=None, kernel_size: int = 3, counts=(1, 4, 9)):
    """The data of DeepLabV3's Figure 4: for each m in ``counts`` the fraction of positions with exactly m
    valid weights, as a function of the rate. Returns ``(rates, {m: fractions})``."""
    rates = np.arange(1, feature_size + 1) if rates is None else np.asarray(rates)
    hist = np.stack([valid_weight_histogram(feature_size, int(r), kernel_size) for r in rates])
    return rates, {m: hist[:, m] for m in counts}
