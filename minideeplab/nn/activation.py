"""Elementwise layers: ReLU, Sigmoid, Dropout."""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from .module import Module


def _check_float(layer, x):
    if not hasattr(x, "dtype") or x.dtype.kind != "f":
        raise TypeError(f"{layer}: expected a floating-point array, got {getattr(x, 'dtype', type(x).__name__)}")


def sigmoid(x):
    """Numerically stable logistic function: ``tanh(x/2)/2 + 1/2`` never overflows."""
    xp = get_array_module(x)
    return xp.tanh(x * 0.5) * 0.5 + 0.5


class ReLU(Module):
    """max(x, 0). Shapes: any -> same.

    Args:
        inplace: overwrite ``x`` with the result instead of allocating a new array (PyTorch's and torchvision's
            ``ReLU(inplace=True)``). Only for an input nobody else reads afterwards, such as the fresh output of
            the BatchNorm2d before it (batch norm keeps its input, never its output): it saves one full-size
            array and one write stream per call.

    Training mode keeps the mask ``x > 0`` for backward (one byte per value, cheapest to apply). Eval mode keeps
    only a reference to the output, which the next layer holds anyway, and backward rebuilds the mask from it
    (``out > 0`` exactly where ``x > 0``): inference never pays for a mask it does not use.
    """

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = bool(inplace)
        self.mask = None  # x > 0 (training mode)
        self.out = None   # the output (eval mode)

    def forward(self, x):
        _check_float("ReLU", x)
        xp = get_array_module(x)
        self.mask = x > 0 if self.training else None
        out = xp.maximum(x, 0, out=x if self.inplace else None)
        self.out = None if self.training else out
        return out

    def backward(self, dout):
        mask = self.mask if self.mask is not None else (None if self.out is None else self.out > 0)
        self._need(mask)
        # dL/dx = dout where x > 0, else 0 (a new array: dout is never modified)
        return dout * mask

    def _clear_cache(self):
        self.mask = self.out = None

    def extra_repr(self):
        return "inplace=True" if self.inplace else ""


class Sigmoid(Module):
    """1 / (1 + exp(-x)), computed stably. Shapes: any -> same."""

    def __init__(self):
        super().__init__()
        self.out = None

    def forward(self, x):
        _check_float("Sigmoid", x)
        self.out = sigmoid(x)
        return self.out

    def backward(self, dout):
        self._need(self.out)
        # dL/dx = dout * s * (1 - s)
        return dout * self.out * (1 - self.out)

    def _clear_cache(self):
        self.out = None


class Dropout(Module):
    """Inverted dropout: in training zero each value with probability p and scale survivors by 1/(1-p).

    Identity in eval mode. Masks are drawn on the host by a NumPy ``Generator``, so a CPU and a GPU run draw the
    same ones. ``draw_ahead()`` draws the next forward's mask beforehand into an array that stays put: a step
    captured as a CUDA graph (``backend.cuda_graph``) reads it from there, and copying in a new mask before each
    replay is all it takes (the graph itself cannot copy from the host). Shapes: any -> same.

    Args:
        p: drop probability in [0, 1).
        rng: ``numpy.random.Generator`` that draws the masks (explicit, so runs are reproducible).
    """

    def __init__(self, p: float = 0.5, rng: np.random.Generator | None = None):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p = float(p)
        self.rng = rng if rng is not None else np.random.default_rng()
        self.scale_mask = None  # (x survives) / (1 - p), or None in eval
        self.ahead = None       # the next forward's mask, drawn by draw_ahead (always the same array)
        self.ahead_ready = False

    def forward(self, x):
        _check_float("Dropout", x)
        if not self.training or self.p == 0:
            self.scale_mask = 1.0
            return x
        if self.ahead_ready:
            if self.ahead.shape != x.shape or get_array_module(self.ahead) is not get_array_module(x):
                raise ValueError(f"Dropout: the mask drawn ahead has shape {tuple(self.ahead.shape)} on "
                                 f"{type(self.ahead).__module__}, the input {tuple(x.shape)} on {type(x).__module__}")
            self.scale_mask, self.ahead_ready = self.ahead, False
        else:
            self.scale_mask = get_array_module(x).asarray(self._draw(x.shape, x.dtype))
        return x * self.scale_mask

    def draw_ahead(self) -> None:
        """Draw the mask of the next training forward now, in the shape, dtype and device of the last one, into
        ``self.ahead`` (allocated once, then overwritten in place). The next forward that runs uses it (a graph
        replay reads it without running forward in Python: ``ahead_ready`` then stays set until one does)."""
        last = self.scale_mask if hasattr(self.scale_mask, "shape") else self.ahead
        if last is None:
            raise RuntimeError("Dropout.draw_ahead: needs a training forward first (for the mask's shape and device)")
        xp = get_array_module(last)
        if self.ahead is None or self.ahead.shape != last.shape or get_array_module(self.ahead) is not xp:
            self.ahead = xp.empty_like(last)
        self.ahead[...] = xp.asarray(self._draw(last.shape, last.dtype))
        self.ahead_ready = True

    def _draw(self, shape, dtype):
        keep = self.rng.random(shape) >= self.p          # drawn on the host: the Generator is NumPy's
        return keep.astype(dtype) / (1 - self.p)

    def backward(self, dout):
        self._need(self.scale_mask)
        # dL/dx = dout * mask / (1 - p)
        return dout * self.scale_mask

    def _clear_cache(self):
        self.scale_mask = None

    def extra_repr(self):
        return f"p={self.p}"


__all__ = ["ReLU", "Sigmoid", "Dropout", "sigmoid"]
