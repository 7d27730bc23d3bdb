"""The textbook batch normalization: statistics per channel, and the backward step by step through the mean and
the variance (derivation: docs/derivations.md, "Batch normalization")."""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from ..nn.module import Module, Parameter


class BatchNorm2d(Module):
    """y = weight * (x - mean) / sqrt(var + eps) + bias, with the mean and variance of each channel over (N, H, W).

    Training uses the batch's mean and (biased) variance and updates the running estimates as PyTorch does:
    ``running = (1 - momentum) * running + momentum * batch``, with the *unbiased* variance (times n / (n - 1),
    n = N*H*W), and counts ``num_batches_tracked``. Eval uses ``running_mean`` and ``running_var``.

    Shapes:
        x: (N, C, H, W) -> out: (N, C, H, W).

    Args:
        num_features: C.
        eps: added to the variance.
        momentum: weight of the current batch in the running estimates.
        affine: learn ``weight`` (gamma, init 1) and ``bias`` (beta, init 0).
        dtype: dtype of the parameters and running statistics.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 dtype=np.float32):
        super().__init__()
        self.num_features, self.eps, self.momentum, self.affine = int(num_features), float(eps), momentum, affine
        self.weight = Parameter(np.ones(num_features, dtype=dtype)) if affine else None
        self.bias = Parameter(np.zeros(num_features, dtype=dtype)) if affine else None
        self.register_buffer("running_mean", np.zeros(num_features, dtype=dtype))
        self.register_buffer("running_var", np.ones(num_features, dtype=dtype))
        self.register_buffer("num_batches_tracked", np.zeros((), dtype=np.int64))
        self.centered = None     # x - mean, (N, C, H, W)
        self.inv_std = None      # 1 / sqrt(var + eps), (C, 1, 1)
        self.batch_stats = None  # whether the last forward used the batch's statistics (training) or the running ones

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"BatchNorm2d: expected input (N, {self.num_features}, H, W), got {tuple(x.shape)}")
        xp = get_array_module(x)
        n = x.shape[0] * x.shape[2] * x.shape[3]       # values per channel
        self.batch_stats = self.training
        if self.training:
            if n < 2:
                raise ValueError(f"BatchNorm2d: training needs more than one value per channel, got input shape "
                                 f"{tuple(x.shape)}; use a batch of at least 2 or call .eval()")
            mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))          # biased variance
            m = self.momentum
            self.running_mean[...] = (1 - m) * self.running_mean + m * mean
            self.running_var[...] = (1 - m) * self.running_var + m * var * n / (n - 1)   # unbiased
            self.num_batches_tracked += 1
        else:
            mean, var = self.running_mean, self.running_var
        self.centered = x - mean[:, None, None]
        self.inv_std = 1.0 / xp.sqrt(var[:, None, None] + self.eps)
        xhat = self.centered * self.inv_std
        return xhat * self.weight.data[:, None, None] + self.bias.data[:, None, None] if self.affine else xhat

    def backward(self, dout):
        ### BEGIN SOLUTION
        ### HINT: gamma and beta: sums over (N, H, W). Eval (not self.batch_stats): mean and var are constants. Training: x
        ### HINT: reaches L through xhat, the variance and the mean; dvar, then dmean, then dx (docs/derivations.md)
        n = dout.shape[0] * dout.shape[2] * dout.shape[3]
        xhat, inv_std = self.centered * self.inv_std, self.inv_std
        if self.affine:   # dL/dgamma = sum dout * xhat ;  dL/dbeta = sum dout (over batch and pixels)
            self.weight.grad += (dout * xhat).sum(axis=(0, 2, 3))
            self.bias.grad += dout.sum(axis=(0, 2, 3))
        dxhat = dout * self.weight.data[:, None, None] if self.affine else dout
        if not self.batch_stats:          # eval: mean and var are constants, the layer is affine
            return dxhat * inv_std
        # dL/dx = dxhat * inv_std + dvar * 2 (x - mean) / n + dmean / n  (x reaches L through xhat, var and mean)
        dvar = (dxhat * self.centered).sum(axis=(0, 2, 3), keepdims=True) * -0.5 * inv_std ** 3
        dmean = -(dxhat * inv_std).sum(axis=(0, 2, 3), keepdims=True) \
            + dvar * -2.0 * self.centered.mean(axis=(0, 2, 3), keepdims=True)      # (this second term is 0)
        return dxhat * inv_std + dvar * 2.0 * self.centered / n + dmean / n
        ### END SOLUTION

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"
