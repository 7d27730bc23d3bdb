# %% [markdown]
# # 6. Training DeepLabV3 on synthetic shapes
#
# Everything comes together: the DenseNet backbone with atrous blocks, ASPP with image pooling, a binary head, the
# BCE + Dice loss, AdamW with a poly schedule. We train on `SyntheticShapes`, images where the foreground is defined
# by texture and shape (not colour), watch the curves and the predictions, and compare output strides.
#
# The package's `Trainer` runs the loop (the same one `minideeplab train` uses); this notebook uses the small
# configuration (`DeepLabConfig.small`: growth 8, blocks (2, 2, 2, 2)) so that it trains on a CPU in minutes. In the
# quick mode (`MINIDEEPLAB_SHORT=1`) every run is only a few steps: the curves then show the mechanics, not a trained
# model.

# %%
%matplotlib inline
import os

import matplotlib.pyplot as plt
import numpy as np

from minideeplab.data import SyntheticShapes
from minideeplab.data.transforms import denormalize
from minideeplab.gradcheck import check_module
from minideeplab.models import DeepLabConfig, build_deeplab
from minideeplab.nn import BatchNorm2d
from minideeplab.plots import overlay
from minideeplab.train import TrainConfig, Trainer

SHORT = os.environ.get("MINIDEEPLAB_SHORT") == "1"

# %% [markdown]
# ## The data
#
# Each item is an ImageNet-normalised image (3, H, W) and a {0, 1} mask (1, H, W). Item $i$ depends only on
# (seed, $i$), so the validation set is fixed.

# %%
data = SyntheticShapes(4, size=96, seed=0)
fig, axes = plt.subplots(2, 4, figsize=(10, 5))
for i in range(4):
    image, mask = data[i]
    axes[0, i].imshow(denormalize(image))
    axes[1, i].imshow(mask[0], cmap="gray")
    axes[0, i].set_title(f"image {i}, {mask.mean():.0%} foreground", fontsize=9)
for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
plt.show()

# %% [markdown]
# ## Training
#
# `TrainConfig` holds the whole run; `Trainer.fit()` trains, evaluates on the validation set after each epoch, and
# returns the history. A callback records the running training loss after every step.

# %%
if SHORT:
    settings = dict(image_size=48, epochs=2, train_size=8, val_size=4, batch_size=4)
else:
    settings = dict(image_size=64, epochs=6, train_size=160, val_size=32, batch_size=8)
cfg = TrainConfig(model="small", output_stride=16, lr=3e-3, warmup_steps=5, seed=0, **settings)
print(cfg)
trainer = Trainer(cfg, out_dir=None, progress=False, log=print, figures=False)
step_losses = []
trainer.on_step_end = lambda t: step_losses.append(t.running["loss_sum"] / t.running["count"])
history = trainer.fit()

# %%
fig, (ax_step, ax_iou) = plt.subplots(1, 2, figsize=(10, 3.5))
ax_step.plot(np.arange(1, len(step_losses) + 1), step_losses)
ax_step.set(xlabel="step", ylabel="running mean of the epoch's loss", title=f"loss ({cfg.loss})")
epochs = [row["epoch"] for row in history]
ax_iou.plot(epochs, [row["train_iou"] for row in history], "o-", label="train (running)")
ax_iou.plot(epochs, [row["val_iou"] for row in history], "o-", label="validation")
ax_iou.set(xlabel="epoch", ylabel="IoU", ylim=(0, 1), title="foreground IoU")
ax_iou.legend()
for ax in (ax_step, ax_iou):
    ax.grid(alpha=0.3)
plt.show()

# %% [markdown]
# ## Predictions
#
# `model.eval()` switches batch norm to its running statistics and turns dropout off; `predict_proba` is the sigmoid
# of the logits, `predict` thresholds it at 0.5.

