"""2-D convolution with stride, padding and dilation (atrous convolution), as matrix products (GEMMs).

All paths compute the same cross-correlation; they differ only in how the data reaches the GEMM, and the
layer picks the cheapest for its shape ("auto"; set ``conv.algorithm`` to force one). Why each is fast, with
forward+backward times measured on this 2-core machine (OpenBLAS, float32, batch 2, 1 thread):

- "pointwise" (1x1, no padding): the input already *is* the (C, H*W) column matrix: no copy at all.
- "kn2row" (stride 1, padding small next to the map: the dense layers' 3x3 convs): one GEMM
  ``Y = W_taps (kh*kw*F, C) @ xpad (C, Hp*Wp)`` computes every tap's contribution at every padded pixel; the
  output is the sum of the kh*kw shifted F-row blocks of Y. No im2col (9x the input) is built or kept, only the
  padded input. Backward stacks kh*kw shifted copies of the thin dout (F = 32) into D (F*kh*kw, Hp*Wp); then
  ``dW = D @ xpad^T`` and ``dxpad = W^T @ D`` (the direct correlation with the flipped kernel: a GEMM with
  K = F*kh*kw and no col2im scatter). 3x3 128->32 at 64x64: 21 ms against 58 ms for im2col + col2im.
- "taps" (stride 1, padding large next to the map: ASPP's atrous 3x3 at 16x16): one GEMM per kernel tap over
  only the rectangle where that tap reads real input (``valid_taps``); a tap that reads only padding is
  skipped. Rate 12 at 16x16 does 25 % of im2col's multiply-adds (46 ms against 99 ms), rate 18 only the
  centre tap (21 ms against 137 ms).
- "im2col" (strided convs: the 7x7/2 stem): ``W (F, C*kh*kw) @ cols (N, C*kh*kw, Ho*Wo)``, col2im in backward.
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import get_array_module
from .functional import check_dtype, check_input, col2im, conv_output_size, im2col, pad2d, pair, valid_taps
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
        algorithm: "auto" (default), or force "pointwise", "kn2row", "taps" or "im2col" (see the module doc).
    """

    ALGORITHMS = ("auto", "pointwise", "kn2row", "taps", "im2col")

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1, padding=0, dilation=1,
                 bias: bool = True, rng: np.random.Generator | None = None, dtype=np.float32,
                 algorithm: str = "auto"):
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
        if algorithm not in self.ALGORITHMS:
            raise ValueError(f"Conv2d: algorithm must be one of {self.ALGORITHMS}, got {algorithm!r}")
        self.algorithm = algorithm
        self.x_shape = None   # input shape of the last forward
        self.path = None      # the algorithm the last forward used
        self.saved = None     # what that path's backward needs: cols, the padded input, or the input

    def output_shape(self, input_shape):
        N, _, H, W = input_shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        return (N, self.out_channels, conv_output_size(H, kh, sh, ph, dh), conv_output_size(W, kw, sw, pw, dw))

    def choose_algorithm(self, H: int, W: int, Ho: int, Wo: int) -> str:
        """The path for an (H, W) input: "auto" picks by shape (see the module docstring)."""
        pointwise = self.kernel_size == (1, 1) and self.padding == (0, 0)
        algo = self.algorithm
        if algo == "auto":
            if pointwise:
                return "pointwise"
            if self.stride != (1, 1):
                return "im2col"
            # kn2row computes at every padded pixel: worth it while padding adds little (<= 60 %) to the map
            (ph, pw) = self.padding
            return "kn2row" if (H + 2 * ph) * (W + 2 * pw) <= 1.6 * Ho * Wo else "taps"
        if (algo == "pointwise" and not pointwise) or (algo in ("kn2row", "taps") and self.stride != (1, 1)):
            raise ValueError(f"Conv2d: algorithm {algo!r} does not apply to kernel {self.kernel_size}, "
                             f"padding {self.padding}, stride {self.stride}")
        return algo

    def forward(self, x):
        check_input("Conv2d", x, self.in_channels)
        check_dtype("Conv2d", x, self.weight.data)
        N, F, Ho, Wo = self.output_shape(x.shape)
        if Ho < 1 or Wo < 1:
            raise ValueError(f"Conv2d: input {tuple(x.shape)} is too small for kernel {self.kernel_size} "
                             f"with padding {self.padding} and dilation {self.dilation}")
        xp = get_array_module(x)
        C, (kh, kw), (dh, dw) = self.in_channels, self.kernel_size, self.dilation
        path = self.choose_algorithm(x.shape[2], x.shape[3], Ho, Wo)
        if path in ("pointwise", "im2col"):
            if path == "pointwise":
                cols = x[:, :, ::self.stride[0], ::self.stride[1]].reshape(N, C, Ho * Wo)  # a view at stride 1
            else:
                cols = im2col(x, self.kernel_size, self.stride, self.padding, self.dilation)
            out = (self.weight.data.reshape(F, -1) @ cols).reshape(N, F, Ho, Wo)     # already NCHW
            self.saved = cols
        elif path == "kn2row":
            xpad = pad2d(x, self.padding)
            Hp, Wp = xpad.shape[2:]
            w_taps = self.weight.data.transpose(2, 3, 0, 1).reshape(kh * kw * F, C)
            Y = (w_taps @ xpad.reshape(N, C, Hp * Wp)).reshape(N, kh * kw, F, Hp, Wp)
            out = Y[:, 0, :, :Ho, :Wo].copy()                  # tap (0, 0); tap (i, j) is shifted by (i*dh, j*dw)
            for t in range(1, kh * kw):
                i, j = divmod(t, kw)
                out += Y[:, t, :, i * dh:i * dh + Ho, j * dw:j * dw + Wo]
            self.saved = xpad
        else:  # "taps"
            w_taps = xp.ascontiguousarray(self.weight.data.transpose(2, 3, 0, 1))  # (kh, kw, F, C)
            out = xp.zeros((N, F, Ho, Wo), dtype=x.dtype)
            for i, j, (oy, ox), (iy, ix) in valid_taps(self.kernel_size, self.padding, self.dilation,
                                                       x.shape[2:], (Ho, Wo)):
                xr = x[:, :, iy, ix]
                out[:, :, oy, ox] += (w_taps[i, j] @ xr.reshape(N, C, -1)).reshape(N, F, *xr.shape[2:])
            self.saved = x
        self.x_shape, self.path = x.shape, path
        if self.bias is not None:
            out += self.bias.data[:, None, None]
        return out

    def backward(self, dout):
        self._need(self.saved)
        xp = get_array_module(dout)
        N, F, Ho, Wo = dout.shape
        C, (kh, kw), (dh, dw), (ph, pw) = self.in_channels, self.kernel_size, self.dilation, self.padding
        if self.bias is not None:
            self.bias.grad += dout.sum(axis=(0, 2, 3))      # dL/db = sum of dout over batch and pixels
        if self.path in ("pointwise", "im2col"):
            d2, cols = dout.reshape(N, F, Ho * Wo), self.saved
            # dL/dW = sum_n dout_n · cols_n^T ;  dL/dcols = W^T · dout
            self.weight.grad += xp.matmul(d2, cols.transpose(0, 2, 1)).sum(axis=0).reshape(self.weight.shape)
            dcols = self.weight.data.reshape(F, -1).T @ d2
            if self.path == "im2col":       # dL/dx: dcols folded back onto the input by col2im
                return col2im(dcols, self.x_shape, self.kernel_size, self.stride, self.padding, self.dilation)
            if self.stride == (1, 1):
                return dcols.reshape(self.x_shape)
            dx = xp.zeros(self.x_shape, dtype=dout.dtype)   # strided 1x1: scattered into zeros
            dx[:, :, ::self.stride[0], ::self.stride[1]] = dcols.reshape(N, C, Ho, Wo)
            return dx
        H, W = self.x_shape[2:]
        if self.path == "kn2row":
            xpad = self.saved
            Hp, Wp = xpad.shape[2:]
            # D[f, tap (i, j)] = dout[f] shifted by (i*dh, j*dw) on the padded grid (zero elsewhere)
            D = xp.zeros((N, F, kh * kw, Hp, Wp), dtype=dout.dtype)
            for t in range(kh * kw):
                i, j = divmod(t, kw)
                D[:, :, t, i * dh:i * dh + Ho, j * dw:j * dw + Wo] = dout
            D = D.reshape(N, F * kh * kw, Hp * Wp)
            # dL/dW[f, c, tap] = sum over pixels of D[f, tap] · xpad[c] ;  dL/dxpad = W^T · D (flipped-kernel correlation)
            G = xp.matmul(D, xpad.reshape(N, C, Hp * Wp).transpose(0, 2, 1)).sum(axis=0)   # (F*kh*kw, C)
            self.weight.grad += G.reshape(F, kh, kw, C).transpose(0, 3, 1, 2)
            dxpad = (self.weight.data.transpose(1, 0, 2, 3).reshape(C, F * kh * kw) @ D).reshape(N, C, Hp, Wp)
            return xp.ascontiguousarray(dxpad[:, :, ph:ph + H, pw:pw + W])
        # "taps": per tap, dL/dW_tap = dout_rect · x_rect^T and dL/dx_rect += W_tap^T · dout_rect
        x = self.saved
        w_taps_t = xp.ascontiguousarray(self.weight.data.transpose(2, 3, 1, 0))   # (kh, kw, C, F)
        dw_taps = xp.zeros((kh, kw, F, C), dtype=dout.dtype)
        dx = xp.zeros(self.x_shape, dtype=dout.dtype)
        for i, j, (oy, ox), (iy, ix) in valid_taps(self.kernel_size, self.padding, self.dilation, (H, W), (Ho, Wo)):
            xr = x[:, :, iy, ix].reshape(N, C, -1)
            dr = dout[:, :, oy, ox].reshape(N, F, -1)
            dw_taps[i, j] = xp.matmul(dr, xr.transpose(0, 2, 1)).sum(axis=0)
            dx[:, :, iy, ix] += (w_taps_t[i, j] @ dr).reshape(N, C, *dout[:, :, oy, ox].shape[2:])
        self.weight.grad += dw_taps.transpose(2, 3, 0, 1)
        return dx

    def _clear_cache(self):
        self.x_shape = self.path = self.saved = None

    def extra_repr(self):
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.bias is None:
            s += ", bias=False"
        if self.algorithm != "auto":
            s += f", algorithm={self.algorithm!r}"
        return s
