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

from IPython.display import Image, Markdown, display

from minideeplab.analysis import (empirical_receptive_field, output_stride_table, receptive_field,
                                  receptive_field_region)
from minideeplab.analysis.figures import STAGES, output_stride_figure
from minideeplab.experiment_report import committed_results, read_results, summarize
from minideeplab.gradcheck import check_module
from minideeplab.models import DenseBlock, DenseNet, deeplabv3_densenet121, densenet121
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
# ## What it buys: output stride 32 / 16 / 8, measured over three seeds
#
# The cost is certain; the benefit is a claim about accuracy, so it is measured: `minideeplab experiment
# output-stride` trains the small model (`DeepLabConfig.small`) at output stride 32, 16 and 8 on `shapes-fine`,
# synthetic images of thin lines, dots, spikes and stars whose edges are a few pixels wide (96 px, 320 training
# images, 12 epochs), with three seeds. Every stride of one seed starts from the same initial weights, data and
# augmentation, so the per-seed differences are paired comparisons. Besides IoU it reports two metrics of the edges
# (`minideeplab.metrics.BoundaryMeter`): **Boundary IoU**, the IoU of the pixels within 3 px of each mask's contour,
# and **trimap IoU**, the IoU counted only in a band of width w around the true contour (DeepLab's protocol).
# The committed results (`docs/experiments/output-stride/`, with the command and the machine):

# %%
folder = committed_results("output-stride")
display(Markdown((folder / "summary.md").read_text().split("\n", 2)[2]))     # without its title

# %%
rows = read_results(folder / "results.csv")
stats = summarize(rows, ["OS 32", "OS 16", "OS 8"], "OS 32")
for v in ("OS 16", "OS 8"):
    for k, label in (("iou", "IoU"), ("boundary_iou", "Boundary IoU")):
        st = stats[v][k]
        print(f"{v} - OS 32, {label:<12}: {st['diff_mean']:+.3f} ± {st['diff_std']:.3f} "
              f"(per seed {' '.join(f'{d:+.3f}' for d in st['diffs'])}; higher in {st['wins']}/{st['seeds']})")
display(Image(filename=str(folder / "metrics.png")), Image(filename=str(folder / "trimap.png")))

# %% [markdown]
# The effect is large and shows in every seed: IoU 0.083 ± 0.010, 0.215 ± 0.012 and 0.339 ± 0.008 at OS 32, 16 and 8
# (OS 8 − OS 32: +0.256 ± 0.004, 3/3 seeds), Boundary IoU 0.045, 0.146 and 0.277. At OS 32 a 96×96 image gives a
# 3×3 grid of logits, and bilinear upsampling of a 3×3 grid cannot draw a 2-pixel line: the model barely learns the
# data. The trimap curves are nearly flat (OS 8: 0.41 at a 1-pixel band, 0.35 at 16 px; OS 32: 0.13 and 0.09), and
# the gap between strides is about the same at every band width, so the finer stride gains everywhere near the
# objects, not only on the contour; these objects are so thin that most of their area *is* near a contour. The
# side-by-side predictions of the first validation images (seed 0) show it, and how far from solved the data are: at
# OS 32 nothing or a blob, at OS 16 blobs where the objects are, at OS 8 pieces of the lines and the bodies of the
# stars and spikes; no stride draws a 2-pixel line whole after 12 epochs of this small model.

# %%
display(Image(filename=str(folder / "predictions.png")))

# %% [markdown]
# The same pipeline runs here live, in its quick configuration (32 px, one epoch, 8 training images, one seed: it
# shows the mechanics in seconds, its numbers mean nothing). `minideeplab experiment output-stride` reproduces the
# committed table (about 5 minutes on an idle 2-core CPU).

# %%
import tempfile
from pathlib import Path

from minideeplab.experiments import DEFAULTS, EXPERIMENTS, QUICK, run

quick_out = Path(tempfile.mkdtemp()) / "output-stride"
quick_rows = run(EXPERIMENTS["output-stride"], {**DEFAULTS, **QUICK, "device": "cpu"}, [0], quick_out,
                 "minideeplab experiment output-stride --quick --seeds 1", progress=False)
