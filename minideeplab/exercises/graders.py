"""One function per exercise: the cases it runs on the student's code and the probes that name a mistake.

Each gets a ``grading.Grader`` ``g``; ``g.module("conv")`` is the workspace's ``textbook/conv.py``. The reference
values come from the package's fast layers; where the student's code calls helpers that are other exercises
(``col2im`` inside ``MaxPool2d.backward``, the ``DenseLayer`` inside a ``DenseBlock``), ``g.patched`` hands it the
solution's for the duration, so each exercise fails for its own regions only. Shapes are small: the whole check
takes seconds.
"""
from __future__ import annotations

import numpy as np

from .. import losses, nn
from .. import textbook as solution
from ..models import aspp as fast_aspp
from ..models import densenet as fast_densenet
from ..nn import functional as F
from .grading import Flag, close

F64 = np.float64
COMPOSITE_FD = dict(samples=4, full_limit=8)   # central differences on a sample of each tensor (all entries: vs the reference)


def _away_from_zero(rng, shape, low=-3.0, high=3.0):
    """Distinct values with gaps (no kink of ReLU or max pooling within a finite-difference step)."""
    values = np.linspace(low, high, int(np.prod(shape)) + 1)
    values = values[np.abs(values) > 0.02]
    return rng.permutation(values)[:int(np.prod(shape))].reshape(shape)


def _random_bn(m, rng):
    m.weight.data[...] = rng.uniform(0.5, 1.5, m.weight.shape)
    m.bias.data[...] = rng.normal(0, 0.5, m.bias.shape)
    m.running_mean[...] = rng.normal(0, 0.5, m.running_mean.shape)
    m.running_var[...] = rng.uniform(0.5, 2.0, m.running_var.shape)
    return m


def _random_norms(module, rng):
    for m in module.modules():
        if hasattr(m, "running_var") and getattr(m, "weight", None) is not None:
            _random_bn(m, rng)
    return module


# -- week 1 ---------------------------------------------------------------------------------------------------
def relu(g):
    act = g.module("activation")
    x = _away_from_zero(g.rng, (2, 3, 4, 5))
    case = g.layer_case("", act.ReLU(), nn.ReLU(), x)
    if not g.ok:
        dx, dout = case["student"]["dx"], case["dout"]
        if np.shape(dx) == x.shape and close(dx, dout * (x <= 0)):
            g.suggest("dx is dout where x <= 0: the mask is inverted; the gradient passes where the input was positive")


def sigmoid(g):
    act = g.module("activation")
    x = g.rng.standard_normal((2, 3, 4, 5)) * 3
    case = g.layer_case("", act.Sigmoid(), nn.Sigmoid(), x)
    g.layer_case("saturated", act.Sigmoid(), nn.Sigmoid(), np.linspace(-60, 60, 40).reshape(2, 2, 2, 5), fd=False)
    if not g.ok:
        s, dout, dx = case["reference"]["out"], case["dout"], case["student"]["dx"]
        if close(dx, dout * s) or close(dx, dout * (1 - s)):
            g.suggest("dx is dout * s (or dout * (1 - s)): the sigmoid's derivative is s * (1 - s), both factors")
        out = np.asarray(case["student"]["out"])
        if out.shape == s.shape and not np.all(np.isfinite(out)):
            g.suggest("the forward gives NaN or inf for large |x|: 1 / (1 + exp(-x)) overflows; use the form in the "
                      "class docstring")


IM2COL_CASES = [   # kernel_size, stride, padding, dilation, input shape
    (3, 1, 1, 1, (2, 3, 6, 5)), (3, 2, 2, 2, (2, 2, 9, 8)), ((3, 2), (2, 1), (2, 1), (2, 3), (1, 2, 8, 7)),
    (1, 1, 0, 1, (2, 4, 3, 3)),
]


def _geometry(case):
    """(im2col's keyword arguments, the input shape, a label such as 'k3 s2 p2 d2')."""
    k, s, p, d, shape = case
    label = " ".join(n + ("x".join(map(str, v)) if isinstance(v, tuple) else str(v)) for n, v in zip("kspd", (k, s, p, d)))
    return dict(kernel_size=k, stride=s, padding=p, dilation=d), shape, label


