"""DenseNet-BC (Huang et al., 2017) as an atrous backbone with output stride 8, 16 or 32.

Names follow torchvision's ``densenet121`` exactly (``features.conv0.weight``,
``features.denseblock1.denselayer1.norm1.running_mean``, ``features.transition1.conv.weight``,
``features.norm5.bias``, ...), so ImageNet weights load without renaming.
"""
from __future__ import annotations

import numpy as np

from ..backend import can_read, fuse, get_array_module
from ..nn import AvgPool2d, BatchNorm2d, Conv2d, Identity, MaxPool2d, Module, ReLU, Sequential
from ..nn.functional import check_input, conv_output_size
from ..nn.fused import BNReLUConv1x1
from ..nn.norm import batch_statistics

OUTPUT_STRIDES = (8, 16, 32)
# per output stride: which of the three transitions keep their 2×2 pooling, and the dilation of each dense block
POOLED = {32: (True, True, True), 16: (True, True, False), 8: (True, False, False)}
DILATIONS = {32: (1, 1, 1, 1), 16: (1, 1, 1, 2), 8: (1, 1, 2, 4)}


def check_output_stride(output_stride) -> int:
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")
    return int(output_stride)


def min_input_size(module: Module) -> int:
    """The smallest image side (pixels) for which every conv and pool of ``module`` has an output of at least one
    pixel: its layers walked in order, each with its output-size formula (``conv_output_size``). Exact for a
    network whose layers run one after the other, as a DenseNet's do (its dense layers keep the size).

    For DenseNet (7x7/2 stem conv, 3x3/2 max pool, then a 2x2/2 average pool in each pooled transition): 5, 13
    and 29 pixels at output stride 8, 16 and 32."""
    layers = [(m.kernel_size, m.stride, m.padding, getattr(m, "dilation", (1, 1))) for m in module.modules()
              if isinstance(m, (Conv2d, MaxPool2d, AvgPool2d))]

    def fits(side: int, axis: int) -> bool:
        for kernel, stride, padding, dilation in layers:
            side = conv_output_size(side, kernel[axis], stride[axis], padding[axis], dilation[axis])
            if side < 1:
                return False
        return True
    return max(next(s for s in range(1, 1 << 16) if fits(s, axis)) for axis in (0, 1))


def min_input_size_for(output_stride: int) -> int:
    """``min_input_size`` of a DenseNet at ``output_stride`` (any widths and depths: only the stem and the
    pooled transitions change the size), computed once from a tiny one."""
    output_stride = check_output_stride(output_stride)
    if output_stride not in _MIN_SIZES:
        tiny = DenseNet(growth_rate=1, block_config=(1, 1, 1, 1), num_init_features=2, bn_size=1,
                        output_stride=output_stride, rng=np.random.default_rng(0))
        _MIN_SIZES[output_stride] = tiny.min_input_size
    return _MIN_SIZES[output_stride]


_MIN_SIZES: dict = {}


def check_input_size(layer: str, x, minimum: int, output_stride: int) -> None:
    """ValueError naming ``layer`` when the image ``x`` (N, C, H, W) has a side below ``minimum``."""
    H, W = x.shape[2], x.shape[3]
    if H < minimum or W < minimum:
        raise ValueError(f"{layer}: input of {H}x{W} pixels is too small at output stride {output_stride}: the "
                         f"network needs at least {minimum}x{minimum} (its stem and pooling layers halve the size "
                         f"until the last pooling has a pixel); use larger images or a smaller output stride")


class _Named(Sequential):
    """A Sequential whose children have names (``norm1``, ``conv``, ...) instead of indices."""

    def __init__(self, **children: Module):
        super().__init__()
        for name, m in children.items():
            self.add_module(name, m)


