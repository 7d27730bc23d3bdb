"""The textbook binary losses: BCE on logits and soft Dice, with the interface of ``minideeplab.losses``:
``value = loss(logits, target)`` (a 0-d array), ``dlogits = loss.backward(dout=1.0)``. Derivations:
docs/derivations.md, "Losses"."""
from __future__ import annotations

from ..backend import get_array_module
from ..nn.module import Module


def sigmoid(x):
    """1 / (1 + exp(-x)) with exp(-|x|), which never overflows and keeps its relative accuracy in both tails."""
    xp = get_array_module(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))


def softplus(x):
    """log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)), finite for any x; softplus(-x) = -log s(x)."""
    xp = get_array_module(x)
    return xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))


def _target(name, logits, target):
    xp = get_array_module(logits)
    t = xp.asarray(target, dtype=logits.dtype)
    if t.shape != logits.shape:
        raise ValueError(f"{name}: target must have the logits' shape {tuple(logits.shape)}, got {tuple(t.shape)}")
    return t


class BCEWithLogitsLoss(Module):
    """Binary cross-entropy on logits: ``l = -[p t log s(x) + (1 - t) log(1 - s(x))]`` = (1-t) softplus(x) +
    p t softplus(-x), each term finite and accurate for any logit (s = sigmoid, p = pos_weight).

    Shapes: logits (any, e.g. (N, 1, H, W)), target (same, {0, 1}) -> 0-d (mean, sum) or logits' shape (none).

    Args:
        pos_weight: weight p of the positive term (a number or an array that broadcasts to the logits); None = 1.
        reduction: "mean" (over all elements), "sum" or "none".
    """

    def __init__(self, pos_weight=None, reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"BCEWithLogitsLoss: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.pos_weight, self.reduction = pos_weight, reduction
        self.x = self.t = None   # the logits and target of the last forward

    def forward(self, logits, target):
        xp = get_array_module(logits)
        self.x, self.t = logits, _target("BCEWithLogitsLoss", logits, target)
        p = 1.0 if self.pos_weight is None else xp.asarray(self.pos_weight, dtype=logits.dtype)
        loss = (1 - self.t) * softplus(logits) + p * self.t * softplus(-logits)
        if self.reduction == "none":
            return loss
        return xp.asarray(loss.mean() if self.reduction == "mean" else loss.sum())

    def backward(self, dout=1.0):
        ### BEGIN SOLUTION
        ### HINT: differentiate l = (1-t) softplus(x) + p t softplus(-x) (softplus' = sigmoid, the module's stable one); the
        ### HINT: reduction 'mean' divides by the number of elements; multiply by dout (a number, or an array for 'none')
        xp = get_array_module(self.x)
        p = 1.0 if self.pos_weight is None else xp.asarray(self.pos_weight, dtype=self.x.dtype)
        # dl/dx = (1 - t) s(x) - p t s(-x)  (= s(x) - t for p = 1); "mean" divides by the number of elements
        grad = (1 - self.t) * sigmoid(self.x) - p * self.t * sigmoid(-self.x)
        return grad * (dout / self.x.size if self.reduction == "mean" else dout)
        ### END SOLUTION

    def extra_repr(self):
        return f"pos_weight={self.pos_weight!r}, reduction={self.reduction!r}"


class DiceLoss(Module):
    """Soft Dice loss on sigmoid probabilities: ``L = 1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)``.

    The sums run over the whole batch (one Dice over all pixels), or, with ``per_image=True``, over each image
    (all axes but the first), and ``1 - D_n`` is averaged over the batch. (``minideeplab.losses.DiceLoss``
    computes the same L rearranged as a sum of the wrong-class probabilities over the denominator, which keeps its
    relative accuracy near a perfect prediction, where ``1 - D`` rounds to 0.)

    Shapes: logits (N, ...), target (same, {0, 1}) -> 0-d.

    Args:
        smooth: additive smoothing s > 0 (both masks empty gives L = 0).
        per_image: one Dice per image, averaged, instead of one over the batch.
    """

    def __init__(self, smooth: float = 1.0, per_image: bool = False):
        super().__init__()
        if smooth <= 0:
            raise ValueError(f"DiceLoss: smooth must be > 0, got {smooth}")
        self.smooth, self.per_image = float(smooth), bool(per_image)
        self.p = self.t = self.num = self.den = None   # what backward needs

    def forward(self, logits, target):
        xp = get_array_module(logits)
        self.t = _target("DiceLoss", logits, target)
        axes = tuple(range(1, logits.ndim)) if self.per_image and logits.ndim > 1 else None
        self.p = sigmoid(logits)
        self.num = 2 * xp.sum(self.p * self.t, axis=axes, keepdims=True) + self.smooth
        self.den = xp.sum(self.p, axis=axes, keepdims=True) + xp.sum(self.t, axis=axes, keepdims=True) + self.smooth
        return xp.asarray(xp.mean(1 - self.num / self.den))

    def backward(self, dout=1.0):
        ### BEGIN SOLUTION
        ### HINT: L = 1 - num/den: num and den both depend on every p_i (the quotient rule), then dp/dx = p (1 - p);
        ### HINT: with per_image the loss is the mean over the N images
        n = self.p.shape[0] if self.per_image and self.p.ndim > 1 else 1    # images averaged over
        # dL/dx_i = -p_i (1 - p_i) (2 t_i den - num) / den^2 / n  (dnum/dp_i = 2 t_i, dden/dp_i = 1, dp/dx = p(1-p))
        return -self.p * (1 - self.p) * (2 * self.t * self.den - self.num) / (self.den ** 2 * n) * dout
        ### END SOLUTION

    def extra_repr(self):
        return f"smooth={self.smooth}, per_image={self.per_image}"
