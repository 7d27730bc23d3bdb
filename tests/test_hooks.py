"""Module hooks (nn/hooks.py): they fire for every module of the fast and the textbook model, fused heads and
deferred batch-norm terms included, change nothing when they return None, replace what they return, and go away."""
import copy
from collections import Counter

import numpy as np
import pytest

from minideeplab import nn, textbook
from minideeplab.backend import as_captured
from minideeplab.losses import BCEWithLogitsLoss
from minideeplab.models import DeepLabConfig, build_deeplab
from minideeplab.models.densenet import DenseLayer, _FusedHead
from minideeplab.nn.module import Module

KINDS = ("forward_pre", "forward", "backward_pre", "backward")


def firing(model):
    """The modules with a forward and a backward of their own: every module but a plain ``ModuleList`` (a list of
    parallel branches, which has neither; ``Sequential`` is a ModuleList with both)."""
    return [(n, m) for n, m in model.named_modules() if type(m).forward is not Module.forward]


def watch(modules):
    """Counting hooks of all four kinds on ``modules``; returns (counts by kind, handles, what backward hooks saw)."""
    counts, handles, grads = {k: Counter() for k in KINDS}, [], {}

    def counter(kind, name):
        def hook(module, *args):
            counts[kind][name] += 1
            if kind == "backward":
                grads[name] = args[0]
        return hook
    for name, m in modules:
        handles += [m.register_forward_pre_hook(counter("forward_pre", name)),
                    m.register_forward_hook(counter("forward", name)),
                    m.register_full_backward_pre_hook(counter("backward_pre", name)),
                    m.register_full_backward_hook(counter("backward", name))]
    return counts, handles, grads


def build(tier, dtype=np.float64):
    builder = textbook.build_deeplab if tier == "textbook" else build_deeplab
    return builder(DeepLabConfig.small(), rng=np.random.default_rng(0), dtype=dtype)


def one_step(model, x, target):
    """Forward, BCE, backward: (logits, loss, every parameter gradient, every buffer)."""
    loss_fn = BCEWithLogitsLoss()
    model.zero_grad()
    logits = model(x).copy()
    loss = float(loss_fn(logits, target))
    dx = model.backward(loss_fn.backward())
    return (logits, loss, dx, {n: p.grad.copy() for n, p in model.named_parameters()},
            {n: np.array(b, copy=True) for n, b in model.named_buffers()})


def batch(dtype=np.float64, size=40):
    rng = np.random.default_rng(5)
    return (rng.standard_normal((2, 3, size, size)).astype(dtype),
            (rng.random((2, 1, size, size)) < 0.3).astype(dtype))


