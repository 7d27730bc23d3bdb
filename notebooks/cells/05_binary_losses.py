# %% [markdown]
# # 5. Losses for binary segmentation
#
# The model outputs one logit $x$ per pixel; the mask probability is $\sigma(x)$ and the label is $t\in\{0,1\}$.
# The design note surveys the losses for this binary problem: binary cross-entropy, hinge and squared hinge; we add
# the two that segmentation practice uses against class imbalance, focal loss and Dice. All five live in
# `minideeplab.losses` with hand-written backward passes (derivations in `docs/derivations.md`).

# %%
%matplotlib inline
import os

import matplotlib.pyplot as plt
import numpy as np

from minideeplab.gradcheck import check_module
from minideeplab.losses import BCEWithLogitsLoss, DiceLoss, build_loss

SHORT = os.environ.get("MINIDEEPLAB_SHORT") == "1"
rng = np.random.default_rng(0)

# %% [markdown]
# ## Value and gradient against the logit
#
# Per-pixel losses with `reduction="none"`, for a foreground pixel ($t = 1$); a background pixel is the mirror image
# $x \to -x$. The gradient is what backward returns for an upstream gradient of ones.

# %%
x = np.linspace(-5, 5, 201).reshape(1, 1, 1, -1)
t = np.ones_like(x)
names = ["bce", "focal", "hinge", "squared_hinge"]
fig, (ax_v, ax_g) = plt.subplots(1, 2, figsize=(11, 3.8))
for name in names:
    loss = build_loss(name, reduction="none")
    value = loss(x, t)
    grad = loss.backward(np.ones_like(x))
    ax_v.plot(x.ravel(), value.ravel(), label=name)
    ax_g.plot(x.ravel(), grad.ravel(), label=name)
ax_v.set(xlabel="logit x (target 1)", ylabel="loss", ylim=(-0.2, 6), title="per-pixel loss")
ax_g.set(xlabel="logit x (target 1)", ylabel="dloss/dx", ylim=(-4, 0.5), title="gradient")
for ax in (ax_v, ax_g):
    ax.grid(alpha=0.3)
    ax.legend()
plt.show()

# %% [markdown]
# * **BCE** $= \text{softplus}(-x)$ for $t=1$: gradient $\sigma(x) - 1$, never exactly zero, bounded by 1.
# * **Hinge** $\max(0, 1-yx)$ with $y = 2t-1$: constant gradient $-1$ until the margin $yx \ge 1$ is met, then 0.
# * **Squared hinge**: smooth at the margin, but its gradient grows linearly with the violation (outliers dominate).
# * **Focal** (γ = 2, α = 0.25): BCE scaled by $(1-p_t)^\gamma$; well-classified pixels contribute almost nothing.
#
# ## Dice: a loss of the whole mask
#
# Dice is not a sum over pixels: $L = 1 - \frac{2\sum p t + s}{\sum p + \sum t + s}$. Below a mask with 10 %
# foreground and predictions of growing confidence $x = a\,(2t - 1)$, from confidently wrong ($a<0$) to confidently
# right.

# %%
mask = np.zeros((1, 1, 32, 32))
mask[..., 8:18, 5:15] = 1                      # 100 of 1024 pixels
bce, dice = BCEWithLogitsLoss(), DiceLoss()
a_values = np.linspace(-6, 6, 49)
curves = {"bce": [float(bce(a * (2 * mask - 1), mask)) for a in a_values],
          "dice": [float(dice(a * (2 * mask - 1), mask)) for a in a_values]}
plt.figure(figsize=(5.5, 3.5))
for name, ys in curves.items():
    plt.plot(a_values, ys, label=name)
plt.xlabel("confidence a (logits = a * (2t - 1))")
plt.ylabel("loss")
plt.grid(alpha=0.3)
plt.legend()
plt.show()
print(f"foreground fraction: {mask.mean():.3f}")

