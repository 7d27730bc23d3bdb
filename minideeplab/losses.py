"""Binary segmentation losses with hand-written backward: BCE, Dice, focal, hinge, squared hinge, sums.

Every loss is a ``Module``: ``value = loss(logits, target)`` returns a 0-d array on the logits' backend and
``dlogits = loss.backward(dout=1.0)`` returns dL/dlogits (``dout`` is never modified). Targets are binary
{0, 1} masks of exactly the logits' shape; anything else is a ValueError naming the loss.

Numerics: all probabilities come from ``_sigmoid`` below, which is accurate to a relative rounding error in
both tails (``tanh(x/2)/2 + 1/2`` is not: near 0 it returns ``1 - (1 - tiny)``), and every gradient is
written without the cancellation ``sigmoid(x) - 1`` (using ``sigmoid(x) - 1 = -sigmoid(-x)``), so losses
and gradients stay finite and relatively accurate for logits of +-1e4. Full derivations: docs/.
"""
from __future__ import annotations

import numpy as np

from .backend import can_read, get_array_module
from .nn.module import Module, ModuleList

REDUCTIONS = ("mean", "sum", "none")


def _sigmoid(x):
    """1 / (1 + exp(-x)) with relative accuracy everywhere: exp(-|x|) never overflows."""
    xp = get_array_module(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))


def _softplus(x):
    """log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)), finite for any x."""
    xp = get_array_module(x)
    return xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))


