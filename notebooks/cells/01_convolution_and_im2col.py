# %% [markdown]
# # 1. Convolution, im2col and dilation
#
# Every layer of DeepLabV3 that looks at neighbouring pixels is a convolution. This notebook takes the one in
# `minideeplab.nn.Conv2d` apart: the output-size formula, how `im2col` turns a convolution into one matrix product,
# what dilation (atrous convolution) changes, and how we know the hand-written backward pass is right.
#
# Everything below comes from the installed package (`pip install -e .`); set `MINIDEEPLAB_SHORT=1` for the quick
# run the tests use.

# %%
%matplotlib inline
import os

import matplotlib.pyplot as plt
import numpy as np

from minideeplab import nn
from minideeplab.gradcheck import check_module
from minideeplab.nn.functional import col2im, conv_output_size, im2col

SHORT = os.environ.get("MINIDEEPLAB_SHORT") == "1"
rng = np.random.default_rng(0)

# %% [markdown]
# ## Output size
#
# A kernel of size $k$ with dilation $d$ covers $d(k-1)+1$ pixels (its *effective* size). With padding $p$ and
# stride $s$ an input of length $n$ gives
#
# $$n_\text{out} = \left\lfloor \frac{n + 2p - d(k-1) - 1}{s} \right\rfloor + 1 .$$
#
# The table compares `conv_output_size` with the shape a real `Conv2d` forward pass returns.

# %%
n = 17
print(f"{'k':>2} {'s':>2} {'p':>2} {'d':>2} {'k_eff':>5} {'formula':>7} {'Conv2d':>6}")
for k, s, p, d in [(3, 1, 1, 1), (3, 2, 1, 1), (7, 2, 3, 1), (1, 2, 0, 1), (3, 1, 2, 2), (3, 1, 6, 6), (3, 2, 4, 4)]:
    conv = nn.Conv2d(1, 1, k, stride=s, padding=p, dilation=d, rng=rng)
    out = conv(np.zeros((1, 1, n, n), dtype=np.float32))
    print(f"{k:>2} {s:>2} {p:>2} {d:>2} {d * (k - 1) + 1:>5} {conv_output_size(n, k, s, p, d):>7} {out.shape[2]:>6}")

# %% [markdown]
# With $p = d\,(k-1)/2$ and $s=1$ the map keeps its size ("same" padding): that is how the atrous $3\times3$
# convolutions of DenseNet's late blocks and of ASPP are configured (`padding = dilation`).
#
# ## im2col: a convolution as one matrix product
#
# `im2col` copies every $k\times k$ patch into a column: for an input $(N, C, H, W)$ it returns
# $(N, C k^2, H_\text{out} W_\text{out})$. Below, a $5\times5$ image holding the numbers $0..24$ and a $3\times3$
# kernel with padding 1: each column lists the pixels one output unit reads (zeros are padding).

# %%
x = np.arange(25, dtype=np.float64).reshape(1, 1, 5, 5)
cols = im2col(x, 3, stride=1, padding=1)
print("input:\n", x[0, 0].astype(int))
print("cols shape:", cols.shape)
fig, ax = plt.subplots(figsize=(9, 3))
ax.imshow(cols[0], cmap="Blues")
for (r, c), v in np.ndenumerate(cols[0]):
    ax.text(c, r, int(v), ha="center", va="center", fontsize=7)
ax.set_xlabel("output pixel (row-major)")
ax.set_ylabel("kernel tap (i, j)")
ax.set_title("im2col of the 5x5 image: one column per output pixel")
plt.show()

# %% [markdown]
# The convolution is then `weight.reshape(F, C*k*k) @ cols`, a batched GEMM whose result is already NCHW. We check
# that `Conv2d.forward` is exactly this product (here with stride 2, padding 2 and dilation 2):

# %%
conv = nn.Conv2d(2, 4, 3, stride=2, padding=2, dilation=2, rng=rng, dtype=np.float64)
x = rng.standard_normal((2, 2, 9, 9))
out = conv(x)
cols = im2col(x, 3, stride=2, padding=2, dilation=2)
by_hand = (conv.weight.data.reshape(4, -1) @ cols + conv.bias.data[:, None]).reshape(out.shape)
print("output shape:", out.shape, " max |Conv2d - W @ im2col| =", np.abs(out - by_hand).max())

# %% [markdown]
# ## Dilation: the same 9 weights, spread out
#
# Which input pixels does the centre output unit of a 9x9 map read? We run `im2col` on an image of pixel *indices*
# and mark the indices in the centre unit's column. Dilation $d$ spaces the taps $d$ pixels apart: the field of view
# grows from 3 to $2d+1$ pixels with the same 9 weights and the same cost.