# %% [markdown]
# ## Imbalanced masks
#
# Segmentation masks are often mostly background. Take a mask with 1 % foreground and a lazy model that predicts
# "background" everywhere (logit −4), next to a confident correct one (logit ±10). BCE, the mean over pixels, hardly sees the
# difference; Dice measures overlap with the foreground and calls the lazy model a failure. The last column is the
# share of the gradient's magnitude that lands on the foreground pixels for the lazy prediction: how loudly each loss
# asks for the missing object. BCE with `pos_weight` = (background pixels / foreground pixels) rebalances it.
# (Soft Dice uses probabilities, not thresholded masks: a small probability on each of thousands of background
# pixels adds up, which is why the correct prediction must be confident for its Dice loss to approach 0.)

# %%
mask = np.zeros((2, 1, 40, 40))
mask[0, 0, 10:14, 10:14] = 1
mask[1, 0, 25:29, 5:9] = 1
fg = mask.mean()
lazy = np.full(mask.shape, -4.0)
perfect = 10.0 * (2 * mask - 1)
candidates = {
    "bce": build_loss("bce"), "bce, pos_weight": BCEWithLogitsLoss(pos_weight=(1 - fg) / fg),
    "focal": build_loss("focal"), "hinge": build_loss("hinge"), "squared_hinge": build_loss("squared_hinge"),
    "dice": build_loss("dice"), "bce+dice": build_loss("bce+dice"),
}
print(f"foreground fraction {fg:.4f}\n")
print(f"{'loss':<16} {'lazy':>8} {'perfect':>8} {'fg share of |grad| (lazy)':>26}")
for name, loss in candidates.items():
    perfect_value = float(loss(perfect, mask))
    lazy_value = float(loss(lazy, mask))
    g = np.abs(loss.backward())
    print(f"{name:<16} {lazy_value:>8.4f} {perfect_value:>8.4f} {g[mask == 1].sum() / g.sum():>26.3f}")

# %% [markdown]
# ## Stable vs naive BCE at large logits
#
# Written naively, $-[t\log\sigma(x) + (1-t)\log(1-\sigma(x))]$ breaks down where float32 cannot hold $\sigma(x)$ or
# $1-\sigma(x)$. The package computes $\max(x,0) - xt + \log(1+e^{-|x|})$, which is exact algebra and finite
# everywhere. The naive formula is written out in this cell only to show the failure, for a background pixel
# ($t = 0$, true loss $\text{softplus}(x)$); the last column is the naive value's relative error.

# %%
x = np.array([-100.0, -30.0, -17.0, 0.0, 17.0, 30.0, 100.0], dtype=np.float32).reshape(1, 1, 1, -1)
t = np.zeros_like(x)
with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
    s = 1 / (1 + np.exp(-x))
    naive = -(t * np.log(s) + (1 - t) * np.log(1 - s))
stable = BCEWithLogitsLoss(reduction="none")(x, t)
print(f"{'logit':>7} {'sigma(x)':>10} {'naive':>10} {'stable':>10} {'naive rel. err':>15}   (target 0, float32)")
with np.errstate(divide="ignore", invalid="ignore"):
    err = np.abs(naive.astype(np.float64) - stable) / stable
for xi, pi, ni, si, ei in zip(x.ravel(), s.ravel(), naive.ravel(), stable.ravel(), err.ravel()):
    print(f"{xi:>7.0f} {pi:>10.4g} {ni:>10.4g} {si:>10.4g} {ei:>15.2%}")

