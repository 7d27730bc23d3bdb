# %% [markdown]
# # 2. Receptive field and output stride
#
# The design note's central point: a classification backbone shrinks its feature maps after every stage. DenseNet121
# without atrous convolution ends at **1/32** of the input (output stride 32), and position and detail are lost. With
# atrous (dilated) convolution in the last blocks the maps stay at 1/16 or 1/8 (output stride 16 or 8) *while the
# field of view stays about the same*, with no extra parameters. This notebook makes that concrete with numbers the
# package computes:
#
# * the **jump** $j$ (distance in input pixels between neighbouring units, the cumulative stride) and the
#   **receptive field** $r$ after each stage, with the recurrences of Araujo et al. (Distill, 2019):
#   $j_\text{out} = j_\text{in}\,s$ and $r_\text{out} = r_\text{in} + (k_\text{eff} - 1)\,j_\text{in}$, where
#   $k_\text{eff} = d(k-1)+1$;
# * the cost of each output stride;
# * the analytic field against the *empirical* one, measured by sending a gradient back through the real network.

# %%
%matplotlib inline
import os

import matplotlib.pyplot as plt
import numpy as np

from minideeplab.analysis import (empirical_receptive_field, output_stride_table, receptive_field,
                                  receptive_field_region)
from minideeplab.analysis.figures import STAGES, output_stride_figure
from minideeplab.gradcheck import check_module
from minideeplab.models import DenseBlock, deeplabv3_densenet121, densenet121
from minideeplab.nn import Sequential

SHORT = os.environ.get("MINIDEEPLAB_SHORT") == "1"
rng = np.random.default_rng(0)

# %% [markdown]
# ## Stage by stage: DenseNet121 at output stride 32, 16 and 8
#
# At OS 16 the last transition keeps its 1×1 convolution but drops its 2×2 average pooling, and the 3×3
# convolutions of block 4 get dilation 2; at OS 8 the same happens one stage earlier (block 3 dilation 2, block 4
# dilation 4). For a 512×512 input:

# %%
size = 512
nets = {os_: densenet121(output_stride=os_, rng=rng).eval() for os_ in (32, 16, 8)}
tables = {os_: receptive_field(net, size) for os_, net in nets.items()}
print(f"{'stage':<12}" + "".join(f"{'OS ' + str(o) + ': size / jump / RF':>28}" for o in tables))
for stage in STAGES:
    cells = []
    for t in tables.values():
        r = t.at(f"features.{stage}")
        cells.append(f"{r.size[0]:>3} / {r.jump[0]:>2} / {r.rf[0]:>5}")
    print(f"{stage:<12}" + "".join(f"{c:>28}" for c in cells))

# %% [markdown]
# The final jump equals the output stride, and the receptive field hardly moves: **2071, 2055 and 2047** pixels at
# OS 32, 16 and 8. Dilation 2 on a grid twice as fine covers the same input distance as no dilation on the coarse
# grid; the few pixels lost are the 2×2 average poolings that are no longer there.

# %%
fig = output_stride_figure(lambda os_: nets[os_], size)
fig

# %% [markdown]
# One stage in detail: the rows of the OS 16 table for the transitions and the block outputs. A block's output is a
# concatenation of every layer's features, so its row is a *join*: its field is the largest over the paths, and the
# note says which path (always the deepest layer, whose 3×3 convolutions are stacked on all the others).

# %%
names = [f"features.{s}" for s in STAGES]
print(tables[16].subset(names))

# %% [markdown]
# ## What it costs
#
# The parameters do not change with the output stride (dilation spreads the same 9 weights), but the later blocks
# and the whole head run on 4× more positions for every halving of the stride. Multiply-adds are counted from the
# convolution shapes, for the full DeepLabV3 at 512×512.

# %%
print(output_stride_table(lambda os_: deeplabv3_densenet121(output_stride=os_, rng=rng), 512))

# %% [markdown]
# ## Analytic vs empirical receptive field on the real DenseNet121
#
# `receptive_field_region` answers exactly which input pixels *can* influence one output unit (following every path,
# the image borders and the holes of dilated kernels). `empirical_receptive_field` measures which pixels *do*: it
# puts a unit gradient on one output unit and runs the hand-written backward pass to the input. The second can only
# be smaller (a ReLU that is off, or a max pool that picked another pixel, block the gradient).
#
# Every unit of the full DenseNet121 can see the whole of any image below about 1000 pixels, so both answers would
# be "everything". We take the network up to dense block 2 (field 255 pixels) and a corner unit, whose field is cut
# by the border, and the centre unit.

# %%
f = nets[16].features
upto_block2 = Sequential(*[getattr(f, n) for n in ("conv0", "norm0", "relu0", "pool0", "denseblock1", "transition1",
                                                    "denseblock2")])
