"""2-D convolution with stride, padding and dilation (atrous convolution), as matrix products (GEMMs).

All paths compute the same cross-correlation; they differ only in how the data reaches the GEMM, and the
layer picks the cheapest for its shape ("auto"; set ``conv.algorithm`` to force one). Why each is fast, with
forward+backward times measured on this 2-core machine (OpenBLAS, float32, batch 2, one thread, CPU ms; im2col + col2im for comparison):

- "pointwise" (1x1, no padding): the input already *is* the (C, H*W) column matrix: no copy at all.
- "kn2row" (stride 1, the taps that read real data read it almost everywhere: the dense layers' 3x3 convs):
  one GEMM ``Y = W_taps (T*F, C) @ x (C, H*W)`` computes every used tap's contribution at every input pixel;
  the output is the sum of the T F-row blocks of Y, each shifted by its tap offset and clipped to where that
  tap reads real input (zero padding contributes nothing, so it is never built, and a tap that reads only
  padding is dropped). No im2col (9x the input) is built or kept; backward stacks the shifted copies of the
  thin dout (F = 32) into D (T*F, H*W) and does two GEMMs: ``dW = D @ x^T`` and ``dx = W_taps^T @ D`` (the
  direct correlation with the flipped kernel: K = F*T, no col2im scatter). 3x3 128->32 at 64x64: 21 ms
  against 51 ms; ASPP rate 18 at 16x16, where only the centre tap reads data: 8 ms against 78 ms.
- "taps" (stride 1, many taps read mostly padding: ASPP's atrous 3x3 at 16x16): one GEMM per tap over only
  the rectangle where that tap reads real input (``valid_taps``). Rate 12 at 16x16 does 25 % of im2col's
  multiply-adds: 37 ms against 74 ms (rate 6: 55 against 71).
- "im2col" (strided convs: the 7x7/2 stem): ``W (F, C*kh*kw) @ cols (N, C*kh*kw, Ho*Wo)``, col2im in backward.
- "gather" (what "auto" picks for every kxk conv on a GPU, where a step is bound by kernel launches,
  ``backend.launch_bound``): im2col's columns in one indexed gather (``gather_index``) and one multiply by a 0/1
  mask for the padding, instead of a copy per tap; at stride 1 the input gradient is the same gather of dout (the
  correlation with the flipped kernel) and ONE GEMM with K = F*kh*kw, instead of col2im's add per tap. A 3x3
  conv's forward and backward in about 8 array operations against kn2row's ~50 (``benchmarks/count_ops.py``), at
  the price of a 9x-input column matrix kept for backward: cheap for a GPU's bandwidth, slow on the CPU (128->32
  at 64x64: 125 ms against kn2row's 14).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from ..backend import get_array_module, launch_bound, matmul
from .functional import (
    check_dtype,
    check_input,
    col2im,
    conv_output_size,
    gather_index,
    im2col,
    pair,
    stack_shifted,
    sum_shifted,
    tap_major,
    valid_taps,
)
from .module import Module, Parameter, is_grad_enabled


@lru_cache(maxsize=512)
def _valid_taps_cached(kernel_size, padding, dilation, in_hw, out_hw) -> tuple:
    return tuple(valid_taps(kernel_size, padding, dilation, in_hw, out_hw))


def _shifts(taps) -> list:
    """Each tap's offset (a, b): output pixel (r, c) reads input pixel (r + a, c + b) through it."""
    return [(iy.start - oy.start, ix.start - ox.start) for _, _, (oy, ox), (iy, ix) in taps]


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
        algorithm: "auto" (default), or force "pointwise", "kn2row", "taps", "im2col" or "gather" (see the module
            doc).

    Attribute ``input_grad`` (default True): set it to False on a network's first layer to skip dL/dx, which
    nothing reads there (PyTorch skips it for an input that does not require grad); backward then returns None.

    Textbook twin: ``minideeplab.textbook.Conv2d``, im2col + one GEMM + col2im for every shape. This layer computes the
    same numbers (tests/test_textbook.py forces every path against it) but picks, by shape and device, the path that
    brings the data to the GEMM with the least copying (module doc; docs/fast_paths.md walks them in order).
    Forward+backward, batch 2, float32, one thread, CPU time (benchmarks/conv_paths.py on a busy machine): the dense
    layers' 3x3 128->32 at 64x64 on kn2row 32 ms against the textbook's 68; ASPP's rate 12 at 16x16 on taps 41
    against 123; rate 18, where only the centre tap reads data, on kn2row 13 against 140.
    """

    ALGORITHMS = ("auto", "pointwise", "kn2row", "taps", "im2col", "gather")

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
        self.input_grad = True   # False: backward skips dL/dx and returns None (a network's first layer)
        self.x_shape = None   # input shape of the last forward
        self.path = None      # the algorithm the last forward used
        self.saved = None     # what that path's backward needs: the columns (im2col / pointwise) or the input
        self.w_taps = None    # "kn2row" / "taps": the weight as forward multiplied it, one (F, C) matrix per tap
        self.index_arrays = {}  # on the device, built once each: "gather" (index, mask) per geometry, kn2row taps

    def output_shape(self, input_shape):
        N, _, H, W = input_shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        return (N, self.out_channels, conv_output_size(H, kh, sh, ph, dh), conv_output_size(W, kw, sw, pw, dw))

    def choose_algorithm(self, H: int, W: int, Ho: int, Wo: int, launch_bound: bool = False) -> str:
        """The path for an (H, W) input: "auto" picks by shape, and by the device: ``launch_bound`` (a GPU) takes
        the path with the fewest array operations (see the module docstring)."""
        pointwise = self.kernel_size == (1, 1) and self.padding == (0, 0)
        algo = self.algorithm
        if algo == "auto":
            if pointwise:
                return "pointwise"
            if launch_bound:
                return "gather"
            if self.stride != (1, 1):
                return "im2col"
            # kn2row multiplies every used tap with every pixel; "taps" only the pixels where the tap reads data
            taps = self._taps((H, W), (Ho, Wo))
            used = sum((o[0].stop - o[0].start) * (o[1].stop - o[1].start) for _, _, o, _ in taps)
            return "kn2row" if used >= 0.7 * len(taps) * H * W else "taps"
        if (algo == "pointwise" and not pointwise) or (algo in ("kn2row", "taps") and self.stride != (1, 1)):
            raise ValueError(f"Conv2d: algorithm {algo!r} does not apply to kernel {self.kernel_size}, "
                             f"padding {self.padding}, stride {self.stride}")
        return algo

    def _taps(self, in_hw, out_hw):
        """``valid_taps`` as a tuple, computed once per geometry (small maps run this every call)."""
        return _valid_taps_cached(self.kernel_size, self.padding, self.dilation, tuple(in_hw), tuple(out_hw))

    def _used_taps(self, in_hw, out_hw):
        """The taps that read real input (``valid_taps``) and their weights stacked as (T, F, C)."""
        taps = self._taps(in_hw, out_hw)
        xp, w = get_array_module(self.weight.data), self.weight.data
        if not taps:                          # every output reads only padding
            return taps, xp.zeros((0, *w.shape[:2]), dtype=w.dtype)
        F, C, kh, kw = w.shape
        if len(taps) == kh * kw:              # all of them: one transposing copy, no gather
            return taps, tap_major(w)
        key = (xp.__name__, "taps", tuple((t[0], t[1]) for t in taps))
        if key not in self.index_arrays:    # made once on the weight's device: no copy from the host per step
            self.index_arrays[key] = (xp.asarray([t[0] for t in taps]), xp.asarray([t[1] for t in taps]))
        rows, cols = self.index_arrays[key]
        return taps, xp.ascontiguousarray(w[:, :, rows, cols].transpose(2, 0, 1))

    def _gather(self, x, src_hw, dst_hw, transposed=False):
        """``gather_index`` of this conv's geometry as arrays on ``x``'s device (the mask in its dtype), cached."""
        xp = get_array_module(x)
        key = (xp.__name__, x.dtype.str, tuple(src_hw), tuple(dst_hw), transposed)
        if key not in self.index_arrays:
            index, valid = gather_index(src_hw, dst_hw, self.kernel_size, self.stride, self.padding, self.dilation,
                                        transposed)
            self.index_arrays[key] = (xp.asarray(index), xp.asarray(valid.astype(x.dtype)))
        return self.index_arrays[key]

    def forward(self, x):
        check_input("Conv2d", x, self.in_channels)
        check_dtype("Conv2d", x, self.weight.data)
        N, F, Ho, Wo = self.output_shape(x.shape)
        if Ho < 1 or Wo < 1:
            raise ValueError(f"Conv2d: input {tuple(x.shape)} is too small for kernel {self.kernel_size} "
                             f"with padding {self.padding} and dilation {self.dilation}")
        xp = get_array_module(x)
        C = self.in_channels
        path = self.choose_algorithm(x.shape[2], x.shape[3], Ho, Wo, launch_bound(x))
        if path in ("pointwise", "im2col", "gather"):
            if path == "pointwise":
                cols = x[:, :, ::self.stride[0], ::self.stride[1]].reshape(N, C, Ho * Wo)  # a view at stride 1
            elif path == "im2col":
                # last call's columns (its backward is done) are overwritten: the memory of a big array that
                # would otherwise be freed and faulted in again each step (not under no_grad, which keeps none and
                # whose threads may run this layer at once)
                reuse = self.saved if self.path == "im2col" and is_grad_enabled() else None
                self.saved = None
                cols = im2col(x, self.kernel_size, self.stride, self.padding, self.dilation, out=reuse)
            else:   # every tap's input pixel in one gather; the taps that read padding read 0
                index, mask = self._gather(x, x.shape[2:], (Ho, Wo))
                cols = x.reshape(N, C, -1)[:, :, index]
                cols *= mask
                cols = cols.reshape(N, -1, Ho * Wo)
            out = matmul(self.weight.data.reshape(F, -1), cols).reshape(N, F, Ho, Wo)     # already NCHW
            self.saved = cols
        elif path == "kn2row":
            taps, w_taps = self._used_taps(x.shape[2:], (Ho, Wo))
            w_taps = w_taps.reshape(-1, C)   # (T*F, C), kept for backward
            Y = matmul(w_taps, x.reshape(N, C, -1)).reshape(N, len(taps), F, *x.shape[2:])
            if (Ho, Wo) == tuple(x.shape[2:]):   # each tap's block, moved by its offset (flat slice adds)
                out = sum_shifted(Y, _shifts(taps))
            else:
                out = xp.zeros((N, F, Ho, Wo), dtype=x.dtype)
                for t, (_, _, (oy, ox), (iy, ix)) in enumerate(taps):
                    out[:, :, oy, ox] += Y[:, t, :, iy, ix]
            self.saved, self.w_taps = x, w_taps
        else:  # "taps"
            w_taps = tap_major(self.weight.data).reshape(*self.kernel_size, F, C)   # (kh, kw, F, C)
            out = xp.zeros((N, F, Ho, Wo), dtype=x.dtype)
            for i, j, (oy, ox), (iy, ix) in self._taps(x.shape[2:], (Ho, Wo)):
                xr = x[:, :, iy, ix]
                out[:, :, oy, ox] += matmul(w_taps[i, j], xr.reshape(N, C, -1)).reshape(N, F, *xr.shape[2:])
            self.saved, self.w_taps = x, w_taps
        self.x_shape, self.path = x.shape, path
        if self.bias is not None:
            out += self.bias.data[:, None, None]
        self._forward_done()
        return out

    def backward(self, dout):
        self._need(self.saved)
        self._backward_start()
        xp = get_array_module(dout)
        N, F, Ho, Wo = dout.shape
        C, (kh, kw) = self.in_channels, self.kernel_size
        if self.bias is not None:
            self.bias.accumulate_sum(dout, axis=(0, 2, 3))      # dL/db = sum of dout over batch and pixels
        if self.path in ("pointwise", "im2col", "gather"):
            d2, cols = dout.reshape(N, F, Ho * Wo), self.saved
            # dL/dW = sum_n dout_n · cols_n^T ;  dL/dcols = W^T · dout
            self.weight.accumulate_sum(matmul(d2, cols.transpose(0, 2, 1)), axis=0)
            if not self.input_grad:
                return None
            if self.path == "gather" and self.stride == (1, 1):
                # dL/dx = the correlation of dout with the flipped kernel: dout gathered back onto the input pixels
                # (tap by tap, zero where that output pixel does not exist), then one GEMM with K = F*kh*kw
                H, W = self.x_shape[2:]
                index, mask = self._gather(dout, (Ho, Wo), (H, W), transposed=True)
                dcols = d2[:, :, index]
                dcols *= mask
                w_t = xp.ascontiguousarray(self.weight.data.transpose(1, 0, 2, 3)).reshape(C, -1)   # (C, F*kh*kw)
                return matmul(w_t, dcols.reshape(N, -1, H * W)).reshape(self.x_shape)
            dcols = matmul(self.weight.data.reshape(F, -1).T, d2)
            if self.path in ("im2col", "gather"):      # dL/dx: dcols folded back onto the input by col2im
                return col2im(dcols, self.x_shape, self.kernel_size, self.stride, self.padding, self.dilation)
            if self.stride == (1, 1):
                return dcols.reshape(self.x_shape)
            dx = xp.zeros(self.x_shape, dtype=dout.dtype)   # strided 1x1: scattered into zeros
            dx[:, :, ::self.stride[0], ::self.stride[1]] = dcols.reshape(N, C, Ho, Wo)
            return dx
        H, W = self.x_shape[2:]
        if self.path == "kn2row":
            x, w_taps = self.saved, self.w_taps
            taps = self._taps((H, W), (Ho, Wo))
            # D[tap t] = dout moved to the input pixels tap t read (zero where it read padding)
            if (Ho, Wo) == (H, W):
                D = stack_shifted(dout, _shifts(taps))
            else:
                D = xp.zeros((N, len(taps), F, H, W), dtype=dout.dtype)
                for t, (_, _, (oy, ox), (iy, ix)) in enumerate(taps):
                    D[:, t, :, iy, ix] = dout[:, :, oy, ox]
            D = D.reshape(N, len(taps) * F, H * W)
            # dL/dW_tap = D_tap · x^T ;  dL/dx = W_taps^T · D (the correlation with the flipped kernel)
            G = matmul(D, x.reshape(N, C, H * W).transpose(0, 2, 1)).sum(axis=0).reshape(len(taps), F, C)
            if len(taps) == kh * kw:             # every tap, in (i, j) order: one strided add for all of them
                self.weight.accumulate(G.reshape(kh, kw, F, C).transpose(2, 3, 0, 1))
            else:
                for t, (i, j, _, _) in enumerate(taps):
                    self.weight.grad[:, :, i, j] += G[t]
            if not self.input_grad:
                return None
            return matmul(w_taps.T, D).reshape(N, C, H, W)
        # "taps": per tap, over the rectangle where it reads real input, dL/dW_tap = dout_rect · x_rect^T and
        # dL/dx_rect += W_tap^T · dout_rect. Input, dout and dx are held channel-major, (C, N, H, W), so that the batch
        # is part of the GEMMs' inner dimension (one product per tap, no per-item (F, C) results to sum) and each
        # tap's rectangle is added without a transpose; one transposing copy of each at the start and end (ASPP
        # rate 6 at 16x16, 2 threads: 18.5 ms against 20.0 with each rectangle copied and added transposed).
        x, w_taps = self.saved, self.w_taps      # w_taps: (kh, kw, F, C) from forward; its (C, F) transposes are views
        x_cm, dout_cm = (xp.ascontiguousarray(a.transpose(1, 0, 2, 3)) for a in (x, dout))
        dw_taps = xp.zeros((kh, kw, F, C), dtype=dout.dtype)
        dx_cm = xp.zeros((C, N, H, W), dtype=dout.dtype) if self.input_grad else None
        for i, j, (oy, ox), (iy, ix) in self._taps((H, W), (Ho, Wo)):
            dr = dout_cm[:, :, oy, ox].reshape(F, -1)                 # (F, N*h*w), a copy unless the whole map
            matmul(dr, x_cm[:, :, iy, ix].reshape(C, -1).T, out=dw_taps[i, j])
            if self.input_grad:
                rect = dx_cm[:, :, iy, ix]
                rect += matmul(w_taps[i, j].T, dr).reshape(rect.shape)
        dx = xp.ascontiguousarray(dx_cm.transpose(1, 0, 2, 3)) if self.input_grad else None
        self.weight.accumulate(dw_taps.transpose(2, 3, 0, 1))
        return dx

    def _clear_cache(self):
        self.x_shape = self.path = self.saved = self.w_taps = None

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