def _linear_pair(forward, adjoint, args):
    """``x -> (forward(x), vjp)`` with ``vjp(c) = adjoint(c)``, for ``check_function``."""
    return lambda x: (forward(x, **args), lambda c: adjoint(c, x.shape, **args))


def im2col(g):
    conv = g.module("conv")
    for case in IM2COL_CASES:
        args, shape, label = _geometry(case)
        x = g.rng.standard_normal(shape)
        cols, ref = conv.im2col(x, **args), F.im2col(x, **args)
        if np.shape(cols) != ref.shape:
            raise Flag(f"im2col({label}) returned shape {np.shape(cols)}, expected (N, C*kh*kw, Ho*Wo) = {ref.shape} "
                       f"with Ho = (H + 2p - d(k-1) - 1) // s + 1")
        g.compare(f"cols ({label})", cols, ref)
        g.fd_function(f"cols ({label})", _linear_pair(conv.im2col, F.col2im, args), x)
        if not close(cols, ref) and close(np.sort(cols, axis=1), np.sort(ref, axis=1)):
            g.suggest(f"im2col({label}): each column holds the right pixels in the wrong order; rows are ordered "
                      f"(c, i, j), like weight.reshape(F, C*kh*kw)")


def col2im(g):
    conv = g.module("conv")
    for case in IM2COL_CASES:
        args, shape, label = _geometry(case)
        x = g.rng.standard_normal(shape)
        c = g.rng.standard_normal(F.im2col(x, **args).shape)
        g.compare(f"dx ({label})", conv.col2im(c, x.shape, **args), F.col2im(c, x.shape, **args))
        g.fd_function(f"dx ({label})", _linear_pair(F.im2col, conv.col2im, args), x)
    if not g.ok:   # the overlap probe: 3x3 windows at stride 1 read the centre of a 5x5 map 9 times
        ones = np.ones((1, 1, 5, 5))
        ref = F.col2im(F.im2col(ones, 3, 1, 1), ones.shape, 3, 1, 1)
        mine = np.asarray(conv.col2im(F.im2col(ones, 3, 1, 1), ones.shape, 3, 1, 1))
        if mine.shape == ref.shape and mine.max() <= 1 + 1e-12 < ref.max():
            g.suggest(f"dL/dx is off by up to a factor of the kernel area (9) where windows overlap: col2im of all-"
                      f"ones columns (3x3, stride 1, padding 1) gives {mine.max():g} at the centre instead of "
                      f"{ref.max():g}. Did col2im add overlapping windows (+=) or overwrite them (=)?")


CONV_CASES = [   # C, F, kernel_size, stride, padding, dilation, bias, input shape
    (3, 4, 3, 1, 1, 1, True, (2, 3, 6, 5)), (2, 3, 3, 2, 2, 2, True, (2, 2, 9, 8)),
    (4, 3, 1, 1, 0, 1, False, (2, 4, 3, 3)), (2, 2, (3, 5), (1, 2), (0, 2), (2, 1), True, (1, 2, 9, 8)),
]


def conv_backward(g):
    conv = g.module("conv")
    with g.patched(conv, im2col=solution.im2col, col2im=solution.col2im):
        flipped = []
        for i, (C, Fo, k, s, p, d, bias, shape) in enumerate(CONV_CASES):
            label = _geometry((k, s, p, d, shape))[2]
            mine = conv.Conv2d(C, Fo, k, s, p, d, bias=bias, rng=np.random.default_rng(i), dtype=F64)
            ref = nn.Conv2d(C, Fo, k, s, p, d, bias=bias, rng=np.random.default_rng(i), dtype=F64)
            kh, kw = ref.kernel_size
            g.factors = {"the kernel area kh*kw": kh * kw, "the batch size": shape[0]}
            x = g.rng.standard_normal(shape)
            case = g.layer_case(label, mine, ref, x)
            if (kh, kw) != (1, 1):   # the probe: the gradient of a convolution whose kernel is rotated 180 degrees
                rot = nn.Conv2d(C, Fo, k, s, p, d, bias=bias, dtype=F64)
                rot.weight.data[...] = ref.weight.data[:, :, ::-1, ::-1]
                rot(x)
                flipped.append(close(case["student"]["dx"], rot.backward(case["dout"])))
    if not g.ok and any(flipped):
        g.suggest("dx is the gradient of a convolution with the kernel flipped (rotated 180 degrees): in the im2col "
                  "form dL/dx = col2im(W2^T @ dout) uses W as it is; the flip only appears when the backward is written "
                  "as a 'full' convolution of dout")