def _hparam(loss: str, name: str, value, low: float = -np.inf, high: float = np.inf, low_open: bool = False,
            note: str = "") -> float:
    """``value`` as a float when it is a finite real number in the range, else a ValueError/TypeError naming the
    loss, the hyper-parameter, the range and the value (a NaN would otherwise pass every ``<`` check)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{loss}: {name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not np.isfinite(v) or v < low or (low_open and v == low) or v > high:
        limits = [f"{'>' if low_open else '>='} {low:g}"] * (low > -np.inf) + [f"<= {high:g}"] * (high < np.inf)
        raise ValueError(f"{loss}: {name} must be {' and '.join(limits + ['finite'])}{note}, got {value!r}")
    return v


def _check_pair(name: str, logits, target):
    """Validate (logits, target) and return the target as a logits-dtype array on the logits' backend.

    The check that the target holds only 0 and 1 reads on the host: skipped where that is not allowed
    (``backend.can_read``: a step being captured as a CUDA graph)."""
    if not hasattr(logits, "dtype") or logits.dtype.kind != "f":
        raise TypeError(f"{name}: expected floating-point logits (float32 or float64), "
                        f"got {getattr(logits, 'dtype', type(logits).__name__)}")
    xp = get_array_module(logits)
    t = xp.asanyarray(target)
    if tuple(t.shape) != tuple(logits.shape):
        raise ValueError(f"{name}: target must have the logits' shape {tuple(logits.shape)}, "
                         f"got {tuple(t.shape)}")
    if t.dtype.kind not in "biuf":
        raise TypeError(f"{name}: target must be a numeric or boolean {{0, 1}} mask, got dtype {t.dtype}")
    if can_read(t):
        bad = (t != 0) & (t != 1)
        if bool(xp.any(bad)):
            example = t[bad].ravel()[0].item()
            raise ValueError(f"{name}: target must be a binary mask with values in {{0, 1}}, "
                             f"got {int(xp.count_nonzero(bad))} other value(s), e.g. {example!r}")
    return t.astype(logits.dtype, copy=False)


class _ElementwiseLoss(Module):
    """Shared machinery: subclasses return per-element loss and per-element dloss/dlogits; this class reduces.

    Shapes: logits (any), target (same) -> 0-d (mean, sum) or logits' shape (none).
    """

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"{type(self).__name__}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.grad_elems = None   # d(per-element loss)/dlogits, cached by forward

    def _elementwise(self, x, t):
        raise NotImplementedError

    def forward(self, logits, target):
        t = _check_pair(type(self).__name__, logits, target)
        xp = get_array_module(logits)
        loss, self.grad_elems = self._elementwise(logits, t)
        if self.reduction == "none":
            return loss
        return xp.asarray(xp.mean(loss) if self.reduction == "mean" else xp.sum(loss))

    def backward(self, dout=1.0):
        self._need(self.grad_elems)
        g = self.grad_elems
        xp = get_array_module(g)
        if not isinstance(dout, (int, float)):
            dout = xp.asarray(dout)
        # mean: dL/dx_i = dout * dl_i/dx_i / count; sum: no 1/count; none: dout has the logits' shape
        scale = 1.0 / g.size if self.reduction == "mean" else 1.0
        return (g * scale) * dout

    def _clear_cache(self):
        self.grad_elems = None

    def extra_repr(self):
        return f"reduction={self.reduction!r}"


class BCEWithLogitsLoss(_ElementwiseLoss):
    """Binary cross-entropy on logits, ``l = -[p*t*log s(x) + (1-t)*log(1-s(x))]`` with s = sigmoid.

    Computed as ``max(x,0) - x*t + log1p(exp(-|x|))`` (p = 1) or ``(1-t)*softplus(x) + p*t*softplus(-x)``:
    each term is relatively accurate for saturated logits; ``(1-t)*x + softplus(-x)`` would cancel to 0.
    Gradient ``dl/dx = (1-t)*s(x) - p*t*s(-x)`` (= s(x) - t for p = 1).

    Shapes: logits (any, e.g. (N, 1, H, W)), target (same) -> 0-d (mean/sum) or logits' shape (none).

    Args:
        pos_weight: weight p of the positive term, a scalar or an array that broadcasts to the logits as in
            PyTorch (for NCHW logits with C classes give shape (C, 1, 1)); None means 1. Converted once to the
            logits' library and dtype (``pos_weight_as``); assign a new one to change it.
        reduction: "mean" (over all elements), "sum" or "none".

    Textbook twin: ``minideeplab.textbook.BCEWithLogitsLoss``, the same loss written once as
    ``(1-t)*softplus(x) + p*t*softplus(-x)``. This one takes the shorter form when p = 1 (one softplus fewer), keeps
    the per-element gradient from forward, checks the target is a 0/1 mask and keeps ``pos_weight`` on the device:
    4.9 ms against 6.7 forward+backward on 2x1x256x256, one thread (benchmarks/textbook_layers.py).
    """

    def __init__(self, pos_weight=None, reduction: str = "mean"):
        super().__init__(reduction)
        self.pos_weight = pos_weight

    @property
    def pos_weight(self):
        return self._pos_weight

    @pos_weight.setter
    def pos_weight(self, value):
        if value is not None:
            try:
                pw = np.asarray(value, dtype=np.float64) if not hasattr(value, "shape") else value
            except (TypeError, ValueError):
                raise TypeError(f"BCEWithLogitsLoss: pos_weight must be a number or an array, got {value!r}") from None
            xp = get_array_module(pw)
            if pw.dtype.kind not in "iuf" or pw.size == 0:
                raise TypeError(f"BCEWithLogitsLoss: pos_weight must be a non-empty numeric array or a number, "
                                f"got dtype {pw.dtype}, size {pw.size}")
            bad = ~xp.isfinite(pw) | (pw < 0)
            if bool(bad.any()):
                raise ValueError(f"BCEWithLogitsLoss: pos_weight must be >= 0 and finite, got "
                                 f"{pw[bad].ravel()[0].item()!r}")
        self._pos_weight, self._pos_weight_as = value, None    # (the array made from it by pos_weight_as)

    def pos_weight_as(self, x):
        """``pos_weight`` as an array of ``x``'s library and dtype, made on the first call and kept (until a new
        ``pos_weight`` is set): not copied to the GPU at every step, which would cost a transfer, and which a step
        captured as a CUDA graph must not do (the graph would keep the address of a host buffer)."""
        xp, p = get_array_module(x), self._pos_weight_as
        if p is None or get_array_module(p) is not xp or p.dtype != x.dtype:
            p = self._pos_weight_as = xp.asarray(self.pos_weight, dtype=x.dtype)
        if p.ndim > x.ndim or any(a not in (1, b) for a, b in zip(p.shape[::-1], x.shape[::-1])):
            raise ValueError(f"BCEWithLogitsLoss: pos_weight of shape {tuple(p.shape)} does not broadcast to "
                             f"the logits' shape {tuple(x.shape)}")
        return p

    def _elementwise(self, x, t):
        xp = get_array_module(x)
        if self.pos_weight is None:
            loss = (xp.maximum(x, 0) - x * t) + xp.log1p(xp.exp(-xp.abs(x)))
            # dl/dx = s(x) - t, written as (1-t)*s(x) - t*s(-x) to avoid cancellation for saturated logits
            grad = (1 - t) * _sigmoid(x) - t * _sigmoid(-x)
            return loss, grad
        p = self.pos_weight_as(x)
        loss = (1 - t) * _softplus(x) + p * t * _softplus(-x)     # softplus(-x) = -log s(x)
        # dl/dx = (1-t) s(x) - p t s(-x)
        grad = (1 - t) * _sigmoid(x) - p * t * _sigmoid(-x)
        return loss, grad

    def extra_repr(self):
        pw = "" if self.pos_weight is None else f"pos_weight={self.pos_weight!r}, "
        return pw + super().extra_repr()


class FocalLoss(_ElementwiseLoss):
    """Sigmoid focal loss (Lin et al., RetinaNet; torchvision.ops.sigmoid_focal_loss), mean by default.

    With z = x for t=0 and z = -x for t=1 (so q = s(z) = 1 - p_t is the probability of the wrong class):
    ``l = a_t * q**gamma * softplus(z)`` where softplus(z) is the BCE term and a_t = alpha*t + (1-alpha)*(1-t);
    gradient ``dl/dx = (1-2t) * a_t * q**gamma * (gamma*(1-q)*softplus(z) + q)`` (no negative powers of q,
    so gamma < 1 and saturated logits stay finite).

    Shapes: logits (any), target (same) -> 0-d (mean/sum) or logits' shape (none).

    Args:
        alpha: weight of the positive class in [0, 1]; None or a negative value disables the weighting
            (as torchvision does for alpha < 0).
        gamma: focusing exponent >= 0 (gamma=0 and alpha=None give plain BCE).
        reduction: "mean", "sum" or "none".
    """

    def __init__(self, alpha: float | None = 0.25, gamma: float = 2.0, reduction: str = "mean"):
        super().__init__(reduction)
        if alpha is not None:
            alpha = _hparam("FocalLoss", "alpha", alpha, high=1.0, note=" (None or a negative value disables it)")
        self.alpha = None if alpha is None or alpha < 0 else alpha
        self.gamma = _hparam("FocalLoss", "gamma", gamma, low=0.0)

    def _elementwise(self, x, t):
        sign = 1 - 2 * t                    # +1 for background, -1 for foreground
        z = sign * x
        q = _sigmoid(z)                     # 1 - p_t, accurate even when tiny
        ce = _softplus(z)                   # BCE of the element
        qg = q ** self.gamma
        a_t = 1.0 if self.alpha is None else self.alpha * t + (1 - self.alpha) * (1 - t)
        loss = a_t * qg * ce
        # dl/dz = a_t [gamma q^(gamma-1) q(1-q) ce + q^gamma q];  dl/dx = sign * dl/dz
        grad = sign * a_t * qg * (self.gamma * _sigmoid(-z) * ce + q)
        return loss, grad

    def extra_repr(self):
        return f"alpha={self.alpha}, gamma={self.gamma}, " + super().extra_repr()


class HingeLoss(_ElementwiseLoss):
    """Hinge loss ``l = max(0, 1 - y*x)`` with y = 2t - 1 in {-1, +1}, mean by default.

    Subgradient ``dl/dx = -y`` where ``y*x < 1`` and 0 elsewhere, including the kink ``y*x = 1`` (a margin
    exactly met counts as satisfied, as ReLU's gradient at 0 is 0).

    Shapes: logits (any), target (same) -> 0-d (mean/sum) or logits' shape (none).
    """

    def _elementwise(self, x, t):
        xp = get_array_module(x)
        y = 2 * t - 1
        margin = 1 - y * x
        # dl/dx = -y on the active side (margin > 0), 0 otherwise
        return xp.maximum(margin, 0), -y * (margin > 0)


class SquaredHingeLoss(_ElementwiseLoss):
    """Squared hinge ``l = max(0, 1 - y*x)**2`` with y = 2t - 1; differentiable: ``dl/dx = -2y*max(0, 1-y*x)``.

    Shapes: logits (any), target (same) -> 0-d (mean/sum) or logits' shape (none).
    """

    def _elementwise(self, x, t):
        xp = get_array_module(x)
        y = 2 * t - 1
        active = xp.maximum(1 - y * x, 0)
        # dl/dx = 2 max(0, 1-yx) * (-y)
        return active * active, -2 * y * active


class DiceLoss(Module):
    """Soft Dice loss on sigmoid probabilities: ``L = 1 - (2*sum(p*t) + s) / (sum(p) + sum(t) + s)``.

    By default the sums run over the whole batch (one Dice over all pixels of all images, as most
    segmentation code does, so images without foreground do not dominate); ``per_image=True`` computes one
    Dice per image (sums over all axes but the first) and averages ``1 - D_n`` over the batch.
    Computed as ``L = A / den`` with ``A = sum(p + t - 2pt) = sum(q)``, q = s(+-x) the probability of the
    wrong class, and den = sum(p) + sum(t) + s: exact algebra, but relatively accurate near a perfect
    prediction where ``1 - D`` would round to 0. Gradient, with sign = 1 - 2t:
    ``dL/dx_i = p_i*(1 - p_i) * (sign_i*den - A) / den**2`` (divided by N when per image).

    Shapes: logits (N, ...), target (same) -> 0-d.

    Args:
        smooth: additive smoothing s > 0 (keeps the loss defined for empty masks: both empty gives L = 0).
        per_image: average per-image Dice losses instead of one batch-global Dice.

    Textbook twin: ``minideeplab.textbook.DiceLoss``, ``1 - (2*sum(p*t) + s) / (sum(p) + sum(t) + s)`` as written.
    This one is not faster: it pays for its accuracy near a perfect prediction (the wrong-class probabilities from
    their own sigmoids, the target check) with 4.0 ms against the textbook's 1.6 forward+backward on 2x1x256x256,
    one thread (benchmarks/textbook_layers.py).
    """

    def __init__(self, smooth: float = 1.0, per_image: bool = False):
        super().__init__()
        self.smooth = _hparam("DiceLoss", "smooth", smooth, low=0.0, low_open=True)
        self.per_image = bool(per_image)
        self.cache = None   # (p(1-p), sign, A, den): what backward needs

    def forward(self, logits, target):
        t = _check_pair("DiceLoss", logits, target)
        xp = get_array_module(logits)
        axes = tuple(range(1, logits.ndim)) if self.per_image and logits.ndim > 1 else None
        keep = axes is not None
        sign = 1 - 2 * t
        q = _sigmoid(sign * logits)                               # p where t = 0, 1 - p where t = 1
        wrong = xp.sum(q, axis=axes, keepdims=keep)               # A = den - num
        den = xp.sum(_sigmoid(logits), axis=axes, keepdims=keep) + xp.sum(t, axis=axes, keepdims=keep) \
            + self.smooth
        self.cache = (q * _sigmoid(-sign * logits), sign, wrong, den)
        return xp.asarray(xp.mean(wrong / den))

    def backward(self, dout=1.0):
        self._need(self.cache)
        pq, sign, wrong, den = self.cache
        xp = get_array_module(pq)
        if not isinstance(dout, (int, float)):
            dout = xp.asarray(dout)
        n = pq.shape[0] if self.per_image and pq.ndim > 1 else 1
        # dA/dx_i = sign_i p_i(1-p_i), dden/dx_i = p_i(1-p_i):  dL/dx_i = p_i(1-p_i)(sign_i den - A) / den^2 / n
        return (pq * (sign * den - wrong) / (den * den * n)) * dout

    def _clear_cache(self):
        self.cache = None

    def extra_repr(self):
        return f"smooth={self.smooth}, per_image={self.per_image}"


class CombinedLoss(Module):
    """Weighted sum ``L = sum_k w_k * L_k(logits, target)``, e.g. BCE + Dice.

    Shapes: logits (any), target (same) -> 0-d.

    Args:
        terms: list of ``(weight, loss_module)`` pairs.
    """

    def __init__(self, terms):
        super().__init__()
        terms = list(terms)
        if not terms or not all(isinstance(w, (int, float, np.number)) and isinstance(m, Module) for w, m in terms):
            raise ValueError("CombinedLoss: expected a non-empty list of (weight, loss module) pairs, "
                             f"got {terms!r}")
        self.weights = [_hparam("CombinedLoss", f"weight {i}", w) for i, (w, _) in enumerate(terms)]
        self.losses = ModuleList([m for _, m in terms])
        self.last_values = None   # the unweighted value of each term from the last forward (for logging)

    def forward(self, logits, target):
        self.last_values = [loss(logits, target) for loss in self.losses]
        total = sum(w * v for w, v in zip(self.weights, self.last_values))
        return get_array_module(logits).asarray(total)

    def backward(self, dout=1.0):
        self._need(self.last_values)
        # the logits fan out to every term, so their gradients add: dL/dx = sum_k w_k dL_k/dx
        grad = None
        for w, loss in zip(self.weights, self.losses):
            g = loss.backward(dout) * w
            grad = g if grad is None else grad + g
        return grad

    def _clear_cache(self):
        self.last_values = None

    def extra_repr(self):
        return f"weights={self.weights}"


LOSSES = {
    "bce": BCEWithLogitsLoss,
    "dice": DiceLoss,
    "focal": FocalLoss,
    "hinge": HingeLoss,
    "squared_hinge": SquaredHingeLoss,
}


def build_loss(name: str, **kwargs) -> Module:
    """A loss by name: "bce", "dice", "focal", "hinge", "squared_hinge", or a sum such as "bce+dice"
    (each term weighted 1). ``kwargs`` go to a single loss's constructor."""
    parts = [p.strip() for p in str(name).lower().split("+")]
    unknown = [p for p in parts if p not in LOSSES]
    if unknown or not parts:
        raise ValueError(f"unknown loss {name!r}; choose from {sorted(LOSSES)} or a sum like 'bce+dice'")
    if len(parts) == 1:
        return LOSSES[parts[0]](**kwargs)
    if kwargs:
        raise ValueError(f"build_loss: keyword options are only supported for a single loss, not {name!r}")
    return CombinedLoss([(1.0, LOSSES[p]()) for p in parts])


__all__ = ["LOSSES", "BCEWithLogitsLoss", "CombinedLoss", "DiceLoss", "FocalLoss", "HingeLoss",
           "SquaredHingeLoss", "build_loss"]
