"""The textbook convolution: im2col, one matrix product, col2im. No speed tricks (see docs/fast_paths.md).

A convolution reads, for every output pixel, a kh x kw window of the (zero-padded) input. ``im2col`` copies each
window into a column, so the convolution becomes ONE matrix product ``W (F, C*kh*kw) @ cols``. Its backward is a
matrix product too, and ``col2im`` adds the column gradients back onto the pixels they were read from. The loops
run over the kh*kw kernel offsets only, never over pixels. Derivation: docs/derivations.md, "Convolution".
"""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from ..nn.module import Module, Parameter


def pair(v) -> tuple[int, int]:
    """``3 -> (3, 3)``, ``(3, 5) -> (3, 5)``."""
    return (int(v), int(v)) if np.ndim(v) == 0 else (int(v[0]), int(v[1]))


def conv_output_size(n: int, k: int, s: int = 1, p: int = 0, d: int = 1) -> int:
    """Output length along one axis: ``floor((n + 2p - d(k-1) - 1) / s) + 1``."""
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def im2col(x, kernel_size, stride=1, padding=0, dilation=1):
    """Copy every kernel window of ``x`` into a column.

    Shapes: x: (N, C, H, W) -> cols: (N, C*kh*kw, Ho*Wo), rows ordered (c, i, j) like a conv weight
    (F, C, kh, kw) flattened; column y*Wo + x holds the window output pixel (y, x) reads.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = pair(kernel_size), pair(stride), pair(padding), pair(dilation)
    xp = get_array_module(x)
    N, C, H, W = x.shape
    Ho, Wo = conv_output_size(H, kh, sh, ph, dh), conv_output_size(W, kw, sw, pw, dw)
    ### BEGIN SOLUTION
    ### HINT: zero-pad x; tap (i, j) of output pixel (y, x) reads padded pixel (s*y + d*i, s*x + d*j): for each kernel
    ### HINT: offset copy that strided slice into cols[:, :, i, j] of a (N, C, kh, kw, Ho, Wo) array (loop over offsets only)
    xpad = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    cols = xp.empty((N, C, kh, kw, Ho, Wo), dtype=x.dtype)
    for i in range(kh):          # tap (i, j) reads the input pixels (s*y + d*i, s*x + d*j) of the padded input
        for j in range(kw):
            cols[:, :, i, j] = xpad[:, :, i * dh:i * dh + sh * (Ho - 1) + 1:sh, j * dw:j * dw + sw * (Wo - 1) + 1:sw]
    return cols.reshape(N, C * kh * kw, Ho * Wo)
    ### END SOLUTION


def col2im(cols, x_shape, kernel_size, stride=1, padding=0, dilation=1):
    """The adjoint of ``im2col``: ADD every column entry back onto the input pixel it was read from (a pixel read
    by several windows receives the sum), then drop the padding.

    Shapes: cols: (N, C*kh*kw, Ho*Wo) -> dx: (N, C, H, W) = ``x_shape``.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = pair(kernel_size), pair(stride), pair(padding), pair(dilation)
    xp = get_array_module(cols)
    N, C, H, W = x_shape
    Ho, Wo = conv_output_size(H, kh, sh, ph, dh), conv_output_size(W, kw, sw, pw, dw)
    ### BEGIN SOLUTION
    ### HINT: im2col backwards: for each kernel offset (i, j) put cols[:, :, i, j] back on the slice of a zero padded
    ### HINT: (N, C, H + 2ph, W + 2pw) array it was read from; windows overlap, so mind = versus +=; then crop the padding
    cols = cols.reshape(N, C, kh, kw, Ho, Wo)
    dxpad = xp.zeros((N, C, H + 2 * ph, W + 2 * pw), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            dxpad[:, :, i * dh:i * dh + sh * (Ho - 1) + 1:sh, j * dw:j * dw + sw * (Wo - 1) + 1:sw] += cols[:, :, i, j]
    return dxpad[:, :, ph:ph + H, pw:pw + W]
    ### END SOLUTION


class Conv2d(Module):
    """Cross-correlation of an NCHW input with ``weight`` (F, C, kh, kw), plus an optional bias: im2col + one GEMM.

    Shapes:
        x: (N, C, H, W) -> out: (N, F, Ho, Wo), Ho = floor((H + 2*padding - dilation*(kh - 1) - 1) / stride) + 1
        (same for W).

    Args:
        in_channels, out_channels: C and F.
        kernel_size, stride, padding, dilation: an int or an (h, w) pair. Dilation d spreads the taps d pixels
            apart (atrous convolution).
        bias: learn a per-channel bias.
        rng: ``numpy.random.Generator`` for the He-normal init, std = sqrt(2 / (C*kh*kw)) (the same draws as
            ``minideeplab.nn.Conv2d``, so the same Generator state gives the same weights).
        dtype: parameter dtype (float32 for training, float64 for gradient checks).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1, padding=0, dilation=1,
                 bias: bool = True, rng: np.random.Generator | None = None, dtype=np.float32):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride = pair(kernel_size), pair(stride)
        self.padding, self.dilation = pair(padding), pair(dilation)
        rng = rng if rng is not None else np.random.default_rng()
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        w = rng.standard_normal((self.out_channels, self.in_channels, *self.kernel_size)) * np.sqrt(2.0 / fan_in)
        self.weight = Parameter(w.astype(dtype))
        self.bias = Parameter(np.zeros(self.out_channels, dtype=dtype)) if bias else None
        self.x_shape = None   # input shape of the last forward
        self.cols = None      # its im2col columns (N, C*kh*kw, Ho*Wo), kept for the weight gradient

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"Conv2d: expected input (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        N, _, H, W = x.shape
        Ho = conv_output_size(H, self.kernel_size[0], self.stride[0], self.padding[0], self.dilation[0])
        Wo = conv_output_size(W, self.kernel_size[1], self.stride[1], self.padding[1], self.dilation[1])
        self.cols = im2col(x, self.kernel_size, self.stride, self.padding, self.dilation)
        self.x_shape = x.shape
        out = self.weight.data.reshape(self.out_channels, -1) @ self.cols      # (N, F, Ho*Wo): already NCHW
        if self.bias is not None:
            out = out + self.bias.data[:, None]
        return out.reshape(N, self.out_channels, Ho, Wo)

    def backward(self, dout):
        ### BEGIN SOLUTION
        ### HINT: forward was out_n = W2 @ cols_n + b with W2 = weight as (F, C*kh*kw): three matrix-product gradients.
        ### HINT: ADD dW and db into weight.grad and bias.grad (+=); dx: the columns' gradient W2^T @ dout_n, folded back by col2im
        N, F = dout.shape[:2]
        d2 = dout.reshape(N, F, -1)                                            # (N, F, Ho*Wo)
        w2 = self.weight.data.reshape(F, -1)                                   # (F, C*kh*kw)
        # dL/dW = sum_n dout_n . cols_n^T ;  dL/db = sum of dout over batch and pixels
        self.weight.grad += (d2 @ self.cols.transpose(0, 2, 1)).sum(axis=0).reshape(self.weight.shape)
        if self.bias is not None:
            self.bias.grad += dout.sum(axis=(0, 2, 3))
        # dL/dx = W^T . dout, folded back by col2im
        return col2im(w2.T @ d2, self.x_shape, self.kernel_size, self.stride, self.padding, self.dilation)
        ### END SOLUTION

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}")
