# %% [markdown]
# # 4. ASPP and image pooling
#
# DeepLabV3's head, Atrous Spatial Pyramid Pooling, looks at the backbone's features through five parallel
# branches: a 1×1 convolution, three 3×3 atrous convolutions with rates (6, 12, 18) at output stride 16 (doubled at
# 8), and **image pooling**: global average pooling, a 1×1 convolution, and an upsampling back to the map. Each
# branch has batch norm (the DeepLabV3 addition the design note stresses); the five outputs are concatenated and
# projected by a 1×1 convolution. This notebook measures what each branch sees, and why the large rates need the
# image-pooling branch.

# %%
%matplotlib inline
import os

import matplotlib.pyplot as plt
import numpy as np

from minideeplab import nn
from minideeplab.analysis import receptive_field, receptive_field_region, valid_weight_histogram
from minideeplab.analysis.figures import valid_weights_figure
from minideeplab.gradcheck import check_module
from minideeplab.models import ASPP, DeepLabConfig, build_deeplab, deeplabv3_densenet121

SHORT = os.environ.get("MINIDEEPLAB_SHORT") == "1"
rng = np.random.default_rng(0)

# %% [markdown]
# ## The five branches
#
# The real model, DeepLabV3 on DenseNet121 at output stride 16 (the structure is read from the modules):

# %%
model16 = deeplabv3_densenet121(output_stride=16, rng=rng)
aspp = model16.head.aspp
print("rates:", aspp.rates, " in_channels:", aspp.in_channels, " branch width:", aspp.out_channels)
for i, branch in enumerate(aspp.branches):
    print(f"branches.{i}: {branch.conv}")
print("pooling:", aspp.pooling)
print("project:", aspp.project.conv)

# %% [markdown]
# ## What each branch sees, at output stride 16 and 8
#
# The analytic receptive field (in input pixels) of each branch's output for a 512×512 image, and the size of the
# feature map the branch runs on. At OS 8 the rates double, (12, 24, 36), so the fields in *input pixels* match
# those of OS 16 on a map twice as large. The image-pooling branch always sees the whole map.

# %%
size = 512
model8 = deeplabv3_densenet121(output_stride=8, rng=rng)
tables = {os_: receptive_field(m, size) for os_, m in ((16, model16), (8, model8))}
names = [f"head.aspp.branches.{i}" for i in range(4)] + ["head.aspp.pooling"]
labels = ["1x1"] + [f"3x3 rate {r}" for r in model16.head.aspp.rates] + ["image pooling"]
print(f"{'branch (rates at OS 16)':<24} {'RF @ OS16':>10} {'RF @ OS8':>10}")
for name, label in zip(names, labels):
    print(f"{label:<24} {tables[16].at(name).rf[0]:>10} {tables[8].at(name).rf[0]:>10}")
for os_, t in tables.items():
    print(f"OS {os_}: feature map {t.at('backbone').size}, rates {(model16 if os_ == 16 else model8).rates}")

# %% [markdown]
# ## Valid weights: why very large rates fail (DeepLabV3, Figure 4)
#
# A 3×3 filter with rate $d$ and padding $d$ reads 9 positions; near the border some land on zero padding. A weight
# is *valid* when its tap lands inside the map. `valid_weight_histogram` counts, over all output positions, how many
# taps are valid. On a 65×65 map, as the rate approaches the map size, the filter degenerates into its centre tap:
# a 1×1 convolution.

# %%
fig = valid_weights_figure(65)
fig

# %%
print("fraction of positions with 9 / 4 / 1 valid weights on the maps the real model uses (input 512):")
for os_, rates in ((16, model16.rates), (8, model8.rates)):
    S = size // os_
    for r in rates:
        h = valid_weight_histogram(S, r)
        print(f"  OS {os_:>2}, {S}x{S} map, rate {r:>2}: 9 -> {h[9]:.3f}   4 -> {h[4]:.3f}   1 -> {h[1]:.3f}")

# %% [markdown]
# ## Image pooling adds global context
#
# The pooling branch averages the whole map, so every position gets the same vector: a summary of the entire image
# (ParseNet's idea). Its output has no spatial variation at all:

# %%
small = build_deeplab(DeepLabConfig.small(), rng=rng).eval()
feats = small.backbone(rng.standard_normal((1, 3, 64, 64)).astype(np.float32))
pooled = small.head.aspp.pooling(feats)
print("pooling branch output shape:", pooled.shape, " spatial std per channel (max):", float(pooled.std(axis=(2, 3)).max()))

# %% [markdown]
# With it, every output pixel of the model depends on every input pixel; without it, a pixel near one corner only
# sees its neighbourhood. The exact regions (`receptive_field_region`, which follows every path and the image
# borders) for the corner logit of the small model on a 256×256 image: the widest atrous branch alone
# (backbone → rate-18 branch) versus the whole model.

# %%
size = 256
branch_path = nn.Sequential(small.backbone, small.head.aspp.branches[3])
regions = {"backbone + rate-18 branch": receptive_field_region(branch_path, size, position=(0, 0)),
           "whole model (with image pooling)": receptive_field_region(small, size, position=(0, 0))}
fig, axes = plt.subplots(1, 2, figsize=(7, 3.5))
for ax, (label, region) in zip(axes, regions.items()):
    ax.imshow(region.mask, cmap="Greens", vmin=0, vmax=1)
    ax.set_title(f"{label}\nbox {region.bbox}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
plt.show()

# %% [markdown]
# Note that the left region is exactly the backbone's own field at the corner: on the 16×16 feature map of a
# 256×256 image, rate 18 puts the outer taps of the 3×3 filter outside the map everywhere, so only the centre tap
# is valid. The computation skips those taps too: the convolution leaves out every tap that touches no real input,
# so the rate-18 branch costs one tap there instead of nine (its single tap covers the whole map and runs as one
# 1×1 product, the `kn2row` path; `docs/fast_paths.md`).

# %% [markdown]
# ## The textbook ASPP: the fork and the join
#
# `minideeplab.textbook.ASPP` is the diagram as code. In forward the features $x$ *fork* into five branches, and
# their outputs *join* in one concatenation before the projection:
#
# $$y = \text{project}\big(\text{concat}(b_1(x), \dots, b_4(x), \text{pool}(x))\big).$$
#
# Backward undoes each in reverse: the join's backward *splits* the gradient of the concatenation into one slice per
# branch, and, because all five branches read the same $x$, the fork's backward *sums* their input gradients,
# $\partial L/\partial x = \sum_b \partial L/\partial x\,\big|_b$.

# %%
import inspect
import time

from minideeplab import textbook

print(inspect.getsource(textbook.ASPP.forward))
print(inspect.getsource(textbook.ASPP.backward))

# %% [markdown]
# The image-pooling branch is a plain sequence (global average pool, 1×1 conv, BN, ReLU, upsample: `Sequential`'s
# backward runs them in reverse); only its forward adds the batch-size check:

# %%
print(inspect.getsource(textbook.ASPPPooling.forward))

# %% [markdown]
# The fast `ASPP` has the same branches, fork and join; its speed is in the layers (the atrous convolutions skip the
# taps that read padding). The same numbers, and the times, with the real model's widths at output stride 16 (1024
# channels in, 256 per branch, on a 16×16 map: a 256×256 image; float64, training mode, dropout off so that the
# comparison needs no shared random masks):

# %%
C_in, width, size = (64, 16, 8) if SHORT else (1024, 256, 16)
plain_aspp = textbook.ASPP(C_in, width, rates=(6, 12, 18), dropout=0.0, rng=rng, dtype=np.float64)
fast_aspp = ASPP(C_in, width, rates=(6, 12, 18), dropout=0.0, rng=rng, dtype=np.float64)
fast_aspp.load_state_dict(plain_aspp.state_dict())
x = rng.standard_normal((2, C_in, size, size))
dout = rng.standard_normal((2, width, size, size))
results = {}
for name, layer in (("textbook", plain_aspp), ("fast", fast_aspp)):
    layer.zero_grad()
    y = layer(x)
    results[name] = [y, layer.backward(dout)] + [p.grad.copy() for p in layer.parameters()]
worst = max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(results["textbook"], results["fast"]))
print(f"{len(results['fast'])} tensors (output, dx, every parameter gradient): worst relative difference {worst:.1e}")
print("fast branch paths:", [b.conv.path for b in fast_aspp.branches])