# %%
index = np.arange(81, dtype=np.float64).reshape(1, 1, 9, 9) + 1   # +1 so that padding (0) is not pixel 0
fig, axes = plt.subplots(1, 3, figsize=(9, 3))
for ax, d in zip(axes, (1, 2, 4)):
    col = im2col(index, 3, stride=1, padding=d, dilation=d)[0][:, 40]   # output pixel (4, 4)
    read = np.zeros(81)
    read[col[col > 0].astype(int) - 1] = 1
    ax.imshow(read.reshape(9, 9), cmap="Greys", vmin=0, vmax=1.3)
    ax.set_title(f"dilation {d}: effective kernel {d * 2 + 1}")
    ax.set_xticks([])
    ax.set_yticks([])
plt.show()

# %% [markdown]
# ## Backward: col2im is the adjoint of im2col
#
# The backward pass needs $dL/dx = \text{col2im}(W^\top \cdot dout)$. `col2im` adds every column entry back onto the
# pixel it was read from, so it is the *adjoint* (transpose) of `im2col`: $\langle \text{im2col}(x), c\rangle =
# \langle x, \text{col2im}(c)\rangle$ for every $x$ and $c$.

# %%
x = rng.standard_normal((2, 3, 8, 7))
args = dict(kernel_size=3, stride=2, padding=2, dilation=2)
c = rng.standard_normal(im2col(x, **args).shape)
lhs = np.sum(im2col(x, **args) * c)
rhs = np.sum(x * col2im(c, x.shape, **args))
print(f"<im2col(x), c> = {lhs:.12f}\n<x, col2im(c)> = {rhs:.12f}")

# %% [markdown]
# ## The textbook convolution, on one screen
#
# `minideeplab.textbook.Conv2d` is the convolution exactly as derived above and nothing else: `im2col`, one matrix
# product, and in backward two more products and `col2im`. With $W_2$ the weight reshaped to $(F, C k_h k_w)$ and
# `cols` the columns of image $n$:
#
# $$\text{out}_n = W_2\,\text{cols}_n + b,\qquad \frac{\partial L}{\partial W_2} = \sum_n dout_n\,\text{cols}_n^\top,
# \qquad \frac{\partial L}{\partial b} = \sum_{n,y,x} dout,\qquad dx = \text{col2im}\big(W_2^\top\, dout\big).$$
#
# Here is its source, the two helpers first (both loop over the kernel offsets only, never over pixels; `col2im`
# *adds* where windows overlap). Step through it with a debugger: nothing is hidden.

# %%
import inspect

from minideeplab import textbook

print(inspect.getsource(textbook.im2col))
print(inspect.getsource(textbook.col2im))

# %%
print(inspect.getsource(textbook.Conv2d.forward))
print(inspect.getsource(textbook.Conv2d.backward))

# %% [markdown]
# Run it, and run the fast `minideeplab.nn.Conv2d` with the same weights (`load_state_dict`) on the same input and
# upstream gradient: the same numbers. The fast layer picks one of five ways to reach the matrix product by the shape
# (`conv.path`; `docs/fast_paths.md` walks them); the textbook layer always takes im2col.

# %%
from minideeplab.bench import median_time


def median_ms(fn, repeats):
    return 1e3 * median_time(fn, repeats, warmup=0)     # the benchmark's timer (minideeplab.bench)


C, F, size = (32, 16, 24) if SHORT else (128, 32, 64)        # the dense layers' 3x3 conv: 128 -> 32 at 64x64
plain = textbook.Conv2d(C, F, 3, padding=1, bias=False, rng=rng, dtype=np.float64)
fast = nn.Conv2d(C, F, 3, padding=1, bias=False, rng=rng, dtype=np.float64)
fast.load_state_dict(plain.state_dict())
x = rng.standard_normal((2, C, size, size))
dout = rng.standard_normal((2, F, size, size))
results = {}
for name, layer in (("textbook", plain), ("fast", fast)):
    layer.zero_grad()
    out = layer(x)
    results[name] = (out, layer.backward(dout), layer.weight.grad.copy())
for what, a, b in zip(("output", "dx", "dW"), results["textbook"], results["fast"]):
    print(f"{what:>6}: max |textbook - fast| / max |fast| = {np.abs(a - b).max() / np.abs(b).max():.1e}")
print("the fast layer took the", repr(fast.path), "path")


