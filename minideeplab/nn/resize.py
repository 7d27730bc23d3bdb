"""Bilinear resizing with PyTorch's ``F.interpolate`` semantics, written as two small matrix products."""
from __future__ import annotations

import math

import numpy as np

from ..backend import get_array_module, matmul
from .functional import check_input, pair
from .module import Module


def bilinear_matrix(in_size: int, out_size: int, align_corners: bool = False, scale: float | None = None,
                    xp=np, dtype=np.float64):
    """The (out_size, in_size) matrix A with ``out = A @ x`` along one axis (linear interpolation).

    align_corners=False (PyTorch's default): source coordinate ``(i + 0.5) * ratio - 0.5`` clamped at 0,
    where ratio = 1/scale when a scale factor was given, else in_size/out_size. align_corners=True:
    ``i * (in_size - 1) / (out_size - 1)``. Each row holds at most two non-zero weights summing to 1.
    An axis whose size does not change is copied, whatever the scale factor (as PyTorch's CPU kernel does:
    ``scale_factor=1.1`` on 5 rows gives 5 rows, unchanged).
    """
    if out_size == in_size:
        return xp.eye(in_size, dtype=dtype)
    dst = np.arange(out_size, dtype=np.float64)
    if align_corners:
        src = dst * ((in_size - 1) / (out_size - 1)) if out_size > 1 else np.zeros(out_size)
    else:
        ratio = (1.0 / scale) if scale is not None else in_size / out_size
        src = np.maximum((dst + 0.5) * ratio - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = src - i0
    A = np.zeros((out_size, in_size))
    np.add.at(A, (np.arange(out_size), i0), 1.0 - w1)   # tiny host-side matrix, built once per shape
    np.add.at(A, (np.arange(out_size), i1), w1)
    return xp.asarray(A, dtype=dtype)


class Upsample(Module):
    """Bilinear resize of the last two axes to ``size`` or by ``scale_factor`` (up or down).

    Shapes:
        x: (N, C, H, W) -> out: (N, C, Ho, Wo), (Ho, Wo) = size, or floor(H * scale_factor) etc.
        Computed as ``out = A_h @ x @ A_w^T`` with the interpolation matrices of ``bilinear_matrix``.

    Args:
        size: output (Ho, Wo) or an int; exactly one of size / scale_factor.
        scale_factor: float or pair of floats.
        mode: only "bilinear".
        align_corners: PyTorch's meaning.

    Textbook twin: ``minideeplab.textbook.Upsample``, the same two interpolation matrices; this layer only keeps them
    between calls of the same shape and multiplies through ``backend.matmul`` (for CUDA graphs).
    """

    def __init__(self, size=None, scale_factor=None, mode: str = "bilinear", align_corners: bool = False):
        super().__init__()
        if mode != "bilinear":
            raise ValueError(f"Upsample: only mode='bilinear' is implemented, got {mode!r}")
        if (size is None) == (scale_factor is None):
            raise ValueError("Upsample: give exactly one of size and scale_factor")
        self.size = pair(size, "size") if size is not None else None
        if scale_factor is not None:
            sf = scale_factor if isinstance(scale_factor, (tuple, list)) else (scale_factor, scale_factor)
            self.scale_factor = (float(sf[0]), float(sf[1]))
        else:
            self.scale_factor = None
        self.mode, self.align_corners = mode, bool(align_corners)
        self.A_h = self.A_w = None   # interpolation matrices of the last forward (for backward)
        self._matrices = None        # (key, A_h, A_w) made for a shape: kept across calls, read as ONE attribute

    def output_size(self, H: int, W: int) -> tuple[int, int]:
        if self.size is not None:
            return self.size
        return math.floor(H * self.scale_factor[0]), math.floor(W * self.scale_factor[1])

    def forward(self, x):
        check_input("Upsample", x)
        xp = get_array_module(x)
        H, W = x.shape[2:]
        Ho, Wo = self.output_size(H, W)
        if Ho < 1 or Wo < 1:
            raise ValueError(f"Upsample: output size ({Ho}, {Wo}) from input {tuple(x.shape)} is empty")
        key = (H, W, Ho, Wo, x.dtype, xp.__name__)
        made = self._matrices      # one read: no_grad threads may run this layer at once (nn.threads)
        if made is None or made[0] != key:   # rebuilt only when the shape changes
            sh, sw = self.scale_factor if self.scale_factor is not None and not self.align_corners else (None, None)
            made = self._matrices = (key, bilinear_matrix(H, Ho, self.align_corners, sh, xp, x.dtype),
                                     bilinear_matrix(W, Wo, self.align_corners, sw, xp, x.dtype))
        _, A_h, A_w = made
        self.A_h, self.A_w = A_h, A_w
        return matmul(matmul(A_h, x), A_w.T)

    def backward(self, dout):
        self._need(self.A_h)
        # out = A_h x A_w^T is linear in x, so dL/dx = A_h^T · dout · A_w
        return matmul(matmul(self.A_h.T, dout), self.A_w)

    def _clear_cache(self):
        self.A_h = self.A_w = None   # the matrices stay in _matrices: their key holds the shape, dtype and device

    def extra_repr(self):
        what = f"size={self.size}" if self.size is not None else f"scale_factor={self.scale_factor}"
        return f"{what}, mode={self.mode!r}, align_corners={self.align_corners}"


def interpolate(x, size, align_corners: bool = False):
    """Functional bilinear resize to ``size`` (forward only; use ``Upsample`` when you need backward)."""
    return Upsample(size=size, align_corners=align_corners)(x)