def step(layer):
    layer(x)
    layer.backward(dout)


for name, layer in (("textbook", plain_aspp), ("fast", fast_aspp)):
    times = []
    for _ in range(2 if SHORT else 5):
        t = time.perf_counter()
        step(layer)
        times.append(time.perf_counter() - t)
    print(f"{name:>8}: {1e3 * sorted(times)[len(times) // 2]:7.1f} ms forward+backward")

# %% [markdown]
# ## Gradient check of an ASPP module
#
# A small ASPP (8 input channels, branch width 4, rates (1, 2, 3), no dropout) in training mode with a batch of two
# (the pooling branch's batch norm needs more than one value per channel), against central differences.

# %%
aspp_small = ASPP(8, 4, rates=(1, 2, 3), dropout=0.0, rng=rng, dtype=np.float64)
result = check_module(aspp_small, rng.standard_normal((2, 8, 5, 5)), rng=rng)
print(f"{len(result.rows)} tensors checked, worst relative error {result.worst:.1e}, passed: {result.passed}")

# %% [markdown]
# ## Questions
#
# **Q1.** DeepLabV3 trains on 513×513 crops: the ASPP sees a 33×33 map at output stride 16 and a 65×65 map at output
# stride 8. For a 3×3 filter with rate 18, what fraction of the output positions have all 9 weights valid on each
# map (`valid_weight_histogram`)? Why does rate 18 at OS 8 keep more valid weights than at OS 16, and why does
# DeepLabV3 still double the rates (to 36) at OS 8?
#
# ### BEGIN SOLUTION
# **Answer.** On the 33×33 map **no** position has 9 valid weights (0.826 have 4, 0.165 have 2, 0.008 only 1): a row
# $i$ keeps both outer taps only if $i - 18 \ge 0$ and $i + 18 \le 32$, which no row satisfies. On the 65×65 map rows
# 18 to 46 keep all three taps, so **0.199** of the positions ($(29/65)^2$) have 9 valid weights (0.494 have 6, 0.307
# have 4). The rate is a gap in *feature-map* pixels: on a map twice as large the same gap is half as wide relative
# to the map, so fewer taps fall off. But at OS 8 each feature pixel covers 8 input pixels instead of 16, so rate 18
# would see only half the context in the image. Doubling to 36 restores the field in input pixels
# ($18 \cdot 16 = 36 \cdot 8 = 288$) and, with it, the same valid-weight pattern as rate 18 at OS 16 (rate 36 on the
# 65×65 map: again no position with 9 valid weights, 0.796 with 4).
# ### END SOLUTION
#
# **Q2.** On the 16×16 feature map of a 256×256 input at output stride 16, what does the rate-18 branch compute?
#
# ### BEGIN SOLUTION
# **Answer.** A 1×1 convolution: `valid_weight_histogram(16, 18)` puts **all** positions (fraction 1.0) at exactly 1
# valid weight, the centre tap; the 8 outer taps read padding everywhere, because the rate exceeds the map. The
# branch then adds no context beyond the 1×1 branch, which is why DeepLabV3 adds the image-pooling branch for global
# context instead of ever larger rates.
# ### END SOLUTION
#
# **Q3.** In `textbook.ASPP.backward`, why are the five branches' input gradients *added*, while the concatenation's
# gradient is *split*?
#
# ### BEGIN SOLUTION
# **Answer.** In forward, $x$ is read by five branches (a fork): $L$ depends on $x$ through each of them, so by the
# multivariable chain rule $\partial L/\partial x$ is the sum of the five paths' gradients. The concatenation (a
# join) places each branch's output in its own channel slice; each output affects $L$ only through its slice, so its
# gradient is that slice of the concatenation's gradient. Keeping one branch's input gradient instead of the sum
# loses the other four paths.
# ### END SOLUTION