def batchnorm_backward(g):
    norm = g.module("norm")
    x = g.rng.standard_normal((3, 3, 4, 5)) * 2 + 1
    g.factors = {"n = N*H*W values per channel": 3 * 4 * 5}
    mine = _random_bn(norm.BatchNorm2d(3, dtype=F64), g.rng)
    train = g.layer_case("train", mine, nn.BatchNorm2d(3, dtype=F64), x)
    mine_eval = _random_bn(norm.BatchNorm2d(3, dtype=F64), g.rng).eval()
    g.layer_case("eval", mine_eval, nn.BatchNorm2d(3, dtype=F64), x[:2])
    g.layer_case("no affine", norm.BatchNorm2d(2, affine=False, dtype=F64), nn.BatchNorm2d(2, affine=False, dtype=F64),
                 g.rng.standard_normal((2, 2, 3, 3)))
    if g.ok:
        return
    dx = np.asarray(train["student"]["dx"])
    if dx.shape == x.shape and np.all(np.isfinite(dx)):
        per_channel = np.abs(dx.sum(axis=(0, 2, 3))) / np.abs(dx).sum(axis=(0, 2, 3)).clip(1e-300)
        centred = x - x.mean(axis=(0, 2, 3), keepdims=True)
        scale = np.abs((dx * centred).sum(axis=(0, 2, 3))) / np.abs(dx * centred).sum(axis=(0, 2, 3)).clip(1e-300)
        if per_channel.max() > 1e-8:
            g.suggest(f"in training mode dx must sum to 0 over each channel (adding a constant to a channel's inputs "
                      f"does not change its output), yours sums to {per_channel.max():.2g} of its magnitude: the "
                      f"gradient through the batch mean (dmean / n) is missing or wrong")
        elif scale.max() > 1e-3:
            g.suggest("in training mode sum(dx * (x - mean)) over each channel must be ~0 (scaling a channel's "
                      "inputs hardly changes its output); yours is not: the gradient through the batch variance "
                      "(dvar) is missing or wrong")
    rows = g.rows
    if all(not r.failed for t, r in rows.items() if "(train)" in t) and any(r.failed for t, r in rows.items()
                                                                         if "(eval)" in t):
        g.suggest("training mode passes, eval mode fails: in eval mode the mean and variance are the running "
                  "estimates, constants, so dx = dout * gamma / sqrt(running_var + eps) only")


def maxpool_backward(g):
    pool = g.module("pool")
    with g.patched(pool, im2col=solution.im2col, col2im=solution.col2im):
        g.layer_case("k3 s2 p1", pool.MaxPool2d(3, 2, 1), nn.MaxPool2d(3, 2, 1), _away_from_zero(g.rng, (2, 2, 7, 6)))
        g.layer_case("k2", pool.MaxPool2d(2), nn.MaxPool2d(2), _away_from_zero(g.rng, (1, 2, 6, 5)))
        ties = g.rng.integers(0, 3, (2, 2, 7, 6)).astype(F64)
        case = g.layer_case("ties", pool.MaxPool2d(3, 2, 1), nn.MaxPool2d(3, 2, 1), ties, fd=False)
    dx, dout = np.asarray(case["student"]["dx"]), case["dout"]
    ones = np.ones_like(dout)
    if not g.ok and dx.shape == ties.shape:
        m = pool.MaxPool2d(3, 2, 1)
        with g.patched(pool, im2col=solution.im2col, col2im=solution.col2im):
            m(ties)
            total = float(np.sum(m.backward(ones)))
        if total > ones.sum() + 1e-9:
            g.suggest(f"with tied maxima a window sent its gradient to several inputs (the gradient of all-ones dout "
                      f"sums to {total:g}, not {ones.sum():g}): route each window's dout to one input, the first "
                      f"tap that won (self.argmax)")