# %%
model = trainer.model.eval()
images, masks = zip(*(trainer.val_set[i] for i in range(4)))
images, masks = np.stack(images), np.stack(masks)
probs = model.predict_proba(images)
pred = model.predict(images)
fig, axes = plt.subplots(4, 4, figsize=(9, 9))
for i in range(4):
    img = denormalize(images[i])
    for ax, shown, title in zip(axes[i], (img, masks[i, 0], probs[i, 0], overlay(img, pred[i, 0])),
                                ("image", "ground truth", "probability", "prediction")):
        ax.imshow(shown, cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
plt.show()
print("validation metrics of the last epoch:", {k: round(v, 4) for k, v in history[-1].items() if k.startswith("val")})

# %% [markdown]
# ## Comparing output strides
#
# The same run at output stride 32, 16 and 8: a smaller stride keeps finer feature maps (notebook 2) at a higher
# cost per step. One seed and a few epochs, as here, cannot tell an effect from the noise of one run; the
# committed experiment below can.

# %%
results = {}
for os_ in (32, 16, 8):
    run = Trainer(TrainConfig(model="small", output_stride=os_, lr=3e-3, warmup_steps=5, seed=0,
                              **{**settings, "epochs": 1 if SHORT else 3}), progress=False, figures=False)
    h = run.fit()
    results[os_] = (h[-1]["val_iou"], h[-1]["val_loss"], sum(r["seconds"] for r in h) / run.global_step)
print(f"{'OS':>3} {'val IoU':>8} {'val loss':>9} {'s / step':>9}   (this notebook: one seed)")
for os_, (iou, loss, sec) in results.items():
    print(f"{os_:>3} {iou:>8.3f} {loss:>9.4f} {sec:>9.3f}")

# %% [markdown]
# Over three seeds the effect is clear. `minideeplab experiment output-stride` (committed in
# `docs/experiments/output-stride/`, shown in notebook 2) trains the same small model at 32, 16 and 8 on
# `shapes-fine`, thin structures where resolution matters, 12 epochs, seeds 0-2, and `minideeplab experiment
# eval-stride` evaluates the OS 16 weights at 8 as well (DeepLabV3's "train 16, eval 8"). The committed numbers:

# %%
from minideeplab.experiment_report import committed_results, read_results, summarize

for name, names, baseline in (("output-stride", ["OS 32", "OS 16", "OS 8"], "OS 32"),
                              ("eval-stride", ["train 16, eval 16", "train 16, eval 8", "train 8, eval 8"],
                               "train 16, eval 16")):
    stats = summarize(read_results(committed_results(name) / "results.csv"), names, baseline)
    print(f"{name} (paired differences from {baseline}):")
    for v in names:
        iou, b = stats[v]["iou"], stats[v]["boundary_iou"]
        paired = "" if v == baseline else (f"   Δ IoU {iou['diff_mean']:+.3f} ± {iou['diff_std']:.3f}, higher in "
                                            f"{iou['wins']}/{iou['seeds']} seeds")
        print(f"    {v:<18} IoU {iou['mean']:.3f} ± {iou['std']:.3f}   Boundary IoU {b['mean']:.3f} ± {b['std']:.3f}"
              + paired)

# %% [markdown]
# IoU 0.083 ± 0.010 at OS 32, 0.215 ± 0.012 at OS 16 and 0.339 ± 0.008 at OS 8, in that order in every seed (OS 8 −
# OS 32: +0.256 ± 0.004); Boundary IoU 0.045, 0.146, 0.277. The OS 16 weights evaluated at OS 8 gain +0.057 ± 0.002
# IoU (3/3 seeds) for free, less than training at 8 (+0.124 ± 0.008); with DenseNet121 the same switch was not shown
# (`docs/experiments.md`: recall rises, contours suffer), and training at 8 is what helped. An earlier version of
# this notebook called the differences of its one-seed comparison noise; three paired seeds show an effect in every
# seed. (The experiment runs on `shapes-fine`, built so that resolution matters; the one-seed run above, on the
# default `shapes`, measures the cost per step, not the size of the effect.)

# %% [markdown]
# ## Training the textbook model
#
# `minideeplab.textbook` holds the same network in its plainest form (im2col convolutions, batch norms that step
# backward through the mean and the variance, a concatenation before every dense layer; `docs/fast_paths.md`). It
# has the fast model's state-dict keys, and from the same Generator the same initial weights, so it trains with the
# package's optimizers, saves with `io.save` and loads into the fast model (and back). `Trainer` builds the fast
# model; the textbook one trains with a plain loop. Below both train side by side from the same weights on
# the same batch (the dropout masks are the same too: both draw them from a Generator in the same state): the same
# losses, step by step, up to float32 rounding, at a higher cost per step.

# %%
import time

from minideeplab import textbook
from minideeplab.losses import BCEWithLogitsLoss
from minideeplab.optim import AdamW

size, batch, steps = (48, 4, 3) if SHORT else (64, 8, 15)
shapes = SyntheticShapes(batch, size=size, seed=1)
images, masks = (np.stack(a) for a in zip(*(shapes[i] for i in range(batch))))
small = DeepLabConfig.small()
runs = {}
for name, build, loss_fn in (("textbook", textbook.build_deeplab, textbook.BCEWithLogitsLoss()),
                             ("fast", build_deeplab, BCEWithLogitsLoss())):
    net = build(small, rng=np.random.default_rng(0))
    opt = AdamW(net.parameters(), lr=3e-3)
    values, seconds = [], []
    for _ in range(steps):
        start = time.perf_counter()
        opt.zero_grad()
        loss = loss_fn(net(images), masks)
        net.backward(loss_fn.backward(), input_grad=False)
        opt.step()
        seconds.append(time.perf_counter() - start)
        values.append(float(loss))
    runs[name] = (values, seconds)
print(f"{'step':>4} {'textbook loss':>14} {'fast loss':>10}")
for i, (a, b) in enumerate(zip(runs["textbook"][0], runs["fast"][0])):
    print(f"{i + 1:>4} {a:>14.6f} {b:>10.6f}")
for name, (_, seconds) in runs.items():
    print(f"{name:>8}: {np.median(seconds):.3f} s per step (median; batch {batch}x3x{size}x{size}, small config)")

# %% [markdown]
# On the real model (DenseNet121, output stride 16, batch 2×3×256×256, one CPU) `minideeplab bench --os 16
# --textbook` times the textbook model's training step beside the fast one's (benchmarks/README.md, "The textbook
# model").

# %% [markdown]
# ## Gradient flow: watching every layer with hooks
#
# Does the gradient reach the first layers, or fade on the way back through 90 layers? Every module accepts
# PyTorch's hooks: `register_forward_hook(hook(module, inputs, output))` runs after the module's forward,
# `register_full_backward_hook(hook(module, grad_input, grad_output))` after its backward (`grad_output[0]` is
# dL/d(output), `grad_input[0]` dL/d(input)); each returns a handle whose `remove()` takes the hook away, or use it in
# a `with` block. They fire for every layer of the fast model too: a fused BN → ReLU → 1×1 conv head whose layers
# carry hooks runs them one by one, with the same numbers (`docs/gradient_flow.md`). A first look, at one dense
# layer of a fresh model:

# %%
from minideeplab.analysis.flow import format_records, plot_activation_histograms, plot_gradient_flow, record_step

fresh = Trainer(cfg, out_dir=None, progress=False, figures=False).model   # the trained model's starting point
flow_images, flow_masks = (np.stack(a) for a in zip(*(trainer.train_set[i] for i in range(cfg.batch_size))))
dense_layer = fresh.backbone.features.denseblock2.denselayer1
handles = []
for name, child in dense_layer.named_children():
    handles.append(child.register_forward_hook(
        lambda m, inputs, out, name=name: print(f"forward  {name:<6} {type(m).__name__:<12} output {out.shape}")))
    handles.append(child.register_full_backward_hook(
        lambda m, grad_in, grad_out, name=name: print(f"backward {name:<6} |dL/d(output)| = "
                                                      f"{np.linalg.norm(grad_out[0]):.4f}")))
fresh.zero_grad()
trainer.loss_fn(fresh(flow_images), flow_masks)
fresh.backward(trainer.loss_fn.backward(), input_grad=False)
for handle in handles:
    handle.remove()

# %% [markdown]
# `analysis.flow.record_step` does this for every layer: one forward and backward on a batch, and per layer the
# statistics of its output (mean, std, fraction of zeros, a histogram), of dL/d(output), and of its parameters'
# gradient (`update_ratio` = |dL/dW| / |W|: how large a plain SGD step is relative to the weights, per unit of
# learning rate). It changes nothing in the model (no optimizer step, batch-norm statistics put back). Below: the
# same batch through the model at initialisation and after training, the norm of dL/d(output) of each layer along
# depth (log scale; the loss is on the right, the stem on the left).

# %%
at_init = record_step(fresh.train(), flow_images, flow_masks, trainer.loss_fn)
after = record_step(trainer.model.train(), flow_images, flow_masks, trainer.loss_fn)
trainer.model.eval()
fig, axes = plt.subplots(3, 1, figsize=(11, 11), sharex=True)
plot_gradient_flow(at_init, axes[0], title=f"at initialisation (loss {at_init.loss:.3f})")
plot_gradient_flow(after, axes[1], title=f"after training (loss {after.loss:.3f})")
plot_gradient_flow(after, axes[2], quantity="update_ratio", title="after training: |dL/dW| / |W| per layer")
fig.tight_layout()
plt.show()
print(format_records(after, every=6))

# %%
fig = plt.figure(figsize=(13, 5))
plot_activation_histograms(after, fig, names=["backbone.features.conv0", "backbone.features.relu0",
                                              "backbone.features.denseblock2.denselayer1.norm1",
                                              "backbone.features.denseblock2.denselayer1.relu1",
                                              "backbone.features.denseblock4.denselayer2.conv2",
                                              "head.aspp.concat", "head.classifier", "upsample"])
plt.show()

# %% [markdown]
# The dense connections are clearest in the real DenseNet-121, whose blocks hold 6 to 24 layers: each layer's new
# channels are read by every later layer of its block, so dL/d(its output) is the sum of what all those readers send
# back (the sum at the concatenation, `DenseBlock.backward`). One step of a fresh DeepLabV3-DenseNet121 on two of
# the training images, the RMS of dL/d(output) of each dense layer (its last conv) by position in its block:

# %%
from minideeplab.models import deeplabv3_densenet121

big = deeplabv3_densenet121(rng=np.random.default_rng(0))
big_flow = record_step(big, flow_images[:2, :, :64, :64], flow_masks[:2, :, :64, :64], trainer.loss_fn,
                       layers=lambda name, m: ".denselayer" in name and name.endswith(".conv2"))
fig, ax = plt.subplots(figsize=(7, 3.5))
for b in range(1, 5):
    rms = [r.grad_rms for r in big_flow if f"denseblock{b}." in r.name]
    ax.semilogy(np.arange(1, len(rms) + 1), rms, "o-", ms=3, label=f"denseblock{b} ({len(rms)} layers)")
ax.set(xlabel="dense layer (position in its block)", ylabel="RMS of dL/d(new features)",
       title="DenseNet-121 at initialisation: earlier layers have more readers")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
plt.show()
for b in range(1, 5):
    rms = [r.grad_rms for r in big_flow if f"denseblock{b}." in r.name]
    print(f"denseblock{b}: first layer / last layer = {rms[0] / rms[-1]:.1f}, sqrt(layers) = {np.sqrt(len(rms)):.1f}")

# %% [markdown]
# What to read from these plots:
#
# * **No vanishing gradient.** From the classifier back to the stem, |dL/d(output)| stays within about one order of
#   magnitude, and the first conv receives a gradient as large as the last layers of the backbone (the logits' own
#   gradient, far right, is smaller: the loss averages over every pixel). Two mechanisms show: every batch norm
#   rescales the gradient by $\gamma/\sigma$ of its input (the steps at each BN), and within a dense block every
#   layer's features reach the block's output directly through the concatenation, a path of no layers at all (the
#   short paths of DenseNet), whatever the depth of the block.
# * **The sum at the concatenation.** In the DenseNet-121 plot the first layers of a block get a larger gradient than
#   the last ones: the first layer has all the others as readers, the last one only what follows the block. How
#   much larger is printed below the plot: a factor of about 2 to 3.5 here, less than $\sqrt{L}$ in the long blocks
#   (at initialisation, on one batch: a picture of one step, not a law).
# * **The fork in ASPP.** The backbone's output is read by five branches, and its gradient is the sum of theirs.
# * **After training** the gradients are smaller (the loss is lower), with the same profile along depth; the update
#   ratios show which layers move most per step: the stem conv, the 3×3 convs and the classifier, more than the
#   batch norms. In the quick mode (`MINIDEEPLAB_SHORT=1`) the "after" model has trained a few steps only.
# * **Activations**: after each batch norm mean 0 and std 1 (while γ and β are near their initial 1 and 0), after
#   each ReLU about half of the values are 0: no layer is dead (a ReLU with ~100% zeros would pass no gradient).

# %% [markdown]
# ## Gradient check of the whole model
#
# The tiny DeepLabV3 (float64, training mode, a batch of two) against central differences: every parameter of the
# backbone, the ASPP and the classifier. Two details make a whole-model check meaningful:
#
# * the batch-norm parameters are set to random values first: with the default initialisation ($\beta = 0$) a
#   channel's scale $\gamma$ that feeds the next training-mode batch norm cancels out, its true gradient is zero, and
#   the check would compare rounding noise with rounding noise;
# * ReLU and max pooling have kinks. A central difference whose $\pm\varepsilon$ step straddles one measures the
#   average of two slopes, not the derivative, and with thousands of activations some step may cross one. Instead of
#   hunting for a seed whose steps cross none, the check is made robust: a small step ($\varepsilon = 10^{-6}$, in
#   float64) makes crossings rare, and `kink_aware=True` detects the rest by their one-sided differences,
#   $(L(\theta+\varepsilon)-L(\theta))/\varepsilon$ and $(L(\theta)-L(\theta-\varepsilon))/\varepsilon$: they agree
#   where the loss is smooth and differ by the jump in slope across a kink, and then the central difference is off by
#   half that jump, while the exact derivative equals the difference on the kink-free side. An entry that fails, with
#   one-sided differences that disagree and the exact value at one end of them, is left out and counted (`kinks`).
#   Whether a step straddles a kink depends only on the loss, not on the backward under test, so a wrong backward
#   still fails on every entry whose steps cross none (and at a kink where it matches neither side);
#   `tests/test_gradcheck_kinks.py` plants one (every ReLU leaking 1 % of its gradient) and the check fails.

# %%
check_rng = np.random.default_rng(0)
tiny = build_deeplab(DeepLabConfig.small(dropout=0.0), rng=check_rng, dtype=np.float64)
for m in tiny.modules():
    if isinstance(m, BatchNorm2d):
        m.weight.data[...] = check_rng.uniform(0.5, 1.5, m.weight.shape)
        m.bias.data[...] = check_rng.normal(0.0, 0.5, m.bias.shape)
result = check_module(tiny, check_rng.standard_normal((2, 3, 32, 32)), rng=check_rng, samples=3 if SHORT else 6,
                      rtol=1e-5, eps=1e-6, kink_aware=True)
print(f"{len(result.rows)} tensors checked, worst relative error {result.worst:.1e}, "
      f"{result.kinks} entries left out at a kink, passed: {result.passed}")

# %% [markdown]
# ## Questions
#
# **Q1.** Why does the ASPP image-pooling branch refuse a batch of one image in training mode, but accept it in eval
# mode?
#
# ### BEGIN SOLUTION
# **Answer.** After global average pooling each image contributes one value per channel, so the batch norm behind
# it sees $N$ values per channel. With $N = 1$ the batch variance is 0 and the normalised value $(x - \mu)/\sqrt{0 +
# \epsilon}$ is exactly 0 whatever the image: the branch would output a constant and pass no gradient to the 1×1
# convolution before it. In eval mode the batch norm uses its running statistics, so one image is fine.
# ### END SOLUTION
#
# **Q2.** The textbook and the fast model, started from the same weights, give the same loss step after step (up
# to float32 rounding) although dropout is on. What besides the weights has to be identical for that?
#
# ### BEGIN SOLUTION
# **Answer.** Everything random or stateful that touches the forward pass: the dropout masks (both models draw them
# from a NumPy Generator in the same state, in the same order and on the host), the batch (the same images and
# masks), the batch-norm running statistics (they only matter in eval mode, but both update them the same way), and
# the optimizer state (AdamW's moments start at zero in both). Any difference would show as a diverging loss.
# ### END SOLUTION
#
# **Q3.** Why are the batch-norm parameters set to random values before the whole-model gradient check?
#
# ### BEGIN SOLUTION
# **Answer.** With the default initialisation ($\gamma = 1$, $\beta = 0$) a channel's scale $\gamma$ that feeds
# another batch norm in training mode cancels out (the next normalisation divides it away), so its true gradient is
# zero and the check would compare rounding noise with rounding noise. Random $\gamma$ and $\beta$ (and a non-zero
# $\beta$ before each ReLU) give every parameter a gradient the check can measure.
# ### END SOLUTION
