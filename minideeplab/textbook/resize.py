"""The textbook bilinear resize: along each axis a small interpolation matrix, ``out = A_h @ x @ A_w^T``
(derivation: docs/derivations.md, "Bilinear resize")."""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from ..nn.module import Module
from .conv import pair


def interpolation_matrix(n_in: int, n_out: int, align_corners: bool = False, scale: float | None = None):
    """The (n_out, n_in) NumPy matrix A of linear interpolation along one axis: ``out = A @ x``.

    PyTorch's semantics: with align_corners=False output pixel i samples the input at ``(i + 0.5) * ratio - 0.5``
    (clamped at 0), ratio = 1 / scale when a scale factor was given, else n_in / n_out; with align_corners=True at
    ``i * (n_in - 1) / (n_out - 1)``. An axis whose size does not change is copied (A = I), as PyTorch does.
    Each row has at most two non-zero weights, summing to 1.
    """
    if n_out == n_in:
        return np.eye(n_in)
    i = np.arange(n_out, dtype=np.float64)
    if align_corners:
        src = i * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(n_out)
    else:
        ratio = 1.0 / scale if scale is not None else n_in / n_out
        src = np.maximum((i + 0.5) * ratio - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)   # the two input pixels around src
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = src - i0                                              # the weight of the right one
    A = np.zeros((n_out, n_in))
    A[np.arange(n_out), i0] += 1.0 - w1
    A[np.arange(n_out), i1] += w1                              # (i1 == i0 at the last pixel: the weights add)
    return A


class Upsample(Module):
    """Bilinear resize of the last two axes to ``size`` or by ``scale_factor`` (PyTorch's ``F.interpolate``).

    Shapes:
        x: (N, C, H, W) -> out: (N, C, Ho, Wo), (Ho, Wo) = size, or floor(H * scale_factor) etc.

    Args:
        size: output (Ho, Wo) or an int; exactly one of size and scale_factor.
        scale_factor: a float or a pair of floats.
        mode: only "bilinear".
        align_corners: PyTorch's meaning (default False).
    """

    def __init__(self, size=None, scale_factor=None, mode: str = "bilinear", align_corners: bool = False):
        super().__init__()
        if mode != "bilinear" or (size is None) == (scale_factor is None):
            raise ValueError(f"Upsample: needs mode 'bilinear' and exactly one of size and scale_factor, got "
                             f"mode={mode!r}, size={size!r}, scale_factor={scale_factor!r}")
        self.size = pair(size) if size is not None else None
        sf = scale_factor
        self.scale_factor = None if sf is None else (float(np.ravel(sf)[0]), float(np.ravel(sf)[-1]))
        self.mode, self.align_corners = mode, bool(align_corners)
        self.A_h = self.A_w = None   # the interpolation matrices of the last forward

    def forward(self, x):
        xp = get_array_module(x)
        H, W = x.shape[2:]
        sh, sw = self.scale_factor or (None, None)
        Ho, Wo = self.size if self.size is not None else (int(np.floor(H * sh)), int(np.floor(W * sw)))
        scales = (sh, sw) if not self.align_corners else (None, None)
        self.A_h = xp.asarray(interpolation_matrix(H, Ho, self.align_corners, scales[0]), dtype=x.dtype)
        self.A_w = xp.asarray(interpolation_matrix(W, Wo, self.align_corners, scales[1]), dtype=x.dtype)
        return self.A_h @ x @ self.A_w.T

    def backward(self, dout):
        ### BEGIN SOLUTION
        ### HINT: forward was out = A_h @ x @ A_w^T, linear in x; dx has the input's shape (N, C, H, W)
        # out = A_h x A_w^T is linear in x, so dL/dx = A_h^T . dout . A_w
        return self.A_h.T @ dout @ self.A_w
        ### END SOLUTION

    def extra_repr(self):
        what = f"size={self.size}" if self.size is not None else f"scale_factor={self.scale_factor}"
        return f"{what}, mode={self.mode!r}, align_corners={self.align_corners}"