def avgpool_backward(g):
    pool = g.module("pool")
    with g.patched(pool, im2col=solution.im2col, col2im=solution.col2im):
        g.factors = {"the kernel area": 4}
        g.layer_case("k2", pool.AvgPool2d(2, 2), nn.AvgPool2d(2, 2), g.rng.standard_normal((2, 2, 7, 6)))
        g.factors = {"the kernel area": 9}
        g.layer_case("k3 s2 p1", pool.AvgPool2d(3, 2, 1), nn.AvgPool2d(3, 2, 1), g.rng.standard_normal((2, 2, 7, 6)))
        g.factors = {"H*W, the pixels averaged": 20}
        g.layer_case("global", pool.AdaptiveAvgPool2d(1), nn.AdaptiveAvgPool2d(1), g.rng.standard_normal((2, 3, 5, 4)))


# -- week 2 ---------------------------------------------------------------------------------------------------
def upsample_backward(g):
    resize = g.module("resize")
    with g.patched(resize, interpolation_matrix=solution.interpolation_matrix):
        for kw, shape in ((dict(size=(7, 5)), (2, 2, 3, 4)), (dict(size=(3, 2)), (1, 2, 7, 5)),
                          (dict(scale_factor=1.5), (1, 2, 4, 3)), (dict(size=(6, 7), align_corners=True), (1, 2, 3, 4))):
            label = " ".join(f"{k}={v}" for k, v in kw.items())
            g.layer_case(label, resize.Upsample(**kw), nn.Upsample(**kw), g.rng.standard_normal(shape))


def dense_block_backward(g):
    densenet = g.module("densenet")
    with g.patched(densenet, DenseLayer=solution.DenseLayer):
        mine = _random_norms(densenet.DenseBlock(3, 4, 2, 3, rng=np.random.default_rng(3), dtype=F64), g.rng)
        ref = fast_densenet.DenseBlock(3, 4, 2, 3, rng=np.random.default_rng(3), dtype=F64)
        x = g.rng.standard_normal((2, 4, 5, 5))
        g.layer_case("", mine, ref, x, fd_kwargs=COMPOSITE_FD)
        if g.ok:
            return
        # the identity path: a gradient on the input's own channels of the output must come back unchanged
        dout = np.zeros((2, mine.out_channels, 5, 5))
        dout[:, :4] = g.rng.standard_normal((2, 4, 5, 5))
        mine(x)
        dx = np.asarray(mine.backward(dout))
    if dx.shape == x.shape and not close(dx, dout[:, :4]):
        g.suggest("a gradient sent only into the block input's own channels of the output does not come back "
                  f"unchanged (rel. error {np.abs(dx - dout[:, :4]).max() / np.abs(dout[:, :4]).max():.2g}): the "
                  "identity path of the concatenation is lost. Every tensor is read by all later layers, so its "
                  "gradient is the SUM of its own slice and what each later layer sends back: add (+=) each layer's "
                  "input gradient onto the channels it read, do not overwrite them")


