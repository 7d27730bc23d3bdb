# %% [markdown]
# # 3. Batch normalization and dense blocks
#
# DenseNet121 is built from two ideas: **batch normalization** before every convolution, and **dense connectivity**:
# inside a block every layer reads the concatenation of the block input and of all earlier layers' outputs. This
# notebook looks at the statistics batch norm keeps in training and evaluation, the channel bookkeeping of a dense
# block with its single shared concatenation buffer, and how gradients flow back through the concatenation.

# %%
%matplotlib inline
import os

import matplotlib.pyplot as plt
import numpy as np

from minideeplab import nn
from minideeplab.gradcheck import check_module
from minideeplab.models import DenseBlock, densenet121

SHORT = os.environ.get("MINIDEEPLAB_SHORT") == "1"
rng = np.random.default_rng(0)

# %% [markdown]
# ## Batch norm: batch statistics in training, running statistics in evaluation
#
# In training mode `BatchNorm2d` normalises each channel with the mean and variance of the *current batch* (over
# N, H, W) and updates exponential running estimates, `running = 0.9 * running + 0.1 * batch`. In evaluation mode it
# uses the running estimates, so an image's output no longer depends on the other images of its batch.

# %%
bn = nn.BatchNorm2d(3)
true_mean, true_std = np.array([5.0, -2.0, 0.5]), np.array([2.0, 0.5, 1.0])


def batch(n=8):
    return (true_mean[:, None, None] + true_std[:, None, None] * rng.standard_normal((n, 3, 6, 6))).astype(np.float32)


steps = 60
history = []
for _ in range(steps):
    y = bn(batch())
    history.append(bn.running_mean.copy())
print("train-mode output, per-channel mean:", y.mean(axis=(0, 2, 3)).round(4), " std:", y.std(axis=(0, 2, 3)).round(4))
print("running_mean:", bn.running_mean.round(3), " running_var:", bn.running_var.round(3))
plt.figure(figsize=(5, 3))
plt.plot(np.array(history))
plt.axhline(5.0, ls=":", c="gray")
plt.axhline(-2.0, ls=":", c="gray")
plt.xlabel("training step")
plt.ylabel("running_mean")
plt.title("running estimates converge to the data's statistics")
plt.show()

# %%
x = batch(4)
other = batch(4)
other[0] = x[0]                          # the same first image in two different batches
bn.train()
a, b = bn(x)[0], bn(other)[0]
print("train mode: max |difference| of image 0's output between the two batches:", float(np.abs(a - b).max()))
bn.eval()
a, b = bn(x)[0], bn(other)[0]
print("eval mode:  max |difference| of image 0's output between the two batches:", float(np.abs(a - b).max()))

# %% [markdown]
# The backward pass differs as well: in training the batch mean and variance depend on every input, which gives the
# familiar $\frac{\gamma}{\sigma}\big(dout - \overline{dout} - \hat x\,\overline{dout\cdot\hat x}\big)$; in evaluation
# the statistics are constants and the layer is a per-channel affine map (`docs/derivations.md`).
#
# ## A dense block: growing channels
#
# A block with $L$ layers, input channels $C_0$ and growth rate $k$: layer $l$ reads $C_0 + (l-1)k$ channels and
# adds $k$ new ones (BN → ReLU → 1×1 conv to `bn_size·k` → BN → ReLU → 3×3 conv to $k$). The block returns
# $C_0 + Lk$ channels. The channel counts below are read from the modules.

# %%
block = DenseBlock(num_layers=4, num_input_features=8, bn_size=2, growth_rate=4, rng=rng)
for name, layer in block.named_children():
    print(f"{name}: reads {layer.conv1.in_channels:>2} channels -> bottleneck {layer.conv1.out_channels}"
          f" -> adds {layer.conv2.out_channels}")