def step(layer):
    layer(x)
    layer.backward(dout)


for name, layer in (("textbook", plain), ("fast", fast)):
    print(f"{name:>8}: {median_ms(lambda: step(layer), 3 if SHORT else 7):6.1f} ms forward+backward (float64)")

# %% [markdown]
# ## Checking a backward pass by finite differences
#
# For a random upstream gradient `dout` define $L = \sum \text{conv}(x) \cdot dout$. Backward must return
# $\partial L/\partial x$ and accumulate $\partial L/\partial W$ into `weight.grad`. One entry by hand, with a central
# difference $\big(L(w+\varepsilon) - L(w-\varepsilon)\big)/2\varepsilon$ in float64:

# %%
conv = nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2, rng=rng, dtype=np.float64)
x = rng.standard_normal((2, 3, 9, 9))
dout = rng.standard_normal(conv(x).shape)
conv.zero_grad()
conv(x)
dx = conv.backward(dout)


def L():
    return np.sum(conv(x) * dout)


idx, eps = (1, 2, 0, 1), 1e-6
### BEGIN SOLUTION
### HINT: set conv.weight.data[idx] to w0 + eps, then to w0 - eps, evaluating L() each time (plus, minus); restore w0
w0 = conv.weight.data[idx]
conv.weight.data[idx] = w0 + eps
plus = L()
conv.weight.data[idx] = w0 - eps
minus = L()
conv.weight.data[idx] = w0
### END SOLUTION
print(f"dL/dW{list(idx)}: backward {conv.weight.grad[idx]:.10f}   finite difference {(plus - minus) / (2 * eps):.10f}")

# %% [markdown]
# `minideeplab.gradcheck.check_module` does the same for the input and every parameter (every entry of small
# tensors, a random sample of big ones) and raises if the worst relative error exceeds `rtol`. This is the check the
# test suite runs on every layer; here it is for the strided, dilated convolution we built.

# %%
result = check_module(conv, x, rng=rng)
print(result)
print("worst relative error:", f"{result.worst:.1e}")

# %% [markdown]
# ## Questions
#
# Answer in a sentence or two; compute what you can with the package (`conv_output_size`, `im2col`, `col2im`).
#
# **Q1.** DenseNet's first layer is a 7×7 convolution with stride 2 and padding 3. On a batch of two 224×224 RGB
# images, what is its output size, what shape do `im2col`'s columns have, and how many times more values do the
# columns hold than the input?
#
# ### BEGIN SOLUTION
# **Answer.** $\lfloor (224 + 6 - 6 - 1)/2 \rfloor + 1 = 112$, so the output is 112×112. The columns have shape
# $(N, C k^2, H_\text{out} W_\text{out}) = (2, 147, 12544)$: 147 · 12544 values per image against 3 · 224 · 224
# in the input, **12.25×** as many, which is $k^2/s^2 = 49/4$: every pixel is copied into about $k^2/s^2$ windows.
# That memory is the price of turning the convolution into one matrix product.
# ### END SOLUTION
#
# **Q2.** Why must `col2im` *add* the column entries onto the pixels (`+=`) instead of assigning them? For a 3×3
# kernel with stride 1 and padding 1 on a 3×3 map, how many windows read the centre pixel, and how many a corner?
#
# ### BEGIN SOLUTION
# **Answer.** `col2im` is the adjoint of `im2col`: a pixel copied into several columns influences the loss through
# each copy, so its gradient is the *sum* of the gradients of its copies. Assigning keeps only the last window's
# contribution. The centre of the 3×3 map is read by all **9** windows, a corner by **4** (an edge pixel by 6):
# `col2im(im2col(ones))` is `[[4, 6, 4], [6, 9, 6], [4, 6, 4]]`. An overwriting `col2im` gives 1 everywhere, up to
# a factor of the kernel area too small where windows overlap.
# ### END SOLUTION
#
# **Q3.** Which padding keeps the map size for a 3×3 convolution with dilation 6 at stride 1, what field does it
# cover, and how many weights does it have compared with a dense kernel of the same extent?
#
# ### BEGIN SOLUTION
# **Answer.** The effective kernel is $d(k-1)+1 = 13$ pixels wide, so "same" padding is $d(k-1)/2 = 6$ (padding =
# dilation, as in DenseNet's atrous blocks and ASPP). It covers 13×13 pixels with **9** weights, against **169** for a
# dense 13×13 kernel: the same field of view at the cost, and the parameters, of a 3×3 convolution.
# ### END SOLUTION