size = 160 if SHORT else 320
for position in [(0, 0), None]:
    emp = empirical_receptive_field(upto_block2, size, position=position, rng=rng)
    region = receptive_field_region(upto_block2, size, position=emp.position)
    inside = not (emp.mask & ~region.mask).any()
    print(f"unit {emp.position} of the {emp.output_size} map: analytic box {region.bbox}, "
          f"non-zero gradient box {emp.bbox}, empirical inside analytic: {inside}")

# %% [markdown]
# ## Effective receptive fields
#
# Luo et al. (2016) observed that the gradient is far from uniform over the theoretical field: it concentrates in a
# roughly Gaussian blob around the centre. The heat maps show $|\partial y/\partial x|$ for the centre unit of
# DenseNet121 (random weights, evaluation mode) at the three output strides; the analytic region is the whole image.

# %%
size = 96 if SHORT else 224
fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
emps = {}
for ax, (os_, net) in zip(axes, nets.items()):
    emps[os_] = emp = empirical_receptive_field(net, size, rng=rng)
    ax.imshow(emp.grad_map / emp.grad_map.max(), cmap="magma")
    ax.set_title(f"OS {os_}: unit {emp.position} of {emp.output_size}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
plt.show()

# %% [markdown]
# A number for the blob: the radius around the unit's centre (from the table's `start + position * jump`) that holds
# half of the gradient's total magnitude, against the analytic field of 2000+ pixels.

# %%
for os_, emp in emps.items():
    final = receptive_field(nets[os_], size).final
    centre = np.array(final.start) + np.array(emp.position) * np.array(final.jump)
    rows, cols = np.indices(emp.grad_map.shape)
    dist = np.hypot(rows - centre[0], cols - centre[1]).ravel()
    order = np.argsort(dist)
    mass = np.cumsum(emp.grad_map.ravel()[order]) / emp.grad_map.sum()
    radius = dist[order][np.searchsorted(mass, 0.5)]
    print(f"OS {os_}: analytic field {final.rf[0]} px; half of |gradient| within {radius:.0f} px "
          f"of the unit's centre ({centre[0]:.0f}, {centre[1]:.0f})")

# %% [markdown]
# ## Gradient check
#
# The empirical field relies on the hand-written backward. What this notebook built on top of plain layers is the
# atrous dense block; here is one with dilation 2 against central differences (float64, batch norm in training mode).

# %%
block = DenseBlock(num_layers=2, num_input_features=4, bn_size=2, growth_rate=3, dilation=2, rng=rng,
                   dtype=np.float64)
result = check_module(block, rng.standard_normal((2, 4, 7, 7)), rng=rng)
print(f"{len(result.rows)} tensors, worst relative error {result.worst:.1e}, passed: {result.passed}")

# %% [markdown]
# ## Questions
#
# **Q1.** Going from output stride 32 to 16, which layers of DenseNet121 change, and why does the final receptive
# field shrink by exactly 16 pixels (2071 → 2055), and by 8 more at output stride 8 (2047)?
#
# ### BEGIN SOLUTION
# **Answer.** At OS 16 `transition3` keeps its 1×1 convolution but drops its 2×2 average pooling, and the 3×3
# convolutions of `denseblock4` get dilation 2. After the dropped pooling the jump stays 16 instead of 32, and a 3×3
# convolution with dilation 2 ($k_\text{eff} = 5$) at jump 16 adds $(5-1) \cdot 16 = 64$ pixels to the field,
# exactly what an undilated one adds at jump 32, $(3-1) \cdot 32 = 64$: every later layer adds the same amount. Only
# the pooling's own contribution disappears, $(k-1)\,j_\text{in} = 1 \cdot 16 = 16$ pixels. At OS 8 `transition2` loses its pooling too (jump 8
# there), which removes $1 \cdot 8 = 8$ more: 2055 − 8 = 2047.
# ### END SOLUTION
#
# **Q2.** For a 512×512 input, on how many positions does the ASPP head run at output stride 8 compared with 16, and
# how many more parameters does the OS 8 model have?
#
# ### BEGIN SOLUTION
# **Answer.** The backbone's map is 64×64 at OS 8 and 32×32 at OS 16: **4×** the positions, so every convolution
# of the head (and of the blocks after the dropped poolings) does 4× the multiply-adds. The parameter count is the
# same, **14,887,041** for both: dilation spreads the same 3×3 weights further apart, it adds none.
# ### END SOLUTION
#
# **Q3.** Why can the empirical receptive field (the pixels whose gradient is non-zero) only be smaller than the
# analytic region, never larger?
#
# ### BEGIN SOLUTION
# **Answer.** The analytic region is every pixel connected to the unit by *some* path through the layers, with the
# borders and the holes of dilated kernels taken into account; no gradient can reach a pixel outside it. Inside it,
# the gradient along a path can be exactly zero: a ReLU that is off, a max pool that selected another pixel, or
# contributions of several paths that cancel. So the set of pixels with a non-zero gradient is a subset of the region.
# ### END SOLUTION