print("block output channels:", block.out_channels)
net = densenet121(rng=rng)
for i in range(1, 5):
    b = getattr(net.features, f"denseblock{i}")
    print(f"DenseNet121 denseblock{i}: {b.num_layers:>2} layers, {b.num_input_features:>4} -> {b.out_channels:>4} channels")

# %% [markdown]
# ## One shared concatenation buffer
#
# Concatenating before every layer would copy a growing tensor $L$ times. `DenseBlock.forward` instead allocates
# **one** buffer of $C_0 + Lk$ channels, copies the input into its first $C_0$ channels, and layer $l$ reads the
# prefix `buffer[:, :C0 + (l-1)k]` (a view, no copy) and writes its $k$ channels into its own slice. The sums below
# compare the channels copied by naive concatenation with the buffer, using the block's own numbers.

# %%
x = rng.standard_normal((2, 8, 10, 10)).astype(np.float32)
out = block(x)
print("buffer (= output) shape:", block.buffer_shape)
reads = [layer.conv1.in_channels for layer in block.children()]
print("channels each layer reads:", reads)
print(f"naive concatenation copies {sum(reads[1:]) + block.out_channels} channel-maps per forward; "
      f"the buffer holds {block.out_channels} (and the input copy, {block.num_input_features})")
print("first 8 output channels are the input itself:", bool(np.array_equal(out[:, :8], x)))

# %% [markdown]
# ## Gradient flow through the concatenation
#
# In the forward pass the input (and each layer's output) is *read* by every later layer: a fork. So in the backward
# pass the gradient of a channel slice is the **sum** of the gradient arriving at that slice of the output (the
# identity path of the concatenation) and of what every later layer sends back. Below we send a gradient into one
# slice of the block output at a time and measure what reaches the block input: the input's own slice passes
# unchanged (the shortcut), every layer's slice also reaches the input, through that layer.

# %%
block.train()
slices = [("input", 0, 8)] + [(f"layer {i + 1}", 8 + 4 * i, 12 + 4 * i) for i in range(4)]
norms = []
for name, lo, hi in slices:
    block(x)
    dout = np.zeros_like(out)
    dout[:, lo:hi] = rng.standard_normal(dout[:, lo:hi].shape)
    dx = block.backward(dout)
    norms.append(float(np.linalg.norm(dx)))
    if name == "input":
        print("gradient into the input's own slice comes back unchanged:", bool(np.allclose(dx, dout[:, :8])))
plt.figure(figsize=(5, 3))
plt.bar([s[0] for s in slices], norms)
plt.ylabel("||dL/d(block input)||")
plt.title("every slice of the output sends gradient to the input")
plt.show()
block.zero_grad()

# %% [markdown]
# ## The textbook layers: batch norm's backward, step by step
#
# `minideeplab.textbook.BatchNorm2d` is the layer as the derivation goes. In training each channel's output is
# $\gamma \hat x + \beta$ with $\hat x = (x - \mu)/\sqrt{\sigma^2 + \epsilon}$, and $x$ reaches the loss three ways:
# through $\hat x$ directly, through the variance $\sigma^2$ and through the mean $\mu$ (each a function of every $x$
# of the channel). Its backward follows those three paths one line each (with $m = N H W$ values per channel):
#
# $$\frac{\partial L}{\partial \sigma^2} = \sum \frac{\partial L}{\partial \hat x}\,(x - \mu)\cdot
# \left(-\tfrac12\right)(\sigma^2 + \epsilon)^{-3/2},\qquad
# \frac{\partial L}{\partial \mu} = -\sum \frac{\partial L}{\partial \hat x}\,(\sigma^2 + \epsilon)^{-1/2}
# + \frac{\partial L}{\partial \sigma^2}\cdot\frac{-2}{m}\sum (x - \mu),$$
#
# $$dx = \frac{\partial L}{\partial \hat x}\,(\sigma^2 + \epsilon)^{-1/2} + \frac{\partial L}{\partial \sigma^2}
# \cdot\frac{2 (x - \mu)}{m} + \frac{\partial L}{\partial \mu}\cdot\frac1m .$$
#
# In eval mode $\mu$ and $\sigma^2$ are the running estimates, constants, and only the first term remains.