class _FusedHead(_Named):
    """A ``_Named`` whose first three children (BatchNorm2d → ReLU → 1×1 Conv2d) run as one ``BNReLUConv1x1``,
    and in eval mode a BatchNorm2d fourth child too (folded into the same GEMM).

    Same parameters, same result (up to float rounding) and same gradients as running them one by one, which it
    does while ``fused`` is False (``set_fused(model, False)``: e.g. to watch each of the three layers' forward),
    and while one of those layers (or the folded norm2) carries a hook (``nn/hooks.py``): hooks see each layer's
    real input, output and gradients.
    """

    fused = True

    def _fuse_head(self):
        norm, _, conv, *rest = self.children()
        post = rest[0] if rest and isinstance(rest[0], BatchNorm2d) else None   # DenseLayer's norm2
        self.fused_head = BNReLUConv1x1(norm, conv, post)
        self.head_was_fused = None      # which way the last forward went

    def forward(self, x, stats=None):
        """``stats``: the batch statistics of ``x`` when the caller has them already (see ``SharedBatchStatistics``)."""
        norm, relu, conv = list(self.children())[:3]
        post = self.fused_head.post
        # a hook on a layer of the head (or on norm2, folded in eval) must see it run: then layer by layer
        hooked = norm._hooks or relu._hooks or conv._hooks or (post is not None and post._hooks)
        # locals: no_grad threads may run this at once (nn.threads)
        fused = self.head_was_fused = bool(self.fused) and not hooked
        x = self.fused_head.forward(x, stats) if fused else conv(relu(norm(x, stats)))
        for m in self._after_head(fused and self.fused_head.folds()):
            x = m(x)
        return x

    def backward(self, dout):
        dout = self._backward_after_head(dout)
        if self.head_was_fused:
            return self.fused_head.backward(dout)
        norm, relu, conv = list(self.children())[:3]
        return norm.backward(relu.backward(conv.backward(dout)))

    def backward_terms(self, dout):
        """``(sg, scale, mean_d, k)``: dL/dx = sg - scale * (mean_d + k * centered), centered = x - batch mean,
        sg = scale * g with g = dL/d(first batch norm's output) (``BatchNorm2d.backward_terms``; training mode).
        For ``DenseBlock.backward``, which applies them. The fused head gets sg from its GEMM for free, and
        sum(g · centered), which the batch norm needs, from its weight gradient's GEMM (``norm_sums``)."""
        norm, head = next(self.children()), self.fused_head
        # the scaled variant divides by the scales: only when none is 0. The head's usual path (no upper bound)
        # has checked that they are all positive; else it takes a host read
        scaled = self.head_was_fused and (head.hi is None or can_read(head.scale) and bool((head.scale != 0).all()))
        g = self._grad_at_norm_output(dout, scaled)
        scale, mean_d, k = norm.backward_terms(g, scaled, head.norm_sums(g, scaled) if self.head_was_fused else None)
        if not scaled:
            g *= scale[:, None, None]
        return g, scale, mean_d, k

    def _grad_at_norm_output(self, dout, scaled=False):
        """dL/d(first batch norm's output), times its scale if ``scaled`` (fused head only)."""
        dout = self._backward_after_head(dout)
        if self.head_was_fused:
            return self.fused_head.grad_at_norm_output(dout, scaled)
        _, relu, conv = list(self.children())[:3]
        return relu.backward(conv.backward(dout))

    def _backward_after_head(self, dout):
        """dL/d(head's output): back through the children after the head, last child first (chain rule)."""
        self._need(self.head_was_fused)
        for m in reversed(self._after_head(self.head_was_fused and self.fused_head.folded)):
            dout = m.backward(dout)
        return dout

    def _after_head(self, folded: bool):
        """The children after norm → relu → conv, less norm2 when the head folded it in (``folded``)."""
        rest = list(self.children())[3:]
        return rest[1:] if folded else rest

    def _clear_cache(self):
        self.fused_head.clear_cache()
        self.head_was_fused = None
        for m in self.children():   # the fused head ran the batch norms without their __call__ (no_grad clears here)
            m._clear_cache()


def set_fused(model, fused: bool = True):
    """Run every dense layer's and transition's BN → ReLU → 1×1 conv fused (default) or layer by layer."""
    for m in model.modules():
        if isinstance(m, _FusedHead):
            m.fused = bool(fused)
    return model