for r in quick_rows:
    print(f"{r['variant']:<6} IoU {r['iou']:.3f}  Boundary IoU {r['boundary_iou']:.3f}  "
          f"train {r['train_s_per_step']:.3f} s/step  step peak {r['step_peak_mib']:.1f} MiB")

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
# ### Through a dilated block
#
# Dense blocks 1 and 2 have no dilation, so the check above says nothing about the atrous part. The real
# DenseNet121's dilated blocks see more than any image we can afford here (24 and 16 layers), so we take the small
# backbone of `DeepLabConfig.small` (growth 8, two layers per block) up to `denseblock3`: at output stride 16 its 3×3
# convolutions run undilated at jump 16; at output stride 8 `transition2` drops its pooling and the same
# convolutions run with dilation 2 at jump 8. Each 3×3 layer then adds $(k_\text{eff}-1)\,j = (5-1) \cdot 8 = 32$
# pixels to the field, as the undilated one adds $(3-1) \cdot 16 = 32$: the same field on a grid twice as fine.
# The empirical field (a unit gradient from the centre unit back to the input) against the analytic region:

# %%
size = 160
for os_ in (16, 8):
    small_net = DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, bn_size=2,
                         output_stride=os_, rng=np.random.default_rng(1)).eval()
    f8 = small_net.features
    upto = Sequential(*[getattr(f8, n) for n in ("conv0", "norm0", "relu0", "pool0", "denseblock1", "transition1",
                                                 "denseblock2", "transition2", "denseblock3")])
    row = receptive_field(upto, size).final
    emp = empirical_receptive_field(upto, size, rng=rng)
    region = receptive_field_region(upto, size, position=emp.position)
    print(f"OS {os_:>2}, denseblock3 dilation {f8.denseblock3.denselayer1.conv2.dilation[0]}: map {emp.output_size}, "
          f"jump {row.jump[0]}, field {row.rf[0]} px; unit {emp.position}: analytic box {region.bbox} "
          f"({int(region.mask.sum())} px), non-zero gradient box {emp.bbox} ({int(emp.mask.sum())} px), "
          f"inside: {not (emp.mask & ~region.mask).any()}")

# %% [markdown]
# The dilated block sees as far as the undilated one on a grid twice as fine (a 20×20 map instead of 10×10): 127
# against 135 pixels, the 8 pixels of difference being the dropped pooling's own contribution, $(2-1) \cdot 8$
# (question Q1). Through the dilated convolutions and the hand-written backward, the gradient reaches the edges of
# the analytic box and never leaves the analytic region; inside it, all but a handful of pixels get a non-zero
# gradient (the few exceptions: ReLUs that are off for this input).

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
def half_mass_radius(emp, final):
    """Radius around the unit's centre holding half of sum |dy/dx| (pixels)."""
    centre = np.array(final.start) + np.array(emp.position) * np.array(final.jump)
    rows, cols = np.indices(emp.grad_map.shape)
    dist = np.hypot(rows - centre[0], cols - centre[1]).ravel()
    order = np.argsort(dist)
    mass = np.cumsum(emp.grad_map.ravel()[order]) / emp.grad_map.sum()
    return dist[order][np.searchsorted(mass, 0.5)], centre


for os_, emp in emps.items():
    final = receptive_field(nets[os_], size).final
    radius, centre = half_mass_radius(emp, final)
    print(f"OS {os_}: analytic field {final.rf[0]} px; half of |gradient| within {radius:.0f} px "
          f"of the unit's centre ({centre[0]:.0f}, {centre[1]:.0f})")

# %% [markdown]
# This radius is not a property of the network alone: it **depends on the input size**. The analytic field (2055 px
# at OS 16) is larger than any of these images, so the gradient spreads until the image borders cut it off; on a
# small image a large share of it is cut off, and half of what remains lies closer to the centre. The same OS 16
# network, the centre unit, at several input sizes:

# %%
for s_ in ((64, 96) if SHORT else (64, 96, 160, 224, 320)):
    emp = empirical_receptive_field(nets[16], s_, rng=rng)
    radius, _ = half_mass_radius(emp, receptive_field(nets[16], s_).final)
    print(f"input {s_:>3}x{s_:<3}: map {emp.output_size}, half of |gradient| within {radius:4.1f} px of the centre")

# %% [markdown]
# The radius grows with the image (about 19 px at 64×64, 28 at 96, 36 at 160, 40 at 224, 41 at 320 with these
# random weights, in the full run), and only levels off once the image is several times the radius: quote an
# effective field with the input size it was measured at.

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