# %%
import inspect

from minideeplab import textbook
from minideeplab.bench import median_time
from minideeplab.models.densenet import DenseBlock as FastDenseBlock

print(inspect.getsource(textbook.BatchNorm2d.forward))
print(inspect.getsource(textbook.BatchNorm2d.backward))

# %% [markdown]
# **Exercise.** Batch norm in training mode makes every channel's output independent of a constant added to that
# channel's inputs (the mean absorbs it). So $dL/dx$ must sum to zero over each channel, whatever `dout` is. Run the
# textbook layer forward and backward once (random `dout`) and compute `per_channel`, the sum of `dx` over the batch
# and the pixels, one number per channel.

# %%
bn_check = textbook.BatchNorm2d(3, dtype=np.float64)
xb = rng.standard_normal((4, 3, 5, 5)) * 2 + 1
bn_check(xb)
### BEGIN SOLUTION
### HINT: dxb = bn_check.backward(a random dout of xb's shape); sum it over the axes (0, 2, 3)
dxb = bn_check.backward(rng.standard_normal(xb.shape))
per_channel = dxb.sum(axis=(0, 2, 3))
### END SOLUTION
print("sum of dx over each channel:", per_channel, " (max |dx| =", f"{np.abs(dxb).max():.2f})")

# %% [markdown]
# The fast `minideeplab.nn.BatchNorm2d` computes the same thing in closed form,
# $\frac{\gamma}{\sigma}\big(dout - \overline{dout} - \hat x\,\overline{dout\cdot\hat x}\big)$, in one pass and
# without ever building $\hat x$ (its docstring says what else it does). The same numbers, including the running
# statistics it updates, and the times of forward + backward:


# %%
def median_ms(fn, repeats):
    return 1e3 * median_time(fn, repeats, warmup=0)     # the benchmark's timer (minideeplab.bench)


def run_pair(plain, fast, x, dout, repeats):
    """The same state, input and upstream gradient through both: worst relative differences, then the times."""
    fast.load_state_dict(plain.state_dict())
    state = {k: v.copy() for k, v in plain.state_dict().items()}
    outs = {}
    for name, layer in (("textbook", plain), ("fast", fast)):
        layer.load_state_dict(state)
        layer.zero_grad()
        y = layer(x)
        outs[name] = [y, layer.backward(dout)] + [p.grad.copy() for p in layer.parameters()] \
            + [b.copy() for b in layer.state_dict().values() if b.dtype.kind == "f" and b.ndim == 1 and b.shape != ()]
    worst = max(float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)) for a, b in zip(outs["textbook"], outs["fast"]))
    print(f"{len(outs['fast'])} tensors (output, dx, parameter gradients, running statistics): worst relative "
          f"difference {worst:.1e}")

    def step(layer):
        layer(x)
        layer.backward(dout)
    for name, layer in (("textbook", plain), ("fast", fast)):
        print(f"{name:>8}: {median_ms(lambda: step(layer), repeats):7.1f} ms forward+backward")


C, size = (16, 16) if SHORT else (128, 64)
x = rng.standard_normal((2, C, size, size))
plain_bn = textbook.BatchNorm2d(C, dtype=np.float64)
plain_bn.weight.data[...] = rng.uniform(0.5, 1.5, C)
run_pair(plain_bn, nn.BatchNorm2d(C, dtype=np.float64), x, rng.standard_normal(x.shape), 3 if SHORT else 7)