def aspp_fork_join(g):
    deeplab = g.module("deeplab")
    deps = dict(conv_bn_relu=solution.conv_bn_relu, ASPPPooling=solution.ASPPPooling, Named=solution.Named,
                Conv2d=solution.Conv2d, BatchNorm2d=solution.BatchNorm2d, ReLU=solution.ReLU,
                Dropout=solution.Dropout)
    with g.patched(deeplab, **deps):
        mine = _random_norms(deeplab.ASPP(6, 3, rates=(1, 2, 3), dropout=0.0, rng=np.random.default_rng(4),
                                          dtype=F64), g.rng)
        ref = fast_aspp.ASPP(6, 3, rates=(1, 2, 3), dropout=0.0, rng=np.random.default_rng(4), dtype=F64)
        x = g.rng.standard_normal((3, 6, 5, 4))    # 3 images: the pooling branch's batch norm sees 3 values
        case = g.layer_case("", mine, ref, x, fd_kwargs=COMPOSITE_FD)
        if g.ok or np.shape(case["student"]["dx"]) != x.shape:
            return
        # the probe: each branch's own input gradient, through the solution's layers
        ref.zero_grad()
        ref(x)
        parts = np.split(ref.project.backward(case["dout"]), 5, axis=1)
        each = [b.backward(p) for b, p in zip(ref.branches, parts[:4])] + [ref.pooling.backward(parts[4])]
    names = [f"branches.{i}" for i in range(4)] + ["pooling"]
    dx = case["student"]["dx"]
    for name, d in zip(names, each):
        if close(dx, d):
            g.suggest(f"dx is the input gradient of {name} alone: x was read by all five branches (the fork), so "
                      f"dL/dx is the SUM of the five branches' input gradients")
        if close(dx, sum(each) - d):
            g.suggest(f"dx is the sum over the branches except {name}: add its input gradient too")
    if not close(case["student"]["out"], case["reference"]["out"]):
        g.suggest("the forward output is wrong: every branch (and the pooling branch) reads x; concatenate their "
                  "outputs along the channels in the order branches.0-3, pooling, then apply project")


# -- week 3 ---------------------------------------------------------------------------------------------------
def _logits_and_target(rng, scale=3.0, shape=(2, 1, 4, 5)):
    return rng.standard_normal(shape) * scale, (rng.random(shape) < 0.4).astype(F64)


def bce_grad(g):
    loss = g.module("loss")
    x, t = _logits_and_target(g.rng)
    g.factors = {"the number of elements": x.size}
    for label, kw in (("mean", {}), ("sum", dict(reduction="sum")), ("none", dict(reduction="none")),
                      ("pos_weight", dict(pos_weight=2.5))):
        g.layer_case(label, loss.BCEWithLogitsLoss(**kw), losses.BCEWithLogitsLoss(**kw), (x, t), dx_name="dlogits",
                     wrt_inputs=(0,))
    big, t_big = _logits_and_target(g.rng, scale=30.0)
    g.layer_case("saturated", loss.BCEWithLogitsLoss(), losses.BCEWithLogitsLoss(), (big, t_big), dx_name="dlogits",
                 fd=False)
    failed = {label for label in ("mean", "sum", "none", "pos_weight", "saturated")
              if any(r.failed for t_, r in g.rows.items() if t_.endswith(f"({label})"))}
    if failed == {"pos_weight"}:
        g.suggest("only the pos_weight case fails: the positive term is weighted, dl/dx = (1 - t) s(x) - p t s(-x)")
    elif failed == {"saturated"}:
        g.suggest("only saturated logits (|x| ~ 30) fail: compute the gradient with the module's stable sigmoid(), "
                  "never through log(1 - s(x)) or exp(x) of a large x")
    elif "mean" in failed and not failed & {"sum", "none"}:
        g.suggest(f"reductions 'sum' and 'none' pass but 'mean' fails: the mean over the {x.size} elements divides "
                  f"the gradient by {x.size}")


def dice_grad(g):
    loss = g.module("loss")
    x, t = _logits_and_target(g.rng)
    batch = g.layer_case("batch", loss.DiceLoss(), losses.DiceLoss(), (x, t), dx_name="dlogits", wrt_inputs=(0,))
    g.factors = {"N, the number of images": 2}
    g.layer_case("per image", loss.DiceLoss(0.5, per_image=True), losses.DiceLoss(0.5, per_image=True), (x, t),
                 dx_name="dlogits", wrt_inputs=(0,))
    if g.ok:
        return
    p = 1 / (1 + np.exp(-x))
    den = p.sum() + t.sum() + 1
    constant_den = -p * (1 - p) * 2 * t / den * batch["dout"]
    if close(batch["student"]["dlogits"], constant_den):
        g.suggest("dL/dlogits treats the denominator sum(p) + sum(t) + s as a constant; it depends on every p_i too "
                  "(dden/dp_i = 1): use the quotient rule, d(num/den) = (dnum den - num dden) / den^2")
