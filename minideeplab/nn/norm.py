"""Batch normalization over (N, H, W) for each channel."""
from __future__ import annotations

import numpy as np

from ..backend import fuse, get_array_module, launch_bound
from ..finite import NonFiniteError, is_finite
from .functional import channel_mean, channel_sum, check_dtype, check_input
from .module import Module, Parameter


def batch_statistics(x, out=None):
    """``(x - mean, mean, var)`` per channel over (N, H, W), ``var`` biased: what a training-mode batch norm needs.

    Per-channel means by ``channel_mean`` (BLAS products on NumPy, also for a channel-prefix view of a dense
    block's buffer; one reduction kernel each on a GPU). Two passes (mean, then the centred squares) keep the
    variance accurate in float32. ``out``: three arrays ``(centered, mean, var)`` to write into (a dense block's
    shared statistics).

    Shapes: x: (N, C, H, W) -> centered: (N, C, H, W), mean: (C,), var: (C,).
    """
    centered, mean, var = out if out is not None else (None, None, None)
    mean = channel_mean(x, out=mean)
    centered = get_array_module(x).subtract(x, mean[:, None, None], out=centered)
    return centered, mean, channel_mean(centered, centered, out=var)


class BatchNorm2d(Module):
    """y = weight * (x - mean) / sqrt(var + eps) + bias, statistics per channel.

    Training uses the batch's mean and (biased) variance and updates the running estimates
    ``running = (1 - momentum) * running + momentum * batch`` with the unbiased variance, as PyTorch does.
    Eval uses ``running_mean`` / ``running_var``. On the CPU a training batch whose statistics are not finite
    raises ``finite.NonFiniteError`` (a ValueError) before the running estimates are touched (one sum over C
    values); on a GPU that read would be a synchronisation per layer, so there ``Trainer`` catches the NaN in the
    loss and restores the running estimates of the step instead.

    Shapes:
        x: (N, C, H, W) -> out: (N, C, H, W).

    Args:
        num_features: C.
        eps: added to the variance.
        momentum: weight of the current batch in the running estimates.
        affine: learn ``weight`` (gamma, init 1) and ``bias`` (beta, init 0).
        dtype: dtype of the parameters and running statistics; inputs must match it.

    Textbook twin: ``minideeplab.textbook.BatchNorm2d``, which builds xhat and steps backward through the variance and
    the mean. This layer never builds xhat (out = centered * (gamma * inv_std) + beta), writes dL/dx in closed form,
    ``scale * (dout - mean(dout) - k * centered)``, in one pass, takes its per-channel sums as BLAS products
    (``functional.channel_sum``) and each per-channel chain as one kernel on a GPU (``backend.fuse``), and lets a dense
    block share its batch statistics (``stats``) and a fused head fold it (``affine_map``, ``backward_terms``).
    Forward+backward on 2x128x64x64, one thread: 5.1 ms against the textbook's 10.7 in training, 2.7 against 5.2 in
    eval (benchmarks/textbook_layers.py).
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
        self.centered = None   # x - batch mean (N, C, H, W), kept by a training-mode forward (xhat = centered * inv_std)
        self.x = None          # the input, kept by an eval-mode forward instead (centered is rebuilt in backward)
        self.inv_std = None    # 1 / sqrt(var + eps), shape (C,)
        self.scale = None      # weight * inv_std (the map's per-channel scale; inv_std without affine), shape (C,)
        self.batch_stats = None  # whether forward used batch statistics (train) or running ones (eval)

    def forward(self, x, stats=None):
        """``stats``: optionally ``(centered, mean, var)`` of ``x`` already computed by the caller (``batch_statistics``;
        a dense block shares them between its layers). Used in training mode only."""
        src, scale, shift = self.affine_map(x, stats)
        return _affine(src, scale[:, None, None], shift[:, None, None])

    def affine_map(self, x, stats=None):
        """Everything ``forward`` does but the two elementwise passes: ``(src, scale, shift)`` with
        ``forward(x) == src * scale + shift`` per channel (src: ``x`` in eval, ``x - batch mean`` in training).

        Checks the input, caches what backward needs and, in training, updates the running statistics. For a
        caller that folds the affine map into what comes next (``nn.fused.BNReLUConv1x1``).
        Shapes: x: (N, C, H, W) -> src: (N, C, H, W), scale: (C,), shift: (C,).
        """
        check_input("BatchNorm2d", x, self.num_features)
        check_dtype("BatchNorm2d", x, self.running_mean)
        xp = get_array_module(x)
        n = x.shape[0] * x.shape[2] * x.shape[3]
        if not self.training:
            # eval: a per-channel affine map of x; the centred input is only needed (and rebuilt) in backward
            self.x, self.centered, self.batch_stats = x, None, False
            inv_std, scale, shift = self.eval_affine()    # locals: no_grad threads may run this layer at once
            self.inv_std, self.scale = inv_std, scale
            return x, scale, shift
        if n < 2:
            raise ValueError(f"BatchNorm2d: training needs more than one value per channel, got input shape "
                             f"{tuple(x.shape)} (N*H*W = {n}); use a batch of at least 2 or call .eval()")
        # xhat = centered * inv_std is never materialised: out = centered * (gamma * inv_std) + beta, and
        # backward folds inv_std into its constants.
        if stats is not None and (stats[0].shape != x.shape or stats[1].shape != (x.shape[1],)):
            raise ValueError(f"BatchNorm2d: stats must be (centered {tuple(x.shape)}, mean ({x.shape[1]},), var), "
                             f"got centered {tuple(stats[0].shape)} and mean {tuple(stats[1].shape)}")
        centered, mean, var = batch_statistics(x) if stats is None else stats
        # one sum over C values (a NaN/Inf anywhere in x reaches its channel's variance), where a host read is free:
        # on a GPU it would be one synchronisation per layer (Trainer's loss check catches the NaN there instead)
        if not launch_bound(var) and not is_finite(var):
            raise NonFiniteError(f"BatchNorm2d({self.num_features}): the batch statistics are not finite (the input "
                                 "holds NaN or Inf, or values too large for float32); running statistics left "
                                 "unchanged", layer=self)
        m = self.momentum                       # the variance's running average is of the unbiased one
        self.inv_std, self.scale = _train_statistics(mean, var, self.running_mean, self.running_var,
                                                     self.weight.data if self.affine else None, 1 - m, m,
                                                     m * n / (n - 1), self.eps)
        self.num_batches_tracked += 1
        self.x, self.centered, self.batch_stats = None, centered, True
        return centered, self.scale, self.bias.data if self.affine else xp.zeros_like(self.running_mean)

    def eval_affine(self):
        """``(inv_std, scale, shift)`` of the eval-mode map ``scale * x + shift`` (running statistics); no cache."""
        return _eval_affine(self.running_mean, self.running_var, self.weight.data if self.affine else None,
                            self.bias.data if self.affine else None, self.eps)

    def backward(self, dout, sums=None):
        """``sums``: as in ``backward_terms`` (the two per-channel sums, when the caller has them)."""
        scale, mean_d, k = self.backward_terms(dout, sums=sums)
        if k is None:
            # eval: statistics are constants, so dL/dx = dout * gamma / sqrt(var + eps)
            return dout * scale[:, None, None]
        # train: dL/dx = gamma/sigma * (dout - mean(dout) - xhat * mean(dout * xhat)), means over (N, H, W)
        return _batch_norm_dx(dout, self.centered, mean_d[:, None, None], k[:, None, None], scale[:, None, None])

    def backward_terms(self, dout, scaled: bool = False, sums=None):
        """Accumulate dL/dgamma and dL/dbeta; return per-channel ``(scale, mean_d, k)`` such that
        ``dL/dx = scale * (dout - mean_d - k * centered)`` in training (``mean_d = mean(dout)``,
        ``k = inv_std² · mean(dout · centered)``), and ``(scale, None, None)``, ``dL/dx = scale * dout``, in eval.

        For a caller that applies the terms itself: a dense block adds ``scale * dout`` at once and the
        ``centered`` terms, whose ``centered`` all its layers share, once per channel (``DenseBlock.backward``).
        ``scaled=True``: the caller passes ``scale * dout`` instead of ``dout`` (no zero in ``scale``): what it adds.
        ``sums``: ``(sum(dout), sum(dout * centered))`` per channel (of the unscaled dout), when the caller has them
        (a fused head gets the second from its weight gradient's GEMM, ``BNReLUConv1x1.norm_sums``).
        """
        self._need(self.inv_std)
        xp, inv_std, scale = get_array_module(dout), self.inv_std, self.scale    # as forward computed them
        n = dout.shape[0] * dout.shape[2] * dout.shape[3]
        # dL/dgamma = sum dout * xhat, with xhat = centered * inv_std ; dL/dbeta = sum dout (dout was given times
        # scale if scaled). The step's first gradients are written straight into the parameters' grad (grad_out).
        w_out = self.weight.grad_out() if self.affine else None
        b_out = self.bias.grad_out() if self.affine and sums is None else None    # given sums: copied in below
        if sums is not None:
            sum_d, sum_dc = sums
        else:
            # an eval forward kept x instead of the centred input: rebuilt here, only when the sums need it
            centered = self.centered if self.centered is not None else self.x - self.running_mean[:, None, None]
            sum_d, sum_dc = channel_sum(dout, out=None if scaled else b_out), channel_sum(dout, centered)
            if scaled:
                sum_d, sum_dc = xp.divide(sum_d, scale, out=b_out), sum_dc / scale
        if self.affine and b_out is None:
            self.bias.accumulate(sum_d)
        sum_dxhat = xp.multiply(sum_dc, inv_std, out=w_out)
        if self.affine and w_out is None:
            self.weight.accumulate(sum_dxhat)
        if not self.batch_stats:
            return scale, None, None
        return (scale, *_backward_means(sum_d, sum_dxhat, inv_std, float(n)))

    def _clear_cache(self):
        self.x = self.centered = self.inv_std = self.scale = None

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"


# The per-channel arithmetic of the layer, each one kernel on a GPU (backend.fuse; on NumPy the code as it reads)

@fuse
def _train_statistics(mean, var, running_mean, running_var, weight, keep, momentum, var_momentum, eps):
    """A training forward's per-channel work: the running averages updated in place (``running = (1 - m) * running
    + m * batch``; the variance's weight ``m·n/(n-1)`` makes it unbiased) and ``(inv_std, scale)``, inv_std =
    1 / sqrt(var + eps), scale = weight · inv_std (inv_std if weight is None).

    ``keep`` = 1 - m comes in computed: arithmetic between two Python numbers inside ``cupy.fuse`` is done in the
    smallest dtype that holds them (float16 for 0.9, which is 0.8999; measured on an H200), not in the arrays'."""
    running_mean *= keep
    running_mean += momentum * mean
    running_var *= keep
    running_var += var_momentum * var
    inv_std = 1.0 / get_array_module(var).sqrt(var + eps)
    return inv_std, inv_std if weight is None else inv_std * weight


@fuse
def _eval_affine(running_mean, running_var, weight, bias, eps):
    """``(inv_std, scale, shift)`` of eval's ``scale · x + shift`` (weight and bias None: 1 and 0)."""
    inv_std = 1.0 / get_array_module(running_var).sqrt(running_var + eps)
    scale = inv_std if weight is None else inv_std * weight
    return inv_std, scale, -(running_mean * scale) if bias is None else bias - running_mean * scale


@fuse
def _affine(src, scale, shift):
    """src · scale + shift (per channel: scale and shift (C, 1, 1))."""
    out = src * scale
    out += shift
    return out


@fuse
def _batch_norm_dx(dout, centered, mean_d, k, scale):
    """Training's dL/dx = scale · (dout - mean_d - k · centered) (per channel: mean_d, k, scale (C, 1, 1))."""
    dx = centered * k
    dx += mean_d
    get_array_module(dx).subtract(dout, dx, out=dx)
    dx *= scale
    return dx


@fuse
def _backward_means(sum_d, sum_dxhat, inv_std, n):
    """``(mean_d, k)`` = (sum(dout) / n, inv_std · sum(dout · xhat) / n) per channel, n values each."""
    return sum_d / n, inv_std * sum_dxhat / n
