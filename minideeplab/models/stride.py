"""Switch a built (or trained) DeepLabV3 / DenseNet to another output stride, keeping its weights.

DeepLabV3 (Chen et al., 2017, Table 10) trains at output stride 16 and evaluates at 8: the same weights, with the
pooling of ``transition2`` dropped, the dilations of the later blocks and the ASPP rates doubled. Nothing that is
learnt depends on the output stride (a 2×2 average pool and a conv's dilation have no parameters), so the switch
only changes three kinds of geometry, by walking the module tree:

1. each ``features.transition{i}.pool``: a 2×2 average pool where the stride keeps it, an identity where it drops
   it (``densenet.POOLED``);
2. each 3×3 conv of ``features.denseblock{i}``: dilation = padding = the block's dilation (``densenet.DILATIONS``);
3. each atrous ASPP branch (``head.aspp.branches[1:]``): dilation = padding = rate × old stride / new stride.

Convolutions cache geometry-dependent index arrays (``Conv2d.index_arrays``: the "gather" path's indices are keyed
by the map sizes, not by the dilation), so every conv whose dilation changes forgets them, and every module forgets
what its last forward cached (``_clear_cache``): a backward must follow a forward at the new stride.
``model.config`` is updated to describe the model as it now is (its output stride and rates), so a checkpoint
saved afterwards rebuilds the switched model.

The textbook tier has its own plain ``set_output_stride`` methods (``minideeplab.textbook``; a test ties the two).
This walk needs only torchvision's names and the attributes ``pool``, ``dilation``, ``padding``, so it also accepts
a textbook model: a pooling put back into a transition is of the class the model already uses in ``transition1``
(pooled at every output stride), so a textbook model gets a textbook pool. ``min_input_size`` is recomputed: the
smallest input changes with the pools (13 px at 16, 5 at 8, 29 at 32).
"""
from __future__ import annotations

from dataclasses import replace

from ..nn import AvgPool2d, Identity
from .config import default_rates
from .densenet import DILATIONS, POOLED, check_output_stride, min_input_size


def _set_dilation(conv, dilation: int) -> None:
    """A 3×3 conv's dilation and padding (= dilation, keeping the map size), and its geometry caches dropped."""
    if tuple(conv.dilation) == (dilation, dilation):
        return
    conv.dilation = conv.padding = (int(dilation), int(dilation))
    cache = getattr(conv, "index_arrays", None)
    if isinstance(cache, dict):
        cache.clear()


def _replace_child(parent, name: str, module) -> None:
    """``parent.<name> = module`` keeping the children's order (forward and state_dict follow it)."""
    children = list(parent._modules.items())
    parent._modules.clear()
    for key, child in children:
        setattr(parent, key, module if key == name else child)


def scaled_rates(rates, old_stride: int, new_stride: int) -> tuple:
    """ASPP rates at ``new_stride`` that cover the same input extent as ``rates`` at ``old_stride``:
    rate × old / new, which must be a whole number (a ValueError otherwise)."""
    out = []
    for r in rates:
        if (r * old_stride) % new_stride:
            raise ValueError(f"set_output_stride: ASPP rate {r} at output stride {old_stride} becomes "
                             f"{r * old_stride / new_stride:g} at {new_stride}, not a whole number of pixels")
        out.append(r * old_stride // new_stride)
    return tuple(out)


def set_output_stride(model, output_stride: int, *, avg_pool=None, identity=Identity):
    """Switch ``model`` (a ``DeepLabV3`` or a ``DenseNet``) to ``output_stride`` in place, keeping every weight and
    running statistic; returns the model. Switching back restores the original network exactly.

    Shapes: unchanged interface: x (N, 3, H, W) -> logits (N, C, H, W); the feature map becomes about
    H / output_stride.

    Args:
        model: the network (its ``backbone.features`` or ``features`` must have torchvision's DenseNet names).
        output_stride: 8, 16 or 32.
        avg_pool: the class of the 2×2 stride-2 average pool put back into a transition (``avg_pool(2, 2)``);
            default: the class of ``transition1.pool`` (``nn.AvgPool2d`` in the fast tier, the textbook's there).
        identity: the class that stands in for a dropped pooling.
    """
    new = check_output_stride(output_stride)
    backbone = getattr(model, "backbone", model)
    old = check_output_stride(backbone.output_stride)
    features = backbone.features
    if avg_pool is None:
        avg_pool = type(features.transition1.pool)
        if isinstance(features.transition1.pool, identity):       # not a DenseNet of minideeplab's layout
            avg_pool = AvgPool2d
    rates = None
    aspp = getattr(getattr(model, "head", None), "aspp", None)
    if aspp is not None:
        rates = scaled_rates(aspp.rates, old, new)      # checked before anything changes
    for i, keep in enumerate(POOLED[new], start=1):
        transition = getattr(features, f"transition{i}")
        if keep != (not isinstance(transition.pool, identity)):
            _replace_child(transition, "pool", avg_pool(2, 2) if keep else identity())
    for i, dilation in enumerate(DILATIONS[new], start=1):
        block = getattr(features, f"denseblock{i}")
        block.dilation = dilation
        for layer in block.children():
            _set_dilation(layer.conv2, dilation)
    backbone.output_stride = new
    if hasattr(backbone, "min_input_size"):
        backbone.min_input_size = min_input_size(features)
    if aspp is not None:
        for branch, rate in zip(list(aspp.branches)[1:], rates):
            _set_dilation(branch.conv, rate)
        aspp.rates = model.rates = rates
        model.output_stride = new
        if hasattr(model, "min_input_size"):
            model.min_input_size = min_input_size(features)
        config = getattr(model, "config", None)
        if config is not None:
            keep_default = config.rates is None and rates == default_rates(new)
            model.config = replace(config, output_stride=new, rates=None if keep_default else rates)
    for m in model.modules():
        m._clear_cache()
    return model
