"""The textbook elementwise layers: ReLU, Sigmoid, Dropout (derivations: docs/derivations.md, "ReLU, sigmoid,
dropout")."""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from ..nn.module import Module


class ReLU(Module):
    """max(x, 0). Shapes: any -> same."""

    def __init__(self):
        super().__init__()
        self.mask = None   # x > 0

    def forward(self, x):
        self.mask = x > 0
        return get_array_module(x).maximum(x, 0)

    def backward(self, dout):
        ### BEGIN SOLUTION
        ### HINT: keep dout where the input was positive (self.mask from forward), 0 elsewhere; return a new array, never change dout
        # dL/dx = dout where x > 0, else 0
        return dout * self.mask
        ### END SOLUTION


class Sigmoid(Module):
    """s(x) = 1 / (1 + exp(-x)), computed as tanh(x/2)/2 + 1/2, which never overflows. Shapes: any -> same."""

    def __init__(self):
        super().__init__()
        self.out = None   # s(x)

    def forward(self, x):
        ### BEGIN SOLUTION
        ### HINT: s(x) without overflow (exp(-x) overflows for x << 0: see the class docstring); keep it in self.out for backward
        self.out = get_array_module(x).tanh(x * 0.5) * 0.5 + 0.5
        return self.out
        ### END SOLUTION

    def backward(self, dout):
        ### BEGIN SOLUTION
        ### HINT: the derivative of the sigmoid, written with s = self.out (no exp needed)
        # dL/dx = dout * s * (1 - s)
        return dout * self.out * (1 - self.out)
        ### END SOLUTION


class Dropout(Module):
    """Inverted dropout: in training, zero each value with probability p and scale the survivors by 1/(1-p), so the
    expected output is x; the identity in eval mode.

    The mask is drawn on the host by the NumPy Generator ``rng``, ``rng.random(shape) >= p``, exactly as
    ``minideeplab.nn.Dropout`` draws it: with Generators in the same state the two layers (and the textbook and the
    fast models) draw the same masks.

    Shapes: any -> same.

    Args:
        p: drop probability in [0, 1).
        rng: ``numpy.random.Generator`` that draws the masks.
    """

    def __init__(self, p: float = 0.5, rng: np.random.Generator | None = None):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p = float(p)
        self.rng = rng if rng is not None else np.random.default_rng()
        self.mask = None   # (x survives) / (1 - p), or 1.0 when nothing is dropped

    def forward(self, x):
        if not self.training or self.p == 0:
            self.mask = 1.0
            return x
        keep = self.rng.random(x.shape) >= self.p          # on the host, as the fast Dropout draws it
        self.mask = get_array_module(x).asarray(keep.astype(x.dtype) / (1 - self.p))
        return x * self.mask

    def backward(self, dout):
        # dL/dx = dout * mask / (1 - p)  (mask already holds the 1 / (1 - p))
        return dout * self.mask

    def extra_repr(self):
        return f"p={self.p}"
