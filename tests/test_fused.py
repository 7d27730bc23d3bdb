"""The fused BatchNorm2d → ReLU → 1×1 conv (``nn.fused``): the identity it rests on, its gradients, and that it
computes what the three layers compute one by one."""
import numpy as np
import pytest

from minideeplab.backend import to_device, to_numpy
from minideeplab.gradcheck import check_module
from minideeplab.models import DenseBlock, DenseLayer, Transition, set_fused
from minideeplab.nn import BatchNorm2d, Conv2d
from minideeplab.nn.fused import BNReLUConv1x1, relu_of_affine

# scales: positive, negative, zero, and so small that -shift/scale overflows (the channel is then constant)
SEED = 4
SCALES = [1.5, 0.3, -0.7, -2.0, 0.0, 0.0, 1e-310, -1e-310]
SHIFTS = [0.4, -0.2, 0.5, -0.1, 0.8, -0.8, -1.0, 1.0]


@pytest.mark.parametrize("channels", [slice(0, 2), slice(0, 4), slice(None)], ids=["positive", "signed", "all"])
def test_relu_of_affine_is_relu_of_the_affine_map(xp, channels):
    rng = np.random.default_rng(0)
    scale, shift = np.array(SCALES)[channels], np.array(SHIFTS)[channels]
    src = rng.standard_normal((2, len(scale), 5, 4)) * 3
    expected = np.maximum(src * scale[:, None, None] + shift[:, None, None], 0)
    z, lo, hi, b, blocked = relu_of_affine(*(xp.asarray(a) for a in (src, scale, shift)))
    z, lo, b, blocked = to_numpy(z), to_numpy(lo), to_numpy(b), to_numpy(blocked)
    hi = np.full_like(lo, np.inf) if hi is None else to_numpy(hi)     # None: no channel has an upper bound
    assert (hi == np.inf).all() == (channels == slice(0, 2))
    np.testing.assert_allclose(z * scale[:, None, None] + b[:, None, None], expected, rtol=1e-12, atol=1e-12)
    # ReLU's mask, as the fused backward reads it from z: lo < z < hi exactly where the affine map is positive
    passed = (z > lo[:, None, None]) & (z < hi[:, None, None])
    affine = src * scale[:, None, None] + shift[:, None, None]
    np.testing.assert_array_equal(passed, affine > 0)
    # where the mask is False, z is the channel's one blocked value (what norm_sums subtracts)
    np.testing.assert_array_equal(np.where(passed, 0, z), np.where(passed, 0, blocked[:, None, None]))


def test_relu_of_affine_keeps_its_arguments(xp):
    src, scale, shift = xp.ones((1, 2, 3, 3)), xp.asarray([0.0, 2.0]), xp.asarray([-1.0, 1.0])
    before = [a.copy() for a in (src, scale, shift)]
    relu_of_affine(src, scale, shift)
    for a, b in zip((src, scale, shift), before):
        assert bool((a == b).all())


