"""The textbook pooling layers: the kernel windows are ``im2col``'s columns, the backward is ``col2im``
(derivations: docs/derivations.md, "Pooling")."""
from __future__ import annotations

from ..backend import get_array_module
from ..nn.module import Module
from .conv import col2im, conv_output_size, im2col, pair


class MaxPool2d(Module):
    """Maximum over each window; padding counts as -inf (never selected); on ties the first tap wins (as PyTorch).

    Shapes: x: (N, C, H, W) -> out: (N, C, Ho, Wo), Ho = floor((H + 2p - k) / s) + 1.

    Args:
        kernel_size, stride (default: kernel_size), padding: ints or (h, w) pairs.
    """

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size, self.padding = pair(kernel_size), pair(padding)
        self.stride = pair(stride if stride is not None else kernel_size)
        self.x_shape = None   # input shape of the last forward
        self.argmax = None    # (N, C, Ho, Wo): the tap (i*kw + j) of each window that won

    def forward(self, x):
        xp = get_array_module(x)
        N, C, H, W = self.x_shape = x.shape
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        Ho, Wo = conv_output_size(H, kh, self.stride[0], ph), conv_output_size(W, kw, self.stride[1], pw)
        xpad = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=-xp.inf)
        windows = im2col(xpad, self.kernel_size, self.stride).reshape(N, C, kh * kw, Ho, Wo)
        self.argmax = windows.argmax(axis=2)
        return windows.max(axis=2)

    def backward(self, dout):
        ### BEGIN SOLUTION
        ### HINT: each window's dout goes to ONE input, the tap that won (self.argmax): build the columns' gradient as a
        ### HINT: one-hot over the kh*kw taps, fold it back with col2im onto the -inf padded shape, crop the padding
        xp = get_array_module(dout)
        N, C, H, W = self.x_shape
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        # dL/dx = dout routed to the input that won each window (one-hot over the taps), summed where windows overlap
        one_hot = xp.arange(kh * kw)[:, None, None] == self.argmax[:, :, None]           # (N, C, kh*kw, Ho, Wo)
        dcols = (one_hot * dout[:, :, None]).reshape(N, C * kh * kw, -1)
        dxpad = col2im(dcols, (N, C, H + 2 * ph, W + 2 * pw), self.kernel_size, self.stride)
        return dxpad[:, :, ph:ph + H, pw:pw + W]
        ### END SOLUTION

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class AvgPool2d(Module):
    """Mean over each window; zero padding is counted in the divisor (PyTorch's count_include_pad=True).

    Shapes: x: (N, C, H, W) -> out: (N, C, Ho, Wo), Ho = floor((H + 2p - k) / s) + 1.

    Args:
        kernel_size, stride (default: kernel_size), padding: ints or (h, w) pairs.
    """

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size, self.padding = pair(kernel_size), pair(padding)
        self.stride = pair(stride if stride is not None else kernel_size)
        self.x_shape = None   # input shape of the last forward

    def forward(self, x):
        N, C, H, W = self.x_shape = x.shape
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        Ho, Wo = conv_output_size(H, kh, self.stride[0], ph), conv_output_size(W, kw, self.stride[1], pw)
        cols = im2col(x, self.kernel_size, self.stride, self.padding).reshape(N, C, kh * kw, Ho, Wo)
        return cols.mean(axis=2)

    def backward(self, dout):
        ### BEGIN SOLUTION
        ### HINT: every input of a window gets the same share of its dout (the mean's weight); col2im folds the columns back
        xp = get_array_module(dout)
        N, C, Ho, Wo = dout.shape
        taps = self.kernel_size[0] * self.kernel_size[1]
        # dL/dx = dout / (kh*kw) added to every input of the window (col2im sums the overlaps)
        dcols = xp.broadcast_to(dout[:, :, None] / taps, (N, C, taps, Ho, Wo)).reshape(N, C * taps, Ho * Wo)
        return col2im(dcols, self.x_shape, self.kernel_size, self.stride, self.padding)
        ### END SOLUTION

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class AdaptiveAvgPool2d(Module):
    """Global average pooling (output size 1 only: what ASPP's image pooling needs).

    Shapes: x: (N, C, H, W) -> out: (N, C, 1, 1).

    Args:
        output_size: 1 or (1, 1).
    """

    def __init__(self, output_size=1):
        super().__init__()
        if pair(output_size) != (1, 1):
            raise ValueError(f"AdaptiveAvgPool2d: only output_size 1 is supported, got {output_size!r}")
        self.x_shape = None   # input shape of the last forward

    def forward(self, x):
        self.x_shape = x.shape
        return x.mean(axis=(2, 3), keepdims=True)

    def backward(self, dout):
        ### BEGIN SOLUTION
        ### HINT: the mean over H*W pixels: every pixel gets the same share of dout; return the input's shape
        xp = get_array_module(dout)
        # dL/dx = dout / (H*W), the same at every pixel of the map
        return xp.broadcast_to(dout / (self.x_shape[2] * self.x_shape[3]), self.x_shape).copy()
        ### END SOLUTION
