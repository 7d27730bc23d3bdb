"""BatchNorm2d → ReLU → 1×1 Conv2d in one elementwise pass and one GEMM (DenseNet's bottlenecks and transitions).

Run layer by layer, the three cost three full passes over the input after the batch norm's statistics
(``x * scale``, ``+ shift``, ``max(., 0)``) plus, in training, a fourth for ReLU's mask. But a batch norm is a
per-channel affine map ``s·x + b`` (``s = gamma / sigma``, ``b = beta - s·mean``), and for ``s > 0``

    relu(s·x + b) = s·max(x, -b/s) + b          (for s < 0: s·min(x, -b/s) + b)

so, with ``z = clip(x, lo, hi)`` per channel and a channel of ones appended to it, the 1×1 conv of the ReLU's
output is ONE GEMM:

    W · relu(s·x + b) = (W·diag(s)) · z + W·b = [W·diag(s) | W·b] · [z; 1]

one clip pass over the input, and the ReLU's output is never built. In eval mode a batch norm that follows the
conv (DenseLayer's norm2) is an affine map too, ``s2·y + b2``: it is folded into the same GEMM (rows scaled by
s2, b2 added to the ones column), which saves its two passes as well.
Backward differentiates the same layers: ``dL/dW = dout · (s·z + b)^T`` (the ones channel gives the ``b`` part),
ReLU's mask is ``lo < z < hi``, and the batch norms' own backwards take it from there (a folded norm2 gets back
the conv output it needs by one more GEMM). A channel with ``s = 0``, or whose bound overflows, is constant
(``relu(b)``): it passes all or nothing. Derivation and measurements: docs/derivations.md.

Shapes: x: (N, C, H, W) -> out: (N, F, H, W).
"""
from __future__ import annotations

import numpy as np

from ..backend import can_read, fuse, get_array_module, matmul
from .functional import channel_sum


def relu_of_affine(src, scale, shift, out=None):
    """``(z, lo, hi, shift, blocked)`` with ``relu(src * scale + shift) == z * scale + shift`` per channel,
    z = clip(src, lo, hi).

    One pass: ``max(src, lo)`` when every scale is positive (``hi`` is then None: no upper bound), else ``clip``.
    Telling the two apart reads the scales on the host; where that is not allowed (``backend.can_read``: a step
    being captured as a CUDA graph) it always takes ``clip`` (and ReLU's mask then compares with both bounds). The
    per-channel work of each case is one small function (one kernel each on a GPU). A
    constant channel (scale 0, or a bound ``-shift/scale`` that overflows) is ``relu(shift)``: where ``shift > 0``
    it passes everything (z = src; its bounds are then infinite whatever the sign of the scale), elsewhere nothing
    (lo = hi = 0, z = 0, shift 0). ReLU's mask is ``lo < z < hi``; ``blocked`` is the value z takes where the
    mask is False (the bound; 0 for a constant channel).

    Shapes: src: (N, C, H, W); scale, shift: (C,) -> z like src (written into ``out`` if given); lo, hi, shift,
    blocked: (C,).
    """
    xp = get_array_module(src)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        bound, usual = _relu_bound(scale, shift)
        if can_read(scale) and bool(usual.all()):    # the usual case: no upper bound, nothing more to compute
            return xp.maximum(src, bound[:, None, None], out=out), bound, None, shift, bound
        lo, hi, shift, blocked = _clip_bounds(scale, shift, bound, np.inf, -np.inf)
    return xp.clip(src, lo[:, None, None], hi[:, None, None], out=out), lo, hi, shift, blocked


@fuse
def _relu_bound(scale, shift):
    """``(bound, usual)``: the bound -shift/scale of ``relu_of_affine`` and whether it is the usual case (scale > 0,
    bound finite), per channel."""
    bound = -shift / scale
    return bound, get_array_module(bound).isfinite(bound) & (scale > 0)


@fuse
def _clip_bounds(scale, shift, bound, inf, minus_inf):
    """``(lo, hi, shift, blocked)`` of ``relu_of_affine``'s general case (inf and -inf come in as numbers: a
    constant made here would be float64 and widen the results)."""
    xp = get_array_module(bound)
    constant = ~xp.isfinite(bound)
    lo = xp.where(scale > 0, bound, minus_inf)         # overflowed bounds are -inf or +inf here, nan for 0/0
    hi = xp.where(scale < 0, bound, inf)
    off = constant & (shift <= 0)                      # constant channels that pass nothing
    return xp.where(off, 0, lo), xp.where(off, 0, hi), xp.where(off, 0, shift), xp.where(constant, 0, bound)