# %% [markdown]
# Three different failures, all in the naive column:
#
# * **Large positive logits** ($x$ = 17, 30, 100): $\sigma(x)$ rounds to exactly 1 (at 17, $1-\sigma = 4\cdot10^{-8}$
#   is below half the spacing of float32 numbers just under 1, $6\cdot10^{-8}$), so $\log(1-\sigma(x)) = \log 0$
#   and the loss is `inf` where the true loss is 17, 30 and 100: the confidently wrong pixels, the ones that matter.
# * **Moderately negative logits**: the true loss $\approx e^{x}$ is tiny, but $1-\sigma(x)$ rounds to a float32
#   number next to 1. At $x = -17$, $1 - 4.14\cdot10^{-8}$ rounds to $1 - 5.96\cdot10^{-8}$, and the naive loss is
#   $5.96\cdot10^{-8}$ instead of $4.14\cdot10^{-8}$: **44 % too large**. At $x = -30$ it rounds to exactly 1 and the
#   loss to `-0` instead of $9.4\cdot10^{-14}$ (a relative error of 100 %).
# * **Very negative logits** ($x = -100$): $e^{100}$ overflows, $\sigma(x)$ is exactly 0, and the term
#   $t\log\sigma(x)$ is $0 \cdot (-\infty)$ = `nan`, although $t = 0$ should switch it off: the loss is `nan`.
#
# The stable form gives every value to float32 precision, including $3.8\cdot10^{-44}$ (a subnormal) at $x=-100$.

# %% [markdown]
# ## Gradient checks
#
# Each loss's backward against central differences (float64, with respect to the logits; the target is a fixed
# {0, 1} mask). Logits are drawn away from the hinge's kink at $yx = 1$, where the loss has no derivative.

# %%
logits = rng.standard_normal((2, 1, 6, 6)) * 2
logits[np.abs(np.abs(logits) - 1) < 0.05] += 0.2
target = (rng.random((2, 1, 6, 6)) < 0.3).astype(np.float64)
for name in ["bce", "focal", "hinge", "squared_hinge", "dice", "bce+dice"]:
    result = check_module(build_loss(name), (logits, target), wrt_inputs=(0,), rng=rng)
    print(f"{name:<14} worst relative error {result.worst:.1e}  passed: {result.passed}")

# %% [markdown]
# ## Questions
#
# **Q1.** For a foreground pixel ($t = 1$) and BCE on logits with `reduction="none"`, what is $dl/dx$ at $x = 0$,
# $x = 4$ and $x = -4$? What is the largest magnitude this gradient can have, and what does that mean for a
# confidently wrong pixel?
#
# ### BEGIN SOLUTION
# **Answer.** $dl/dx = \sigma(x) - t = \sigma(x) - 1$: **−0.5** at 0, **−0.018** at 4 and **−0.982** at −4. Its
# magnitude is below 1 for any logit: a confidently wrong pixel ($x \to -\infty$) pushes with a gradient close to
# −1, never more, unlike the squared hinge, whose gradient grows with the violation.
# ### END SOLUTION
#
# **Q2.** A batch of shape (2, 1, 40, 40): by how much does `reduction="mean"` scale each pixel's gradient compared
# with `reduction="sum"`? Why does it matter when you change the image size?
#
# ### BEGIN SOLUTION
# **Answer.** By $1/3200$: the mean divides the loss, and so every pixel's gradient, by the number of elements
# $2 \cdot 1 \cdot 40 \cdot 40 = 3200$. With "mean" the size of the update does not depend on the image size or
# the batch size, so a learning rate carries over; with "sum" it grows with the number of pixels.
# ### END SOLUTION
#
# **Q3.** Why does the Dice gradient at one pixel depend on every other pixel, while the BCE gradient does not?
#
# ### BEGIN SOLUTION
# **Answer.** BCE is a sum (or mean) of per-pixel terms, so $dl/dx_i$ depends on $x_i$ and $t_i$ only. Dice is a
# ratio of sums over the whole mask, $1 - (2\sum p t + s)/(\sum p + \sum t + s)$: both sums contain every pixel,
# so $dL/dx_i = -p_i(1-p_i)\,(2 t_i\,\text{den} - \text{num})/\text{den}^2$ involves num and den, i.e. all pixels.
# Treating the denominator as a constant (a common mistake) drops the $-\text{num}$ term.
# ### END SOLUTION
