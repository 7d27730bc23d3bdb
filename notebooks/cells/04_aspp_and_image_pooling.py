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

from IPython.display import Image, Markdown, display

from minideeplab import nn, textbook
from minideeplab.analysis import receptive_field, receptive_field_region, valid_weight_histogram
from minideeplab.analysis.figures import valid_weights_figure
from minideeplab.experiment_report import committed_results, read_results, summarize
from minideeplab.experiments import EXPERIMENTS, resolve_variants
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
# Does that add anything the convolutional branches do not already see? It depends on the model. In the **small
# model** (`DeepLabConfig.small`, two layers per block) it does: the exact regions (`receptive_field_region`, which
# follows every path and the image borders) for the corner logit on a 256×256 image, the widest atrous branch alone
# (backbone → rate-18 branch) versus the whole model, which has image pooling:

# %%
size = 256
branch_path = nn.Sequential(small.backbone, small.head.aspp.branches[3])
print(f"small backbone's analytic field: {receptive_field(small.backbone, size).final.rf[0]} px; DenseNet121's "
      f"at OS 16: {tables[16].at('backbone').rf[0]} px; its branches': "
      f"{[tables[16].at(n).rf[0] for n in names]} px")
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
# In the small model, then, image pooling is what makes the corner logit depend on the whole image; without it the
# corner pixel sees only its neighbourhood: a field is centred on its unit, so the small backbone's 263 px reach
# only about half of that, some 130 px, into the image from a corner. That is a property of the small model, not of
# DeepLabV3: in **DenseNet121** every branch's analytic field (2055 to 2631 px at OS 16, printed above) is more than
# twice a 512-pixel image, so even the corner logit covers the whole image, and every logit depends on every input
# pixel with or without image pooling. What image pooling adds there is not reach but weighting: the mean over the map weighs every position
# alike, while a convolution's effective field concentrates near its centre (notebook 2).
#
# Note that the left region is exactly the backbone's own field at the corner: on the 16×16 feature map of a
# 256×256 image, rate 18 puts the outer taps of the 3×3 filter outside the map everywhere, so only the centre tap
# is valid. The computation skips those taps too: the convolution leaves out every tap that touches no real input,
# so the rate-18 branch costs one tap there instead of nine (its single tap covers the whole map and runs as one
# 1×1 product, the `kn2row` path; `docs/fast_paths.md`).
#
# A numeric check of that claim with the real model's weights: the rate-18 convolution of DenseNet121's ASPP
# (1024 → 256 channels) on a 16×16 map, computed by the textbook convolution (all nine taps, eight of them reading
# zero padding) and by the fast one, against a 1×1 convolution that uses only the centre tap, `weight[:, :, 1, 1]`,
# written out as one product (float64):

# %%
w18 = aspp.branches[3].conv.weight.data.astype(np.float64)          # (256, 1024, 3, 3), rate 18
x16 = rng.standard_normal((1, w18.shape[1], 16, 16))
centre_only = np.einsum("oc,nchw->nohw", w18[:, :, 1, 1], x16)     # the 1x1 convolution with the centre tap
for label, Conv in (("textbook Conv2d (9 taps)", textbook.Conv2d), ("fast nn.Conv2d", nn.Conv2d)):
    conv = Conv(w18.shape[1], w18.shape[0], 3, padding=18, dilation=18, bias=False, dtype=np.float64)
    conv.weight.data[...] = w18
    y = conv(x16)
    rel = float(np.abs(y - centre_only).max() / np.abs(centre_only).max())
    print(f"{label:<25} vs centre tap only: max relative difference {rel:.1e} (float64 eps {np.finfo(float).eps:.1e})")
    assert rel < 1e-12
changed = rng.standard_normal(w18.shape[:2])                         # the outer taps' values do not matter:
conv.weight.data[:, :, 0, 0] = changed                                # change one of them...
print("after changing the top-left tap's weights, max |change| of the output:",
      float(np.abs(conv(x16) - y).max()))                               # ... and nothing moves

