"""Channel concatenation: the join where several paths meet."""
from __future__ import annotations

from itertools import accumulate

from ..backend import get_array_module
from .functional import check_input
from .module import Module


class Concat(Module):
    """Concatenate inputs along ``dim`` (channels by default).

    Shapes: x_1: (N, C_1, H, W), ..., x_k: (N, C_k, H, W) -> out: (N, C_1 + ... + C_k, H, W).
    ``forward(*xs)`` takes the inputs as separate arguments; ``backward(dout)`` returns a tuple.

    Args:
        dim: the axis to join along.

    Textbook twin: none as a layer; ``minideeplab.textbook.ASPP`` and ``textbook.DenseBlock`` concatenate inline
    (``xp.concatenate``) and split the gradient in their own backward, as this module's backward does. The fast
    dense block needs no concatenation at all (one shared buffer, ``models.densenet.DenseBlock``).
    """

    def __init__(self, dim: int = 1):
        super().__init__()
        self.dim = dim
        self.sizes = None  # size of each input along dim

    def forward(self, *xs):
        if len(xs) == 1 and isinstance(xs[0], (list, tuple)):
            xs = tuple(xs[0])
        if not xs:
            raise ValueError("Concat: needs at least one input")
        for i, x in enumerate(xs):
            check_input(f"Concat (input {i})", x)
            other = [s for d, s in enumerate(x.shape) if d != self.dim % 4]
            ref = [s for d, s in enumerate(xs[0].shape) if d != self.dim % 4]
            if other != ref:
                raise ValueError(f"Concat: input {i} has shape {tuple(x.shape)}, incompatible with input 0 "
                                 f"{tuple(xs[0].shape)} outside dim {self.dim}")
        xp = get_array_module(*xs)
        self.sizes = [x.shape[self.dim] for x in xs]
        return xp.concatenate(xs, axis=self.dim)

    def backward(self, dout):
        self._need(self.sizes)
        xp = get_array_module(dout)
        # the gradient splits: each input gets (a copy of) its own slice of dout
        bounds = list(accumulate(self.sizes))[:-1]
        return tuple(part.copy() for part in xp.split(dout, bounds, axis=self.dim))

    def _clear_cache(self):
        self.sizes = None

    def extra_repr(self):
        return f"dim={self.dim}"
