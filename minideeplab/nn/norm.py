"""Batch normalization over (N, H, W) for each channel."""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from .functional import check_dtype, check_input
from .module import Module, Parameter


class BatchNorm2d(Module):
    """y = weight * (x - mean) / sqrt(var + eps) + bias, statistics per channel.

    Training uses the batch's mean and (biased) variance and updates the running estimates
    ``running = (1 - momentum) * running + momentum * batch`` with the unbiased variance, as PyTorch does.
    Eval uses ``running_mean`` / ``running_var``.

    Shapes:
        x: (N, C, H, W) -> out: (N, C, H, W).

    Args:
        num_features: C.
        eps: added to the variance.
        momentum: weight of the current batch in the running estimates.
        affine: learn ``weight`` (gamma, init 1) and ``bias`` (beta, init 0).
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
        self.xhat = None       # normalized input (N, C, H, W)
        self.inv_std = None    # 1 / sqrt(var + eps), shape (C,)
        self.batch_stats = None  # whether forward used batch statistics (train) or running ones (eval)

    def forward(self, x):
        check_input("BatchNorm2d", x, self.num_features)
        check_dtype("BatchNorm2d", x, self.running_mean)
        xp = get_array_module(x)
        n = x.shape[0] * x.shape[2] * x.shape[3]
        if self.training:
            if n < 2:
                raise ValueError(f"BatchNorm2d: training needs more than one value per channel, got input shape "
                                 f"{tuple(x.shape)} (N*H*W = {n}); use a batch of at least 2 or call .eval()")
            mean = x.mean(axis=(0, 2, 3))
            centered = x - mean[:, None, None]
            var = xp.mean(centered * centered, axis=(0, 2, 3))
            m = self.momentum
            self.running_mean[...] = (1 - m) * self.running_mean + m * mean
            self.running_var[...] = (1 - m) * self.running_var + m * var * (n / (n - 1))
            self.num_batches_tracked += 1
        else:
            centered = x - self.running_mean[:, None, None]
            var = self.running_var
        inv_std = 1.0 / xp.sqrt(var + self.eps)
        xhat = centered
        xhat *= inv_std[:, None, None]          # in place: `centered` is a fresh array
        self.xhat, self.inv_std, self.batch_stats = xhat, inv_std, self.training
        if not self.affine:
            return xhat.copy()
        return xhat * self.weight.data[:, None, None] + self.bias.data[:, None, None]

    def backward(self, dout):
        self._need(self.xhat)
        xhat, inv_std = self.xhat, self.inv_std
        if self.affine:
            # dL/dgamma = sum dout * xhat ; dL/dbeta = sum dout
            self.weight.grad += (dout * xhat).sum(axis=(0, 2, 3))
            self.bias.grad += dout.sum(axis=(0, 2, 3))
            scale = self.weight.data * inv_std
        else:
            scale = inv_std
        if not self.batch_stats:
            # eval: statistics are constants, so dL/dx = dout * gamma / sqrt(var + eps)
            return dout * scale[:, None, None]
        # train: dL/dx = gamma/sigma * (dout - mean(dout) - xhat * mean(dout * xhat)), means over (N, H, W)
        mean_d = dout.mean(axis=(0, 2, 3))
        mean_dx = (dout * xhat).mean(axis=(0, 2, 3))
        dx = xhat * mean_dx[:, None, None]
        dx += mean_d[:, None, None]
        dx = dout - dx
        dx *= scale[:, None, None]
        return dx

    def _clear_cache(self):
        self.xhat = self.inv_std = None

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"