class BNReLUConv1x1:
    """Runs a ``BatchNorm2d``, a ``ReLU`` and a bias-free, stride-1 1×1 ``Conv2d`` as one (see the module doc).

    Not a Module: it owns no parameters; it computes with ``norm``'s and ``conv``'s (and ``post``'s) and adds into
    their ``.grad``; the batch norms keep their own caches (their ``backward`` is called as is). Used by
    ``DenseLayer`` (``post`` = norm2, folded in eval mode) and ``Transition``.

    Textbook twin: the three textbook layers one after the other, ``minideeplab.textbook.BatchNorm2d`` ->
    ``textbook.ReLU`` -> ``textbook.Conv2d`` (1x1), as in ``textbook.Transition`` and ``textbook.DenseLayer``. This
    runs them as one clip pass and one GEMM and never builds the batch norm's or the ReLU's output; with the
    other fast layers, transition 1 (256->128 at 64x64 with its pool) trains in 37 ms against the textbook's 61,
    forward+backward, one thread (benchmarks/textbook_layers.py).

    Shapes: x: (N, C, H, W) -> out: (N, F, H, W).
    """

    def __init__(self, norm, conv, post=None):
        if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.padding != (0, 0) or conv.bias is not None:
            raise ValueError(f"BNReLUConv1x1: needs a bias-free 1x1 conv with stride 1 and no padding, got {conv!r}")
        if norm.num_features != conv.in_channels or (post is not None and post.num_features != conv.out_channels):
            raise ValueError(f"BNReLUConv1x1: channels do not chain: norm has {norm.num_features}, conv "
                             f"{conv.in_channels} -> {conv.out_channels}, post {post.num_features if post else None}")
        self.norm, self.conv, self.post = norm, conv, post
        self.z1 = self.mask = self.lo = self.hi = self.blocked = self.scale = self.shift = None
        self.folded = self.w_scaled = None
        self.dout_z = None   # sum_n dout_n · [z; 1]_n^T (F, C + 1) of the last backward: gives norm_sums for free

    def forward(self, x, stats=None):
        """``stats``: as in ``BatchNorm2d.forward`` (batch statistics of ``x`` computed by the caller).

        Returns the conv's output, or, when ``post`` is in eval mode, ``post``'s output: an eval batch norm is a
        per-channel affine map as well, folded into the GEMM (``self.folded``)."""
        xp = get_array_module(x)
        N, C, H, W = x.shape
        # computed in locals, cached on self at the end: no_grad threads may run this head at once (nn.threads)
        src, scale, shift = self.norm.affine_map(x, stats)
        # z gets one extra channel of ones, so that the GEMM adds W·b itself: [W·diag(s) | W·b] · [z; 1]
        z1 = xp.empty((N, C + 1, H, W), dtype=x.dtype)
        z1[:, C] = 1
        _, lo, hi, shift, blocked = relu_of_affine(src, scale, shift, out=z1[:, :C])
        w1 = self._weight_with_shift(scale, shift)
        folded = self.folds()
        if folded:                            # post(y) = s2·y + b2: scale w1's rows, add b2 to the ones column
            _, s2, b2 = self.post.eval_affine()
            w1 *= s2[:, None]
            w1[:, C] += b2
        self.z1, self.scale, self.lo, self.hi, self.shift, self.blocked = z1, scale, lo, hi, shift, blocked
        self.folded = folded
        self.w_scaled = None if folded else w1[:, :C]    # W·diag(s), for a scaled backward
        self.mask = self.passed() if self.norm.training else None   # else only if backward asks
        return matmul(w1, z1.reshape(N, C + 1, H * W)).reshape(N, -1, H, W)

    def folds(self) -> bool:
        """Whether forward folds ``post`` into its GEMM (an eval-mode batch norm is a per-channel affine map)."""
        return self.post is not None and not self.post.training

    def backward(self, dout):
        g = self.grad_at_norm_output(dout)
        return self.norm.backward(g, self.norm_sums(g))

    def grad_at_norm_output(self, dout, scaled: bool = False):
        """dL/d(norm's output): everything backward does before the batch norm's own backward. ``scaled``: times
        the batch norm's scale s, for free (the GEMM uses W·diag(s) instead of W)."""
        if self.z1 is None:
            raise RuntimeError("BNReLUConv1x1.backward called before forward (run forward first)")
        N, F, H, W = dout.shape
        C = self.z1.shape[1] - 1
        z1 = self.z1.reshape(N, C + 1, H * W)
        if self.folded:   # through post first: rebuild the conv output it normalised (one GEMM), then its backward
            if self.post.training:
                raise RuntimeError("BNReLUConv1x1.backward: the folded batch norm was switched to training mode "
                                   "after forward; run forward again in the mode backward should see")
            self.post.affine_map(matmul(self._weight_with_shift(self.scale, self.shift), z1).reshape(N, F, H, W))
            dout = self.post.backward(dout)
        d2 = dout.reshape(N, F, H * W)
        w = self.conv.weight.data.reshape(F, C)
        # dL/dW = sum_n dout_n · (z_n·s + b)^T = (sum_n dout_n · z_n^T)·s + (sum of dout) ⊗ b, and the sum of dout
        # is the column the ones channel adds to sum_n dout_n · [z; 1]_n^T
        g = self.dout_z = matmul(d2, z1.transpose(0, 2, 1)).sum(axis=0)
        out = self.conv.weight.grad_out((F, C))      # the step's first gradient goes straight into grad
        dw = _weight_grad(g[:, :C], g[:, C:], self.scale, self.shift, out)
        if out is None:
            self.conv.weight.accumulate(dw.reshape(self.conv.weight.shape))
        # dL/d(bn output) = (W^T · dout) where the ReLU passed its input (lo < z < hi), else 0
        if scaled:   # W·diag(s) from forward, unless norm2 was folded into that GEMM's weight
            w = self.w_scaled if self.w_scaled is not None else w * self.scale
        dbn = matmul(w.T, d2).reshape(N, C, H, W)
        dbn *= self.mask if self.mask is not None else self.passed()
        return dbn

    def norm_sums(self, g, scaled: bool = False):
        """``(sum(g), sum(g · centered))`` per channel: the two sums the batch norm's backward needs, for g =
        dL/d(norm output) of the last backward (given times the norm's scale s if ``scaled``). The second costs no
        pass over g: the weight gradient's GEMM has it already (``centered``: x minus the batch mean in training,
        minus the running mean in eval).

        With h = W^T · dout, g = h where the ReLU passed (z = src there) and 0 where it blocked (z = v there, one
        value per channel: lo, hi, or 0 for a constant channel), so sum(g·src) = sum(h·z) - v·(sum(h) - sum(g)), and
        sum_p h·z = sum_f W[f, c] · (dout · z^T)[f, c], sum_p h = W^T · (dout summed over pixels): columns of
        ``dout_z``. src is what forward clipped into z: centered in training, x in eval.
        Shapes: g: (N, C, H, W) -> (C,), (C,).
        """
        if self.dout_z is None:
            raise RuntimeError("BNReLUConv1x1.norm_sums needs a backward first")
        sum_g = channel_sum(g) / self.scale if scaled else channel_sum(g)
        C = self.dout_z.shape[1] - 1
        w = self.conv.weight.data.reshape(-1, C)
        sum_hz = (w * self.dout_z[:, :C]).sum(axis=0)
        sum_h = matmul(self.dout_z[:, C], w)
        sum_gc = _blocked_correction(sum_hz, self.blocked, sum_h, sum_g)
        if not self.norm.batch_stats:        # eval: src = x, centered = x - running mean
            sum_gc = sum_gc - self.norm.running_mean * sum_g
        return sum_g, sum_gc

    def _weight_with_shift(self, scale, shift):
        """[W·diag(s) | W·b]: (F, C + 1)."""
        w = self.conv.weight.data.reshape(self.conv.out_channels, -1)
        xp, C = get_array_module(w), w.shape[1]
        w1 = xp.empty((w.shape[0], C + 1), dtype=w.dtype)
        xp.multiply(w, scale, out=w1[:, :C])
        w1[:, C] = matmul(w, shift)
        return w1

    def passed(self):
        """ReLU's mask ``s·x + b > 0``, read from z: (N, C, H, W) booleans."""
        z = self.z1[:, :-1]
        if self.hi is None:
            return z > self.lo[:, None, None]
        return (z > self.lo[:, None, None]) & (z < self.hi[:, None, None])

    def clear_cache(self):
        self.z1 = self.mask = self.lo = self.hi = self.blocked = self.scale = self.shift = None
        self.folded = self.w_scaled = None
        self.dout_z = None


@fuse
def _blocked_correction(sum_hz, blocked, sum_h, sum_g):
    """sum(g · src) = sum(h · z) - v · (sum(h) - sum(g)) per channel (``BNReLUConv1x1.norm_sums``)."""
    return sum_hz - blocked * (sum_h - sum_g)


@fuse
def _weight_grad(g_z, g_ones, scale, shift, out):
    """dL/dW = (sum_n dout_n · z_n^T)·s + (sum of dout) ⊗ b (g_ones: the ones channel's column, (F, 1)), written
    into ``out`` if it is an array, else returned."""
    dw = g_z * scale + g_ones * shift
    if out is None:
        return dw
    out[...] = dw