class DenseLayer(_FusedHead):
    """BN → ReLU → 1×1 conv (bottleneck, ``bn_size * growth_rate``) → BN → ReLU → 3×3 conv (``growth_rate``).

    Returns only the *new* features; the block appends them to its buffer. ``norm1`` reads a channel-prefix
    view of that buffer, which is safe because no layer here writes to its input except the ReLUs, which
    (``inplace=True``, as in torchvision) overwrite the fresh output of the batch norm before them.
    norm1 → relu1 → conv1 run fused (``nn.fused.BNReLUConv1x1``: one pass over the prefix, one GEMM).

    Shapes:
        x: (N, C_in, H, W) -> new: (N, growth_rate, H, W) (padding = dilation keeps H, W).

    Args:
        num_input_features: C_in.
        growth_rate: channels added by this layer (k in the paper).
        bn_size: bottleneck width factor.
        dilation: dilation (and padding) of the 3×3 conv: 1, or 2/4 in atrous blocks.
        rng, dtype: parameter initialisation and dtype.

    Textbook twin: ``minideeplab.textbook.DenseLayer``, the six layers in a row. This one runs norm1 → relu1 → conv1
    fused (and norm2 folded in too in eval), takes the block's shared batch statistics, and its 3×3 conv runs kn2row:
    68 ms against the textbook's 126 forward+backward (224 -> 32 channels at 64x64, batch 2, one thread,
    benchmarks/textbook_layers.py).
    """

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, dilation: int = 1,
                 rng: np.random.Generator | None = None, dtype=np.float32):
        mid = bn_size * growth_rate
        super().__init__(
            norm1=BatchNorm2d(num_input_features, dtype=dtype), relu1=ReLU(inplace=True),
            conv1=Conv2d(num_input_features, mid, 1, bias=False, rng=rng, dtype=dtype),
            norm2=BatchNorm2d(mid, dtype=dtype), relu2=ReLU(inplace=True),
            conv2=Conv2d(mid, growth_rate, 3, padding=dilation, dilation=dilation, bias=False, rng=rng, dtype=dtype))
        self._fuse_head()   # norm1 → relu1 → conv1 as one pass and one GEMM (forward takes the block's ``stats``)


class SharedBatchStatistics:
    """Batch mean, variance and centred values of a dense block's buffer, each channel computed once.

    Every ``norm1`` in a block normalises a prefix of the same buffer, and in training mode a channel's batch
    mean and variance do not depend on which layer asks (only gamma and beta differ). Computed by each layer
    itself, channel c of the block input would be centred and reduced once per layer, and every layer would
    keep its own centred copy of its whole prefix for backward (memory growing with the square of the number
    of layers). Here the statistics of each channel are computed the first time a layer reads it, into one
    buffer the size of the block's output; each ``norm1`` receives views of it. The gradients are unchanged:
    each batch norm's backward still differentiates through its own mean and variance.

    Shapes: buf: (N, C_total, H, W); ``prefix(c)`` -> (centered (N, c, H, W), mean (c,), var (c,)).
    """

    def __init__(self, buf):
        xp = get_array_module(buf)
        self.buf, self.done = buf, 0
        self.centered = xp.empty(buf.shape, dtype=buf.dtype)
        self.mean = xp.empty(buf.shape[1], dtype=buf.dtype)
        self.var = xp.empty(buf.shape[1], dtype=buf.dtype)

    def prefix(self, c: int):
        if c > self.done:                     # channels appended since the last call
            new = slice(self.done, c)
            batch_statistics(self.buf[:, new], out=(self.centered[:, new], self.mean[new], self.var[new]))
            self.done = c
        return self.centered[:, :c], self.mean[:c], self.var[:c]


