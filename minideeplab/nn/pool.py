"""Pooling: max, average, and global (adaptive 1x1) average."""
from __future__ import annotations

from ..backend import get_array_module, scatter_add
from .functional import check_input, conv_output_size, fold_taps, kernel_offsets, pad2d, pair
from .module import Module


class _Pool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pair(stride if stride is not None else kernel_size, "stride")
        self.padding = pair(padding, "padding")
        if any(2 * p > k for p, k in zip(self.padding, self.kernel_size)):
            raise ValueError(f"{type(self).__name__}: padding {self.padding} must be at most half the kernel "
                             f"{self.kernel_size}")
        self.x_shape = None

    @property
    def n_taps(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    def _padded(self, x, pad_value):
        """``(x padded, Ho, Wo)``, after checking ``x`` (and keeping its shape for backward)."""
        name = type(self).__name__
        check_input(name, x)
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        Ho, Wo = conv_output_size(x.shape[2], kh, sh, ph), conv_output_size(x.shape[3], kw, sw, pw)
        if Ho < 1 or Wo < 1:
            raise ValueError(f"{name}: input {tuple(x.shape)} is smaller than the kernel {self.kernel_size}")
        self.x_shape = x.shape
        return pad2d(x, self.padding, pad_value), Ho, Wo

    def _windows(self, x, pad_value):
        """Yield (tap, rows, cols, window (N, C, Ho, Wo)) for each kernel offset over the padded input."""
        kw = self.kernel_size[1]
        xpad, Ho, Wo = self._padded(x, pad_value)
        for i, j, rows, cols in kernel_offsets(*self.kernel_size, self.stride, (1, 1), Ho, Wo):
            yield i * kw + j, rows, cols, xpad[:, :, rows, cols]

    def _scatter(self, tap_grad, dout):
        """The adjoint of ``_windows``: slice-add ``tap_grad(tap)`` (N, C, Ho, Wo) for each tap onto the input."""
        kw = self.kernel_size[1]
        return fold_taps(lambda i, j: tap_grad(i * kw + j), self.x_shape, self.kernel_size, self.stride,
                         self.padding, (1, 1), dout)

    def _clear_cache(self):
        self.x_shape = None

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class MaxPool2d(_Pool2d):
    """Maximum over each window; padding counts as -inf (never selected).

    Shapes: x: (N, C, H, W) -> out: (N, C, Ho, Wo), Ho = floor((H + 2p - k) / s) + 1.

    Args:
        kernel_size, stride (default: kernel_size), padding: ints or (h, w) pairs.

    Textbook twin: ``minideeplab.textbook.MaxPool2d``, which builds the windows with im2col (N, C, kh*kw, Ho, Wo),
    takes max and argmax over them and routes dout back with col2im of a one-hot. This layer never builds the windows:
    a separable maximum (rows, then columns) that tracks the winning tap in int8 without branches, and one
    scatter-add in backward. The stem's 3x3/2 on 2x64x128x128, forward+backward, one thread: 15.6 ms against 59.1
    (benchmarks/textbook_layers.py).
    """

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__(kernel_size, stride, padding)
        self.argmax = None  # (N, C, Ho, Wo) index of the winning tap; first one on ties, as PyTorch
        self.x = None       # eval mode keeps the input instead; backward finds the winners then

    def forward(self, x):
        # eval: only the maximum (a third of the work); the winners are found in backward, if it is ever called
        out, self.argmax = self._max(x, with_argmax=self.training)
        self.x = None if self.training else x
        return out

    def _max(self, x, with_argmax: bool):
        """``(out, argmax)``. A window's maximum is the maximum over its kh rows of each row's maximum over kw
        columns (max is separable): kw - 1 + kh - 1 comparisons per output instead of kh·kw - 1 (3x3 stride 2 on
        2x64x128x128: 3.6 ms against 4.8 in eval, 6.6 against 9.4 with the winners)."""
        xp = get_array_module(x)
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        xpad, Ho, Wo = self._padded(x, -xp.inf)
        label = xp.int8 if self.n_taps < 128 else xp.int32
        # along each padded row: the maximum of the kw columns of each window, and which column j it was
        cols = [xpad[:, :, :, j:j + sw * (Wo - 1) + 1:sw] for j in range(kw)]
        row_max, col = _first_max(cols, [label(j) for j in range(kw)] if with_argmax else None)
        # down the rows: the maximum of kh row maxima; the winning tap is i * kw + (the column its row chose)
        rows = [slice(i, i + sh * (Ho - 1) + 1, sh) for i in range(kh)]
        taps = [col[:, :, r] + label(i * kw) for i, r in enumerate(rows)] if with_argmax else None
        return _first_max([row_max[:, :, r] for r in rows], taps)

    def backward(self, dout):
        if self.argmax is None and self.x is not None:     # eval forward: find the winners now
            self.argmax = self._max(self.x, with_argmax=True)[1]
        self._need(self.argmax)
        # dL/dx = dout routed to the input that won each window, summed where windows overlap: each winner's flat
        # position in the padded input (its window's corner + its tap's offset), then one scatter-add (add.at;
        # 3.2 ms against 9.2 for a masked product per tap)
        xp = get_array_module(dout)
        N, C, H, W = self.x_shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        Hp, Wp, (Ho, Wo) = H + 2 * ph, W + 2 * pw, dout.shape[2:]
        tap_offset = ((xp.arange(kh) * Wp)[:, None] + xp.arange(kw)).reshape(-1)     # made on the device: no copy
        corner = (xp.arange(Ho) * (sh * Wp))[:, None] + xp.arange(Wo) * sw          # in one (n, c) plane
        index = tap_offset[self.argmax]
        index += xp.arange(N * C).reshape(N, C, 1, 1) * (Hp * Wp) + corner
        dxpad = xp.zeros(N * C * Hp * Wp, dtype=dout.dtype)
        scatter_add(dxpad, index.reshape(-1), dout.reshape(-1))
        return dxpad.reshape(N, C, Hp, Wp)[:, :, ph:ph + H, pw:pw + W]

    def _clear_cache(self):
        super()._clear_cache()
        self.argmax = self.x = None


def _first_max(windows, labels=None):
    """``(maximum, label)``: the elementwise maximum of the arrays ``windows`` and, if ``labels`` is given, the label
    of the first window that holds it (``labels[k]``: a number, or an array like the windows; None: label None).

    Branch-free updates: a masked copy (copyto(where=), out[mask] = ...) on a random mask is ~10x slower than
    elementwise arithmetic, which mispredicts nothing.
    """
    xp = get_array_module(windows[0])
    out, won = windows[0].copy(), None
    if labels is not None:
        won = xp.empty(out.shape, dtype=labels[0].dtype)      # numpy scalars have a dtype too
        won[...] = labels[0]
    for k in range(1, len(windows)):
        if labels is not None:     # strictly greater: the first maximum wins ties
            won += (windows[k] > out).view(xp.int8) * (labels[k] - won)
        xp.maximum(out, windows[k], out=out)
    return out, won


class AvgPool2d(_Pool2d):
    """Mean over each window; zero padding is counted in the divisor (PyTorch's count_include_pad=True).

    Shapes: x: (N, C, H, W) -> out: (N, C, Ho, Wo), Ho = floor((H + 2p - k) / s) + 1.

    Args:
        kernel_size, stride (default: kernel_size), padding: ints or (h, w) pairs.

    Textbook twin: ``minideeplab.textbook.AvgPool2d``, the mean of im2col's windows and col2im in backward. This
    layer adds the kh*kw shifted views in place without building the windows: 3.0 ms against 6.5 forward+backward
    for transition 1's 2x2/2 on 2x128x64x64, one thread (benchmarks/textbook_layers.py).
    """

    def forward(self, x):
        out = None
        for _, _, _, win in self._windows(x, 0.0):
            if out is None:
                out = win.copy()
            else:
                out += win
        out *= 1.0 / self.n_taps
        return out

    def backward(self, dout):
        self._need(self.x_shape)
        # dL/dx = dout / (kh*kw) added to every input of the window
        g = dout * (1.0 / self.n_taps)
        return self._scatter(lambda tap: g, dout)


class AdaptiveAvgPool2d(Module):
    """Global average pooling (output size 1 only, which is what image pooling in ASPP needs).

    Shapes: x: (N, C, H, W) -> out: (N, C, 1, 1).

    Args:
        output_size: 1 or (1, 1).

    Textbook twin: ``minideeplab.textbook.AdaptiveAvgPool2d``, the same code.
    """

    def __init__(self, output_size=1):
        super().__init__()
        if pair(output_size, "output_size") != (1, 1):
            raise ValueError(f"AdaptiveAvgPool2d: only output_size 1 is supported, got {output_size!r}")
        self.output_size = (1, 1)
        self.x_shape = None

    def forward(self, x):
        check_input("AdaptiveAvgPool2d", x)
        self.x_shape = x.shape
        return x.mean(axis=(2, 3), keepdims=True)

    def backward(self, dout):
        self._need(self.x_shape)
        xp = get_array_module(dout)
        # dL/dx = dout / (H*W), broadcast over the map
        H, W = self.x_shape[2:]
        return xp.broadcast_to(dout / (H * W), self.x_shape).copy()

    def _clear_cache(self):
        self.x_shape = None

    def extra_repr(self):
        return "output_size=1"