# %% [markdown]
# ## The textbook dense block: a concatenation before every layer
#
# `textbook.DenseBlock` does what the paper's diagram shows: before layer $l$ it concatenates the block input and the
# $l-1$ earlier outputs, and returns the concatenation of all of them. Its backward is the two rules of a join and a
# fork. The concatenation *splits* the gradient: each slice of the output's gradient belongs to the tensor that was
# concatenated there. Each tensor was *read* by every later layer, so its gradient is the *sum* of its own slice and
# of what every later layer sends back. Going backwards through the layers, the slice of layer $l$ is complete when
# the loop reaches it, and its input gradient is added onto the slices it read:

# %%
print(inspect.getsource(textbook.DenseBlock.forward))
print(inspect.getsource(textbook.DenseBlock.backward))

# %% [markdown]
# The fast `DenseBlock` above never concatenates: one buffer, prefix views, shared batch statistics (its docstring,
# and the sections above). The same numbers, and the times in training mode, for block 1 of DenseNet121 (6 layers,
# 64 -> 256 channels; float64):

# %%
layers, C0, growth, size = (3, 8, 4, 12) if SHORT else (6, 64, 32, 32)
plain_block = textbook.DenseBlock(layers, C0, 4, growth, rng=rng, dtype=np.float64)
fast_block = FastDenseBlock(layers, C0, 4, growth, rng=rng, dtype=np.float64)
x = rng.standard_normal((2, C0, size, size))
run_pair(plain_block, fast_block, x, rng.standard_normal((2, plain_block.out_channels, size, size)), 2 if SHORT else 5)

# %% [markdown]
# ## Gradient check of the block
#
# The whole dense block (batch norm in training mode, every layer) against central differences in float64.

# %%
small = DenseBlock(num_layers=3, num_input_features=4, bn_size=2, growth_rate=3, rng=rng, dtype=np.float64)
result = check_module(small, rng.standard_normal((2, 4, 5, 5)), rng=rng)
print(result)

# %% [markdown]
# ## Questions
#
# **Q1.** Dense block 1 of DenseNet121 has 6 layers, 64 input channels, growth rate 32 and `bn_size` 4. How many
# channels does layer 6 read, how wide is its bottleneck, how many channels leave the block, and how many enter
# dense block 2?
#
# ### BEGIN SOLUTION
# **Answer.** Layer $l$ reads $64 + (l-1) \cdot 32$ channels: layer 6 reads **224**. Its bottleneck (the 1×1
# convolution) has `bn_size · growth` = **128** channels, and it adds 32. The block returns $64 + 6 \cdot 32$ =
# **256** channels; `transition1` halves them, so **128** enter dense block 2.
# ### END SOLUTION
#
# **Q2.** Why does $dL/dx$ of batch norm in training mode sum to zero over each channel (the exercise above), and
# why does that no longer hold in eval mode?
#
# ### BEGIN SOLUTION
# **Answer.** In training, adding a constant $c$ to every input of a channel adds $c$ to its batch mean and leaves
# $x - \mu$, the variance and so the output unchanged: the derivative of $L$ along the all-ones direction of that
# channel is zero, and that derivative is exactly $\sum dx$ over the channel. The term that enforces it is the one
# through the mean, $\frac{1}{m}\frac{\partial L}{\partial \mu}$; drop it and the sums are not zero. In eval mode the
# mean is the running estimate, a constant: shifting the inputs shifts the output, and $dx = dout \cdot \gamma /
# \sqrt{\sigma^2_\text{running} + \epsilon}$ has no reason to sum to zero.
# ### END SOLUTION
#
# **Q3.** In `textbook.DenseBlock.backward`, why is it `grad[:, :c] += layer.backward(...)` and not `=`? Which
# gradients would `=` lose?
#
# ### BEGIN SOLUTION
# **Answer.** The block input and every layer's output are *read* by all later layers and are also part of the block
# output: a fork. Their gradient is the sum of the gradient arriving at their slice of the output (the identity path
# of the concatenation) and of what every later layer sends back. `=` would replace that sum by the input gradient of
# the layer being processed: the identity path and the contributions of the later layers (already added) would be
# lost, and the block input would only receive what the first layer sends back.
# ### END SOLUTION