class DenseBlock(Module):
    """``num_layers`` DenseLayers, each seeing the concatenation of the block input and all earlier outputs.

    Memory-efficient concatenation: instead of ``concat([x, f1, ..., f_{l-1}])`` before every layer (L copies
    of a growing tensor, O(L²) memory traffic), forward allocates ONE buffer of ``C_in + L*growth_rate``
    channels, copies ``x`` into its first ``C_in`` channels, and each layer l reads the prefix
    ``buffer[:, :C_in + (l-1)*k]`` (a view, no copy) and writes its k new channels into its own slice.
    The buffer is the block's output. (torchvision's ``memory_efficient`` option reaches a similar
    saving by recomputing the concatenations in backward; here they are never materialised at all.)
    In training mode the ``norm1`` layers likewise share one ``SharedBatchStatistics`` of the buffer, and
    backward applies the part of their gradients that multiplies the shared centred values once per channel
    instead of once per layer (see ``backward``). A layer that, or whose ``norm1``, carries a hook (``nn/hooks.py``)
    runs its plain backward instead, so that the hook sees its real gradients: the same numbers.

    Shapes:
        x: (N, C_in, H, W) -> out: (N, C_in + num_layers * growth_rate, H, W).

    Args:
        num_layers, num_input_features, bn_size, growth_rate: as in the paper / torchvision.
        dilation: dilation of every 3×3 conv in the block (atrous blocks at output stride 16/8).
        rng, dtype: parameter initialisation and dtype.

    Textbook twin: ``minideeplab.textbook.DenseBlock``, which concatenates everything so far before every layer and,
    going backwards, splits the gradient slice by slice and sums each layer's dx into the slices it read. This block
    gets the same numbers from one buffer, shared statistics and the norm1 terms applied once per channel: block 1
    of densenet121 at 64x64 (batch 2, one thread) trains in 295 ms against the textbook's 614 forward+backward (293
    against 528 in eval; benchmarks/textbook_layers.py), and its concatenations copy 1 block output where the
    textbook's copy L (docs/index.md, "Memory-efficient dense block").
    """

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 dilation: int = 1, rng: np.random.Generator | None = None, dtype=np.float32):
        super().__init__()
        self.num_input_features, self.growth_rate = int(num_input_features), int(growth_rate)
        self.num_layers, self.dilation = int(num_layers), int(dilation)
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(num_input_features + i * growth_rate, growth_rate,
                                                             bn_size, dilation, rng=rng, dtype=dtype))
        self.out_channels = self.num_input_features + self.num_layers * self.growth_rate
        self.buffer_shape = None   # shape of the concatenation buffer of the last forward
        self.shared = None         # its SharedBatchStatistics (training mode)

    def forward(self, x):
        check_input("DenseBlock", x, self.num_input_features)
        xp = get_array_module(x)
        N, C0, H, W = x.shape
        buf = xp.empty((N, self.out_channels, H, W), dtype=x.dtype)   # the one concatenation buffer
        buf[:, :C0] = x
        shared = SharedBatchStatistics(buf) if self.training else None
        self.shared = shared        # backward applies the norm1s' centered terms once per channel
        c = C0
        for layer in self.children():
            stats = shared.prefix(c) if shared is not None else None
            buf[:, c:c + self.growth_rate] = layer(buf[:, :c], stats)   # read prefix view, write own slice
            c += self.growth_rate
        self.buffer_shape = buf.shape
        return buf

    def backward(self, dout):
        self._need(self.buffer_shape)
        # ONE gradient buffer for the whole concatenation. Channel slice [c, c+k) of `grad` is dL/d(output of the
        # layer that wrote it). Each later layer read a prefix containing that slice, so the slice's full gradient
        # is the *sum* of dout's slice and the dx contributions of every later layer: going backwards through the
        # layers, layer l's gradient is complete when we reach it (the split: it takes its own slice), and its dx,
        # a gradient for the whole prefix it read, is *added* into grad[:, :c] (the sum at the concatenation).
        grad = dout.copy()   # a copy: dout is never modified
        shared = self.shared
        if shared is not None:
            # training: each norm1's dx = scale * (g - mean_d - k * centered), with ONE centered for the block.
            # scale * g (sg) is added at once; the per-channel terms mean_d and k are summed over the layers in two
            # vectors and applied to a slice just before its layer reads it (once per channel, not per layer).
            xp = get_array_module(dout)
            sum_mean = xp.zeros(self.out_channels, dtype=dout.dtype)
            sum_k = xp.zeros(self.out_channels, dtype=dout.dtype)
        c = self.out_channels
        for layer in reversed(list(self.children())):
            c -= self.growth_rate
            own = grad[:, c:c + self.growth_rate]
            if shared is not None and c < shared.done:     # read by a later layer (the last one's output by none)
                _apply_deferred(own, shared.centered[:, c:c + self.growth_rate], sum_mean[c:c + self.growth_rate],
                                sum_k[c:c + self.growth_rate])
            if shared is None or layer._hooks or layer.norm1._hooks:
                # the layer's whole backward, its norm1's mean terms included (hooks on it or its norm1 see the
                # real gradients; the deferred terms of the other layers are linear and add up the same)
                grad[:, :c] += layer.backward(own)
                continue
            sg, scale, mean_d, k = layer.backward_terms(own)
            grad[:, :c] += sg
            if k is not None:       # None: this norm1 ran in eval mode (frozen batch norm), dx = scale * g
                _add_scaled(sum_mean[:c], sum_k[:c], scale, mean_d, k)
        C0 = self.num_input_features
        if shared is not None:
            _apply_deferred(grad[:, :C0], shared.centered[:, :C0], sum_mean[:C0], sum_k[:C0])
        return grad[:, :C0].copy()   # dL/dx; the copy lets the big buffer be freed

    def _clear_cache(self):
        self.buffer_shape = self.shared = None

    def extra_repr(self):
        return (f"num_layers={self.num_layers}, in={self.num_input_features}, growth_rate={self.growth_rate}, "
                f"dilation={self.dilation}")


