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
# ## Gradient check of the block
#
# The whole dense block (batch norm in training mode, every layer) against central differences in float64.

# %%
small = DenseBlock(num_layers=3, num_input_features=4, bn_size=2, growth_rate=3, rng=rng, dtype=np.float64)
result = check_module(small, rng.standard_normal((2, 4, 5, 5)), rng=rng)
print(result)