def assert_close(a, b, what, rtol=1e-9):
    """Equal to float64 rounding, relative to the tensor's largest entry (a gradient may have entries near 0)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, what
    scale = max(float(np.abs(b).max()), 1e-300)
    assert float(np.abs(a - b).max()) <= rtol * scale, f"{what}: differs by {np.abs(a - b).max():.3g} (scale {scale:.3g})"


def assert_same_step(hooked, plain):
    logits, loss, dx, grads, buffers = hooked
    assert_close(logits, plain[0], "logits")
    assert loss == pytest.approx(plain[1], rel=1e-12)
    assert_close(dx, plain[2], "dL/dx")
    assert grads.keys() == plain[3].keys()
    for name in grads:
        assert_close(grads[name], plain[3][name], name)
    for name in buffers:
        assert_close(buffers[name], plain[4][name], name)


def heads(model):
    return [m for m in model.modules() if isinstance(m, _FusedHead)]


# -- every module fires, with the same numbers ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fast_model_every_module_fires_once_and_numbers_are_unchanged(mode):
    x, target = batch()
    plain_model, hooked_model = build("fast"), build("fast")
    for m in (plain_model, hooked_model):
        m.train(mode == "train")
    plain = one_step(plain_model, x, target)
    assert all(h.head_was_fused for h in heads(plain_model))    # the reference ran the fused heads...
    if mode == "eval":
        assert all(h.fused_head.folded for h in heads(plain_model) if isinstance(h, DenseLayer))
    modules = firing(hooked_model)
    counts, handles, grads = watch(modules)
    hooked = one_step(hooked_model, x, target)
    assert not any(h.head_was_fused for h in heads(hooked_model))    # ...the hooked one each layer on its own
    names = [n for n, _ in modules]
    for kind in KINDS:   # every module with a forward/backward, leaves and containers, exactly once per step
        assert counts[kind] == Counter(names), kind
    assert len(names) == 116 == len(list(hooked_model.modules())) - 1    # all but aspp.branches (a ModuleList)
    assert len(grads["head.aspp.concat"]) == 5         # Concat: one input gradient per branch
    assert grads["backbone.features.denseblock1.denselayer1.norm1"][0].shape == (2, 16, 10, 10)
    assert_same_step(hooked, plain)
    for h in handles:
        h.remove()
    again = one_step(hooked_model, x, target)          # no hooks: fused again
    assert all(h.head_was_fused for h in heads(hooked_model))
    assert sum(counts["forward"].values()) == len(names)
    assert again[0].shape == plain[0].shape


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_textbook_model_every_module_fires_once_and_numbers_are_unchanged(mode):
    x, target = batch()
    plain_model, hooked_model = build("textbook"), build("textbook")
    for m in (plain_model, hooked_model):
        m.train(mode == "train")
    plain = one_step(plain_model, x, target)
    modules = firing(hooked_model)
    counts, _, grads = watch(modules)
    hooked = one_step(hooked_model, x, target)
    names = [n for n, _ in modules]
    for kind in KINDS:
        assert counts[kind] == Counter(names), kind
    assert len(names) == 115 and "head.aspp.concat" not in names   # the textbook ASPP concatenates inline
    assert_same_step(hooked, plain)


def test_hooks_on_dense_layers_only_keep_the_fused_forward_and_run_the_plain_backward():
    """A backward hook on a DenseLayer (not on its children): the forward stays fused, the block runs that layer's
    whole backward instead of the deferred norm1 terms, and the numbers stay those of the deferred path."""
    x, target = batch()
    plain_model, hooked_model = build("fast"), build("fast")
    plain = one_step(plain_model, x, target)
    layers = [(n, m) for n, m in hooked_model.named_modules() if isinstance(m, DenseLayer)]
    counts, _, grads = watch(layers)
    hooked = one_step(hooked_model, x, target)
    assert all(h.head_was_fused for h in heads(hooked_model))
    for kind in KINDS:
        assert counts[kind] == Counter(n for n, _ in layers)
    name, layer = layers[0]
    assert grads[name][0].shape == (2, layer.norm1.num_features, 10, 10)
    assert_same_step(hooked, plain)


def test_a_hook_on_one_norm1_unfuses_only_its_own_head():
    x, target = batch()
    plain_model, hooked_model = build("fast"), build("fast")
    plain = one_step(plain_model, x, target)
    target_layer = hooked_model.backbone.features.denseblock2.denselayer2
    seen = []
    target_layer.norm1.register_full_backward_hook(lambda m, gi, go: seen.append((gi[0].shape, go[0].shape)))
    hooked = one_step(hooked_model, x, target)
    assert [h.head_was_fused for h in heads(hooked_model)].count(False) == 1 and not target_layer.head_was_fused
    c = target_layer.norm1.num_features
    assert seen == [((2, c, 5, 5), (2, c, 5, 5))]      # norm1's own backward ran (not the deferred terms)
    assert_same_step(hooked, plain)


# -- replacing, removing ------------------------------------------------------------------------------------------

def small_net(rng):
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, rng=rng, dtype=np.float64), nn.ReLU(),
                         nn.Conv2d(3, 2, 1, rng=rng, dtype=np.float64))


def run(net, x, dout):
    net.zero_grad()
    out = net(x)
    dx = net.backward(dout)
    return out, dx, [p.grad.copy() for p in net.parameters()]


def test_a_hook_that_returns_a_value_replaces_what_it_was_given(rng):
    net = small_net(rng)
    x, dout = rng.standard_normal((2, 2, 5, 5)), rng.standard_normal((2, 2, 5, 5))
    out, dx, (w1, b1, w2, b2) = run(net, x, dout)
    with net[2].register_forward_hook(lambda m, inputs, o: o + 1.0):
        assert np.allclose(net(x), out + 1.0)
    with net[0].register_forward_pre_hook(lambda m, inputs: inputs[0] * 0.0):
        assert np.allclose(net(x), net(np.zeros_like(x)))
    with net[2].register_full_backward_hook(lambda m, gi, go: (gi[0] * 3.0,)):
        out3, dx3, (w1_3, b1_3, w2_3, b2_3) = run(net, x, dout)
    assert np.allclose(dx3, 3 * dx) and np.allclose(w1_3, 3 * w1) and np.allclose(w2_3, w2)   # only what lies below
    with net[2].register_full_backward_pre_hook(lambda m, go: (go[0] * 2.0,)):
        _, dx2, grads2 = run(net, x, dout)
    assert np.allclose(dx2, 2 * dx) and all(np.allclose(g, 2 * h) for g, h in zip(grads2, (w1, b1, w2, b2)))
    assert np.allclose(run(net, x, dout)[1], dx)       # all removed: as before


def test_backward_hook_must_return_as_many_gradients_as_it_got(rng):
    concat = nn.Concat()
    a, b = rng.standard_normal((1, 2, 3, 3)), rng.standard_normal((1, 1, 3, 3))
    concat.register_full_backward_hook(lambda m, gi, go: gi[:1])
    concat(a, b)
    with pytest.raises(ValueError, match=r"Concat backward hook: returned 1 gradients for 2"):
        concat.backward(np.ones((1, 3, 3, 3)))
    with pytest.raises(TypeError, match=r"Conv2d.register_forward_hook: expected a callable"):
        nn.Conv2d(1, 1, 1).register_forward_hook("not a function")


def test_handles_remove_and_leave_the_class_code(rng):
    net = small_net(rng)
    x = rng.standard_normal((1, 2, 4, 4))
    calls = []
    first = net[0].register_forward_hook(lambda *a: calls.append("first"))
    second = net[0].register_forward_hook(lambda *a: calls.append("second"))
    net(x)
    assert calls == ["first", "second"]                # registration order
    first.remove()
    first.remove()                                     # a second remove does nothing
    net(x)
    assert calls == ["first", "second", "second"]
    assert "forward" in net[0].__dict__ and net[0]._hooks is not None
    second.remove()
    net(x)
    assert calls == ["first", "second", "second"]
    assert "forward" not in net[0].__dict__ and "_hooks" not in net[0].__dict__ and net[0]._hooks is None
    with net[1].register_full_backward_hook(lambda *a: calls.append("bwd")) as handle:
        assert "backward" in net[1].__dict__ and "forward" not in net[1].__dict__
        net(x)
        net.backward(np.ones((1, 2, 4, 4)))
    assert calls[-1] == "bwd" and "backward" not in net[1].__dict__
    assert "backward hook" in repr(handle)


def test_no_hooks_cost_nothing_in_call_and_no_module_carries_a_wrapper():
    """``Module.__call__`` looks up ``forward`` and the grad mode (``no_grad``) and nothing for hooks; a model without
    hooks has no per-instance forward or backward, so every call runs the class's method directly (and a student
    stepping in lands there)."""
    assert Module.__call__.__code__.co_names == ("forward", "_grad_mode", "enabled", "_clear_cache")
    for tier in ("fast", "textbook"):
        model = build(tier, np.float32)
        assert not any({"forward", "backward", "_hooks"} & m.__dict__.keys() for m in model.modules())


def test_deepcopy_of_a_hooked_module_fires_for_the_copy(rng):
    conv = nn.Conv2d(2, 2, 1, rng=rng)
    seen = []
    conv.register_forward_hook(lambda m, i, o: seen.append(m))
    clone = copy.deepcopy(conv)
    clone(np.zeros((1, 2, 2, 2), np.float32))
    assert seen == [clone]


def test_hooks_refuse_to_run_where_a_cuda_graph_would_freeze_them(rng):
    net = small_net(rng)
    x = rng.standard_normal((1, 2, 4, 4))
    with as_captured():
        net(x)                                          # no hooks: fine
    net[0].register_forward_hook(lambda *a: None)
    with as_captured(), pytest.raises(RuntimeError, match=r"Conv2d.forward: hooks .* CUDA graph"):
        net(x)


def test_one_backward_per_forward_still_guarded_with_hooks():
    x, target = batch(np.float32)
    model = build("fast", np.float32)
    counts, _, _ = watch(firing(model))
    one_step(model, x, target)
    with pytest.raises(RuntimeError, match=r"DeepLabV3.backward called a second time"):
        model.backward(np.ones((2, 1, 40, 40), np.float32))


def test_hooks_survive_the_profiler(rng):
    from minideeplab.profiler import TypeProfiler
    net = small_net(rng)
    x = rng.standard_normal((1, 2, 4, 4))
    calls = []
    net[0].register_full_backward_hook(lambda *a: calls.append(1))
    profiler = TypeProfiler(net).attach()
    net(x)
    net.backward(np.ones((1, 2, 4, 4)))
    profiler.detach()
    net(x)
    net.backward(np.ones((1, 2, 4, 4)))
    assert calls == [1, 1] and profiler.totals["conv backward"] > 0