def _apply_deferred(g, centered, sum_mean, sum_k):
    """g -= sum_mean + sum_k * centered, per channel: the batch-mean terms of the norm1 gradients summed over
    the layers that read these channels (``DenseBlock.backward``)."""
    _subtract_terms(g, centered, sum_mean[:, None, None], sum_k[:, None, None])


@fuse
def _subtract_terms(g, centered, sum_mean, sum_k):
    """g -= sum_mean + sum_k · centered, in place (one pass on a GPU; on NumPy one temporary)."""
    t = centered * sum_k
    t += sum_mean
    g -= t


@fuse
def _add_scaled(sum_mean, sum_k, scale, mean_d, k):
    """sum_mean += scale · mean_d and sum_k += scale · k, in place (one kernel on a GPU)."""
    sum_mean += scale * mean_d
    sum_k += scale * k


class Transition(_FusedHead):
    """BN → ReLU → 1×1 conv (``num_output_features``, usually half) → 2×2 average pool, stride 2.

    With ``pool=False`` (atrous variants) the pooling is an ``Identity`` and the resolution is kept.

    Textbook twin: ``minideeplab.textbook.Transition``, the four layers in a row; here BN → ReLU → 1×1 conv run fused
    (``nn.fused.BNReLUConv1x1``): transition 1 (256 -> 128 at 64x64) in 37 ms against 61 forward+backward.

    Shapes:
        x: (N, C_in, H, W) -> out: (N, C_out, floor(H/2), floor(W/2)), or (N, C_out, H, W) without pooling.
    """

    def __init__(self, num_input_features: int, num_output_features: int, pool: bool = True,
                 rng: np.random.Generator | None = None, dtype=np.float32):
        super().__init__(norm=BatchNorm2d(num_input_features, dtype=dtype), relu=ReLU(inplace=True),
                         conv=Conv2d(num_input_features, num_output_features, 1, bias=False, rng=rng, dtype=dtype),
                         pool=AvgPool2d(2, 2) if pool else Identity())
        self._fuse_head()   # norm → relu → conv as one pass and one GEMM