# %% [markdown]
# ## Does image pooling help? Measured over three seeds
#
# Reach is an analytic property; whether the model *uses* it is measured. `minideeplab experiment aspp` trains the
# small model on `shapes-context`: red and blue shapes, where a shape is foreground when its colour matches a frame
# drawn around the image (6 px wide at 96 px), 10 to 40 pixels away from the shapes. A window around a shape that
# does not reach the frame cannot tell its class. Five heads, each with three seeds, every head of one seed from the
# same data and initial draws (96 px, 320 training images, 16 epochs; the feature map is 6×6 at output stride 16):
# the 1×1 branch alone, 1×1 + image pooling, ASPP with rates that fit the map (1, 2, 3) without and with image
# pooling, and image pooling with rates (6, 12, 18) (DeepLabV3's own, already too large for a 6×6 map: every
# off-centre tap reads padding, so those branches are 1×1 convolutions in disguise, as checked above).
# The committed results (`docs/experiments/aspp/`):

# %%
folder = committed_results("aspp")
display(Markdown((folder / "summary.md").read_text().split("\n", 2)[2]))

# %%
rows = read_results(folder / "results.csv")
variants, _ = resolve_variants(EXPERIMENTS["aspp"], {"image_size": 96})
v = [x.name for x in variants]       # 1x1 only, 1x1 + pooling, ASPP fit, ASPP fit + pooling, ASPP large + pooling
for label, with_, without in (("image pooling added to the 1x1 branch", v[1], v[0]),
                              ("image pooling added to ASPP (1, 2, 3)", v[3], v[2]),
                              ("ASPP (1, 2, 3) instead of the 1x1 branch, no pooling", v[2], v[0]),
                              ("rates (6, 12, 18) instead of (1, 2, 3), with pooling", v[4], v[3])):
    st = summarize(rows, [with_], without)[with_]
    print(f"{label}:")
    for k, name in (("iou", "IoU"), ("boundary_iou", "Boundary IoU")):
        print(f"    {name:<12} {st[k]['diff_mean']:+.3f} ± {st[k]['diff_std']:.3f}   per seed "
              f"{' '.join(f'{d:+.3f}' for d in st[k]['diffs'])}   higher in {st[k]['wins']}/{st[k]['seeds']}")
display(Image(filename=str(folder / "metrics.png")))

# %% [markdown]
# What shows and what does not, with the committed numbers:
#
# * **Image pooling added to a 1×1 head: +0.123 ± 0.045 IoU, higher in 3/3 seeds** (Boundary IoU +0.043 ± 0.021).
#   The gain is precision (0.48 → 0.66): the model stops marking the shapes of the other colour, which only the frame
#   can tell apart. Where nothing else reaches the cue, the pooled summary carries it.
# * **Added to ASPP (1, 2, 3): +0.021 ± 0.023, positive in 3/3 seeds but small** (two of the three gains are ≤ 0.011;
#   the mean is about one standard deviation): not established by three seeds. On a 6×6 map the atrous branches
#   already reach most of the map: ASPP without pooling gains +0.178 ± 0.032 over the 1×1 head, more than pooling.
# * **Rates too large for the map did not hurt: +0.010 ± 0.025 IoU above the fitting rates (2/3 seeds).** The
#   design note's "too-large rates lose their valid weights" is true of the weights (the check above: those branches
#   *are* 1×1 convolutions), but it cost no accuracy here: with image pooling carrying the cue, these data need no
#   3×3 reach, and four 1×1 branches + pooling beat one 1×1 branch + pooling by +0.086 ± 0.032 IoU: width, not
#   reach, separates those two heads. Showing the loss would need data where context a few feature pixels away
#   matters and no global cue does.

# %%
display(Image(filename=str(folder / "predictions.png")))

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