def randomized_bn(module, rng, signed=True):
    """Batch norms with trained-looking parameters and running statistics (gamma of both signs, and one 0)."""
    for m in module.modules():
        if isinstance(m, BatchNorm2d):
            c = m.num_features
            m.weight.data[...] = rng.uniform(-1.5, 1.5, c) if signed else rng.uniform(0.5, 1.5, c)
            if signed:
                m.weight.data[0] = 0.0
            m.bias.data[...] = rng.normal(0, 0.5, c)
            m.running_mean[...] = rng.normal(0, 0.3, c)
            m.running_var[...] = rng.uniform(0.5, 1.5, c)
    return module


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("signed", [False, True], ids=["positive_gamma", "signed_gamma"])
@pytest.mark.parametrize("kind", ["transition", "dense_layer"])
def test_fused_head_gradients(xp, device, kind, train, signed):
    """Every entry of the input and of every parameter; in eval mode the dense layer's norm2 is folded in.
    (SEED 3 puts one of norm2's outputs 8e-6 from ReLU's kink in training, where central differences fail for the
    fused and the layer-by-layer path alike: the data of this seed keep clear of it.)"""
    rng = np.random.default_rng(SEED)
    module = (Transition(5, 3, pool=True, rng=rng, dtype=np.float64) if kind == "transition"
              else DenseLayer(5, 3, 2, dilation=2, rng=rng, dtype=np.float64))
    module = randomized_bn(module, rng, signed).train(train).to(device)
    x = to_device(rng.standard_normal((2, 5, 6, 4)), device)
    result = check_module(module, x, rtol=1e-6, full_limit=10_000, rng=np.random.default_rng(1))
    assert module.head_was_fused and result.worst <= 1e-6
    assert module.fused_head.folded == (kind == "dense_layer" and not train)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fused_dense_block_matches_layer_by_layer(xp, device, train):
    """Outputs, input gradient, every parameter gradient and the running statistics agree with the unfused path."""
    rng = np.random.default_rng(4)
    block = randomized_bn(DenseBlock(3, 5, 2, 3, dilation=2, rng=rng, dtype=np.float64), rng).to(device)
    x = to_device(rng.standard_normal((2, 5, 6, 7)), device)
    dout = to_device(rng.standard_normal((2, 5 + 3 * 3, 6, 7)), device)
    runs = []
    for fused in (True, False):
        model = set_fused(randomized_bn(DenseBlock(3, 5, 2, 3, dilation=2, rng=rng, dtype=np.float64),
                                        np.random.default_rng(9)), fused).to(device).train(train)
        model.load_state_dict(block.state_dict())
        out = model(x)
        dx = model.backward(dout)
        grads = {n: to_numpy(p.grad) for n, p in model.named_parameters()}
        runs.append((to_numpy(out), to_numpy(dx), grads, {k: to_numpy(v) for k, v in model.state_dict().items()}))
        assert all(layer.head_was_fused is fused for layer in model.children())
    (out_f, dx_f, g_f, s_f), (out_u, dx_u, g_u, s_u) = runs
    np.testing.assert_allclose(out_f, out_u, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx_f, dx_u, rtol=1e-12, atol=1e-12)
    for name in g_u:
        np.testing.assert_allclose(g_f[name], g_u[name], rtol=1e-11, atol=1e-12, err_msg=name)
    for name in s_u:   # running statistics moved the same way (train) or not at all (eval)
        np.testing.assert_allclose(s_f[name], s_u[name], rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("mode", ["train", "eval", "eval_folded"])
@pytest.mark.parametrize("channels", [slice(0, 2), slice(None)], ids=["positive", "all"])
def test_norm_sums_are_the_sums_of_g_and_g_times_centered(xp, device, mode, channels):
    """The batch norm's two backward sums, read off the weight gradient's GEMM, equal the direct ones, for every kind
    of channel (gamma positive, negative, 0, and so small that the channel is constant); centered = x - batch mean
    (train) or x - running mean (eval, also with a folded norm2); and the same given g times the scale."""
    rng = np.random.default_rng(SEED)
    gammas = np.array(SCALES)[channels]
    C = len(gammas)
    norm, conv = BatchNorm2d(C, dtype=np.float64), Conv2d(C, 3, 1, bias=False, rng=rng, dtype=np.float64)
    norm.weight.data[...], norm.bias.data[...] = gammas, np.array(SHIFTS)[channels]
    norm.running_mean[...] = rng.normal(0, 0.3, C)
    post = randomized_bn(BatchNorm2d(3, dtype=np.float64), rng, signed=False).eval().to(device)
    norm.train(mode == "train").to(device)
    head = BNReLUConv1x1(norm, conv.to(device), post if mode == "eval_folded" else None)
    x = to_device(rng.standard_normal((2, C, 5, 4)) * 2, device)
    head.forward(x)
    assert head.folded == (mode == "eval_folded")
    dout = to_device(rng.standard_normal((2, 3, 5, 4)), device)
    g = head.grad_at_norm_output(dout)
    centered = norm.centered if mode == "train" else x - norm.running_mean[:, None, None]
    expected = [to_numpy(g.sum(axis=(0, 2, 3))), to_numpy((g * centered).sum(axis=(0, 2, 3)))]
    for a, b in zip(head.norm_sums(g), expected):
        np.testing.assert_allclose(to_numpy(a), b, rtol=1e-12, atol=1e-12)
    if not bool((head.scale == 0).any()):     # scaled: g comes times s, the sums are still those of g
        sg = head.grad_at_norm_output(dout, scaled=True)
        for a, b in zip(head.norm_sums(sg, scaled=True), expected):
            np.testing.assert_allclose(to_numpy(a), b, rtol=1e-10, atol=1e-12)


def test_fused_head_errors():
    bn = BatchNorm2d(4)
    for conv in (Conv2d(4, 2, 3, padding=1), Conv2d(4, 2, 1, stride=2, bias=False), Conv2d(4, 2, 1)):
        with pytest.raises(ValueError, match="BNReLUConv1x1: needs a bias-free 1x1 conv"):
            BNReLUConv1x1(bn, conv)
    head = BNReLUConv1x1(bn, Conv2d(4, 2, 1, bias=False))
    with pytest.raises(RuntimeError, match="backward called before forward"):
        head.backward(np.zeros((1, 2, 3, 3), np.float32))
    with pytest.raises(RuntimeError, match="norm_sums needs a backward first"):
        head.norm_sums(np.zeros((1, 4, 3, 3), np.float32))
    with pytest.raises(ValueError, match="BatchNorm2d: expected 4 input channels, got 3"):
        head.forward(np.zeros((2, 3, 3, 3), np.float32))
    with pytest.raises(ValueError, match="channels do not chain"):
        BNReLUConv1x1(BatchNorm2d(3), Conv2d(4, 2, 1, bias=False))
    layer = DenseLayer(4, 2, 2).eval()
    layer(np.ones((1, 4, 3, 3), np.float32))
    layer.train()
    with pytest.raises(RuntimeError, match="switched to training mode after forward"):
        layer.backward(np.ones((1, 2, 3, 3), np.float32))
    t = Transition(4, 2)
    with pytest.raises(RuntimeError, match="Transition.backward called before forward"):
        t.backward(np.zeros((1, 2, 1, 1), np.float32))