class DenseNet(Module):
    """DenseNet-BC feature extractor (no classifier) with a configurable output stride.

    Output stride 32 is the plain network. 16: ``transition3`` keeps BN-ReLU-conv but drops its pooling and
    ``denseblock4`` uses dilation 2. 8: ``transition2`` and ``transition3`` drop their pooling,
    ``denseblock3`` uses dilation 2 and ``denseblock4`` dilation 4. The receptive field of each 3×3 conv after
    a dropped pooling is thereby kept the same as in the plain network (DeepLab's atrous trick).
    As torchvision's forward does, ``norm5`` is followed by a ReLU (``relu5``).

    Shapes:
        x: (N, 3, H, W) -> features: (N, C, H', W'), C = 1024 for densenet121, H' ≈ H / output_stride
        (conv0 and pool0 round up, each 2×2 average pool rounds down).

    Args:
        growth_rate, block_config, num_init_features, bn_size: torchvision's meaning.
        output_stride: 8, 16 or 32.
        rng: ``numpy.random.Generator`` for the He-normal conv init (BN: weight 1, bias 0).
        dtype: parameter dtype (float32 for training, float64 for gradient checks).

    Textbook twin: ``minideeplab.textbook.DenseNet``: the same modules, names, output-stride rules and (from the same
    Generator) initial weights; the speed is all in the blocks and layers above.
    """

    def __init__(self, growth_rate: int = 32, block_config=(6, 12, 24, 16), num_init_features: int = 64,
                 bn_size: int = 4, output_stride: int = 32, rng: np.random.Generator | None = None,
                 dtype=np.float32):
        super().__init__()
        self.output_stride = check_output_stride(output_stride)
        block_config = tuple(int(b) for b in block_config)
        if len(block_config) != 4:
            raise ValueError(f"DenseNet: block_config must have 4 blocks (output strides are defined by its 3 "
                             f"transitions), got {block_config}")
        rng = rng if rng is not None else np.random.default_rng()
        pooled, dilations = POOLED[self.output_stride], DILATIONS[self.output_stride]
        self.block_config, self.growth_rate = block_config, int(growth_rate)
        features = _Named(
            conv0=Conv2d(3, num_init_features, 7, stride=2, padding=3, bias=False, rng=rng, dtype=dtype),
            norm0=BatchNorm2d(num_init_features, dtype=dtype), relu0=ReLU(inplace=True),
            pool0=MaxPool2d(3, stride=2, padding=1))
        c = num_init_features
        for i, n in enumerate(block_config):
            features.add_module(f"denseblock{i + 1}", DenseBlock(n, c, bn_size, growth_rate, dilations[i],
                                                                 rng=rng, dtype=dtype))
            c += n * growth_rate
            if i < len(block_config) - 1:
                features.add_module(f"transition{i + 1}", Transition(c, c // 2, pooled[i], rng=rng, dtype=dtype))
                c //= 2
        features.add_module("norm5", BatchNorm2d(c, dtype=dtype))
        features.add_module("relu5", ReLU(inplace=True))
        self.features = features
        self.out_channels = c
        self.min_input_size = min_input_size(features)

    def forward(self, x):
        check_input("DenseNet", x, self.features.conv0.in_channels)
        check_input_size("DenseNet", x, self.min_input_size, self.output_stride)
        out = self.features(x)
        self._forward_done()
        return out

    def backward(self, dout):
        self._backward_start()
        return self.features.backward(dout)

    def set_output_stride(self, output_stride: int) -> DenseNet:
        """Switch to ``output_stride`` keeping the weights; see ``models.set_output_stride``."""
        from .stride import set_output_stride
        return set_output_stride(self, output_stride)

    def extra_repr(self):
        return f"output_stride={self.output_stride}, out_channels={self.out_channels}"


def densenet121(output_stride: int = 32, rng: np.random.Generator | None = None, dtype=np.float32) -> DenseNet:
    """DenseNet-121 features (growth 32, blocks (6, 12, 24, 16), 64 initial features, bn_size 4): 1024 channels."""
    return DenseNet(32, (6, 12, 24, 16), 64, 4, output_stride=output_stride, rng=rng, dtype=dtype)
