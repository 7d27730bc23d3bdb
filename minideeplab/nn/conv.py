"""2-D convolution by im2col + GEMM, with stride, padding and dilation (atrous convolution)."""
from __future__ import annotations

import math

import numpy as np

from ..backend import get_array_module
from .functional import check_dtype, check_input, col2im, conv_output_size, im2col, pair
from .module import Module, Parameter


class Conv2d(Module):
    """Cross-correlation of an NCHW input with ``weight`` (F, C, kh, kw), plus an optional bias.

    Shapes:
        x: (N, C, H, W) -> out: (N, F, Ho, Wo),
        Ho = floor((H + 2*padding - dilation*(kh - 1) - 1) / stride) + 1 (same for W).

    Args:
        in_channels, out_channels: C and F.
        kernel_size, stride, padding, dilation: an int or an (h, w) pair. ``dilation`` d spreads the taps
            d pixels apart (atrous convolution): the effective kernel is d*(k-1)+1 wide with k*k weights.
        bias: learn a per-channel bias.
        rng: ``numpy.random.Generator`` for the He/Kaiming-normal init (std = sqrt(2 / (C*kh*kw))).
        dtype: parameter dtype (float32 for training, float64 for gradient checks).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1, padding=0, dilation=1,
                 bias: bool = True, rng: np.random.Generator | None = None, dtype=np.float32):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride = pair(kernel_size, "kernel_size"), pair(stride, "stride")
        self.padding, self.dilation = pair(padding, "padding"), pair(dilation, "dilation")
        if min(self.kernel_size + self.stride + self.dilation) < 1 or min(self.padding) < 0:
            raise ValueError(f"Conv2d: kernel_size, stride, dilation must be >= 1 and padding >= 0, got "
                             f"k={self.kernel_size} s={self.stride} p={self.padding} d={self.dilation}")
        rng = rng if rng is not None else np.random.default_rng()
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        w = rng.standard_normal((self.out_channels, self.in_channels, *self.kernel_size)) * math.sqrt(2.0 / fan_in)
        self.weight = Parameter(w.astype(dtype))
        self.bias = Parameter(np.zeros(self.out_channels, dtype=dtype)) if bias else None
        # 1x1 without padding needs no im2col: the input itself is the column matrix.
        self.pointwise = self.kernel_size == (1, 1) and self.padding == (0, 0)
        self.x_shape = None   # input shape, for col2im
        self.cols = None      # (N, C*kh*kw, Ho*Wo) patches of the input (or the strided input for 1x1)

    def output_shape(self, input_shape):
        N, _, H, W = input_shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        return (N, self.out_channels, conv_output_size(H, kh, sh, ph, dh), conv_output_size(W, kw, sw, pw, dw))

    def forward(self, x):
        check_input("Conv2d", x, self.in_channels)
        check_dtype("Conv2d", x, self.weight.data)
        N, F, Ho, Wo = self.output_shape(x.shape)
        if Ho < 1 or Wo < 1:
            raise ValueError(f"Conv2d: input {tuple(x.shape)} is too small for kernel {self.kernel_size} "
                             f"with padding {self.padding} and dilation {self.dilation}")
        if self.pointwise:
            sh, sw = self.stride
            xs = x if (sh, sw) == (1, 1) else x[:, :, ::sh, ::sw]
            cols = xs.reshape(N, self.in_channels, Ho * Wo)  # a view when stride is 1
        else:
            cols = im2col(x, self.kernel_size, self.stride, self.padding, self.dilation)
        self.x_shape, self.cols = x.shape, cols
        out = self.weight.data.reshape(F, -1) @ cols               # (N, F, Ho*Wo): already NCHW
        if self.bias is not None:
            out += self.bias.data[:, None]
        return out.reshape(N, F, Ho, Wo)

    def backward(self, dout):
        self._need(self.cols)
        xp = get_array_module(dout)
        N, F, Ho, Wo = dout.shape
        d2 = dout.reshape(N, F, Ho * Wo)
        W2 = self.weight.data.reshape(F, -1)
        # dL/dW = sum_n dout_n · cols_n^T ;  dL/db = sum over batch and pixels of dout
        self.weight.grad += xp.matmul(d2, self.cols.transpose(0, 2, 1)).sum(axis=0).reshape(self.weight.shape)
        if self.bias is not None:
            self.bias.grad += d2.sum(axis=(0, 2))
        dcols = W2.T @ d2                                           # (N, C*kh*kw, Ho*Wo)
        # dL/dx = W^T · dout, folded back onto the input by col2im (strided 1x1: scattered into zeros)
        if not self.pointwise:
            return col2im(dcols, self.x_shape, self.kernel_size, self.stride, self.padding, self.dilation)
        if self.stride == (1, 1):
            return dcols.reshape(self.x_shape)
        dx = xp.zeros(self.x_shape, dtype=dout.dtype)
        dx[:, :, ::self.stride[0], ::self.stride[1]] = dcols.reshape(N, self.in_channels, Ho, Wo)
        return dx

    def _clear_cache(self):
        self.x_shape = self.cols = None

    def extra_repr(self):
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.bias is None:
            s += ", bias=False"
        return s
