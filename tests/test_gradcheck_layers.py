"""Every layer through the one gradient checker, in float64, relative error <= 1e-6.

``CASES`` is the table: (layer type, case id, factory). A factory takes a Generator and returns
``(module, inputs)`` with a float64 module in the mode it is checked in and float64 NumPy inputs.
``benchmarks/gradcheck_report.py`` imports this table and prints the worst error per layer type.
"""
import zlib

import numpy as np
import pytest

from minideeplab import nn
from minideeplab.backend import to_device
from minideeplab.gradcheck import check_function, check_module

F64 = np.float64
# every entry of these small tensors is checked (none sampled)
CHECK_OPTIONS = {"rtol": 1e-6, "full_limit": 1000}


def randn(rng, *shape):
    return rng.standard_normal(shape)


def distinct(rng, *shape):
    """Values at least 0.01 apart and away from 0: no max-pool ties, no ReLU kinks within eps."""
    n = int(np.prod(shape))
    v = (rng.permutation(n) - n / 2 + 0.5) * 0.05
    return v.reshape(shape)


def conv(shape, *args, **kw):
    def make(rng):
        return nn.Conv2d(*args, rng=rng, dtype=F64, **kw), (randn(rng, *shape),)
    return make


CONV_CONFIGS = [  # id, input shape, (C, F, kernel), keyword arguments
    ("3x3_s1_p1", (2, 3, 6, 5), (3, 4, 3), {"padding": 1}),
    ("3x3_s2_p0_nonsquare", (2, 3, 9, 7), (3, 4, 3), {"stride": 2}),
    ("3x3_s2_p1", (2, 2, 8, 7), (2, 3, 3), {"stride": 2, "padding": 1}),
    ("3x3_p3", (1, 2, 5, 6), (2, 3, 3), {"padding": 3}),
    ("3x3_d2_p2", (2, 2, 7, 8), (2, 3, 3), {"padding": 2, "dilation": 2}),
    ("3x3_d6_p6", (1, 2, 13, 11), (2, 3, 3), {"padding": 6, "dilation": 6}),
    ("3x3_d12_p12", (1, 2, 14, 15), (2, 2, 3), {"padding": 12, "dilation": 12}),
    ("3x3_d12_p0", (1, 1, 26, 27), (1, 2, 3), {"dilation": 12}),
    ("3x3_d18_p18_small_map", (1, 2, 8, 7), (2, 2, 3), {"padding": 18, "dilation": 18}),  # only the centre tap
    ("k3x5_s2x1_p1x2_d1x2", (2, 2, 9, 10), (2, 3, (3, 5)), {"stride": (2, 1), "padding": (1, 2), "dilation": (1, 2)}),
    ("k2x4_nonsquare", (1, 2, 6, 9), (2, 3, (2, 4)), {}),
    ("7x7_s2_p3_stem", (1, 3, 11, 10), (3, 4, 7), {"stride": 2, "padding": 3}),
    ("1x1_s1", (2, 5, 4, 3), (5, 3, 1), {}),
    ("1x1_s2_odd", (2, 4, 7, 5), (4, 3, 1), {"stride": 2}),
    ("1x1_p1", (1, 3, 4, 3), (3, 2, 1), {"padding": 1}),
    ("3x3_nobias", (2, 3, 6, 5), (3, 4, 3), {"padding": 1, "bias": False}),
    ("1x1_nobias", (2, 4, 3, 3), (4, 2, 1), {"bias": False}),
]


def conv_algorithms(kernel_size, stride=1, padding=0, **_):
    """The Conv2d paths that can be forced on a configuration, written out here rather than asked of the layer:
    im2col and gather always, kn2row and taps at stride 1, pointwise for an unpadded 1x1 kernel."""
    k, s, p = (v if isinstance(v, tuple) else (v, v) for v in (kernel_size, stride, padding))
    applies = {"pointwise": k == (1, 1) and p == (0, 0), "kn2row": s == (1, 1), "taps": s == (1, 1), "im2col": True,
               "gather": True}
    return [a for a in nn.Conv2d.ALGORITHMS if applies.get(a, False)]


def bn_train(shape, **kw):
    def make(rng):
        m = nn.BatchNorm2d(shape[1], dtype=F64, **kw)
        if m.affine:
            m.weight.data[...] = rng.uniform(0.5, 1.5, shape[1])
            m.bias.data[...] = randn(rng, shape[1])
        return m.train(), (randn(rng, *shape) * 2 + 1,)
    return make


def bn_eval(shape, affine=True):
    def make(rng):
        m = nn.BatchNorm2d(shape[1], affine=affine, dtype=F64)
        m.running_mean[...] = randn(rng, shape[1])
        m.running_var[...] = rng.uniform(0.3, 3.0, shape[1])
        if affine:
            m.weight.data[...] = rng.uniform(-1.5, 1.5, shape[1])
            m.bias.data[...] = randn(rng, shape[1])
        return m.eval(), (randn(rng, *shape),)
    return make


def simple(factory, shape, data=randn):
    def make(rng):
        return factory(), (data(rng, *shape),)
    return make


def dropout(shape, p):
    def make(rng):
        return nn.Dropout(p, rng=np.random.default_rng(7)).train(), (randn(rng, *shape),)
    return make


def concat3(rng):
    return nn.Concat(), (randn(rng, 2, 2, 3, 4), randn(rng, 2, 3, 3, 4), randn(rng, 2, 1, 3, 4))


def conv_bn_relu_pool(rng):
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, rng=rng, dtype=F64), nn.BatchNorm2d(3, dtype=F64),
                        nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1))
    return net.train(), (randn(rng, 2, 2, 7, 6),)


def bn_relu_inplace(train):
    """ReLU(inplace=True) as the models use it: overwriting the fresh output of the batch norm before it."""
    def make(rng):
        net = nn.Sequential(nn.BatchNorm2d(3, dtype=F64), nn.ReLU(inplace=True))
        if not train:
            bn = net[0]
            bn.running_mean[...], bn.running_var[...] = randn(rng, 3) * 0.1, rng.uniform(0.5, 2.0, 3)
        return net.train(train), (distinct(rng, 2, 3, 4, 5),)
    return make


CASES = [
    # Conv2d: every configuration with the layer's own choice of algorithm, then forced through each path
    *[("Conv2d", case_id, conv(shape, *args, **kw)) for case_id, shape, args, kw in CONV_CONFIGS],
    *[("Conv2d", f"{case_id}_{algo}", conv(shape, *args, algorithm=algo, **kw))
      for case_id, shape, args, kw in CONV_CONFIGS for algo in conv_algorithms(args[2], **kw)],
    # BatchNorm2d
    ("BatchNorm2d", "train", bn_train((3, 4, 5, 6))),
    ("BatchNorm2d", "train_N1", bn_train((1, 3, 4, 5))),
    ("BatchNorm2d", "train_affine_false", bn_train((2, 3, 4, 5), affine=False)),
    ("BatchNorm2d", "eval_running_stats", bn_eval((2, 4, 5, 3))),
    ("BatchNorm2d", "eval_affine_false", bn_eval((2, 3, 4, 3), affine=False)),
    # elementwise
    ("ReLU", "relu", simple(nn.ReLU, (2, 3, 4, 5), distinct)),
    ("ReLU", "relu_eval_mask_from_output", simple(lambda: nn.ReLU().eval(), (2, 3, 4, 5), distinct)),
    ("ReLU", "bn_relu_inplace_train", bn_relu_inplace(train=True)),
    ("ReLU", "bn_relu_inplace_eval", bn_relu_inplace(train=False)),
    ("Sigmoid", "sigmoid", simple(nn.Sigmoid, (2, 3, 4, 5), lambda rng, *s: 4 * randn(rng, *s))),
    ("Dropout", "p0.3_train", dropout((2, 3, 4, 5), 0.3)),
    ("Dropout", "eval", simple(lambda: nn.Dropout(0.5, rng=np.random.default_rng(1)).eval(), (2, 3, 4, 5))),
    # pooling
    ("MaxPool2d", "k3_s2_p1", simple(lambda: nn.MaxPool2d(3, stride=2, padding=1), (2, 3, 9, 8), distinct)),
    ("MaxPool2d", "k2", simple(lambda: nn.MaxPool2d(2), (2, 2, 6, 7), distinct)),
    ("MaxPool2d", "k3_s2_p1_eval_winners_in_backward",
     simple(lambda: nn.MaxPool2d(3, stride=2, padding=1).eval(), (2, 3, 9, 8), distinct)),
    ("MaxPool2d", "k3x2_s1x2_p1x0", simple(lambda: nn.MaxPool2d((3, 2), stride=(1, 2), padding=(1, 0)),
                                          (1, 2, 5, 7), distinct)),
    ("AvgPool2d", "k3_s2_p1", simple(lambda: nn.AvgPool2d(3, stride=2, padding=1), (2, 3, 9, 8))),
    ("AvgPool2d", "k2", simple(lambda: nn.AvgPool2d(2), (2, 2, 6, 7))),
    ("AvgPool2d", "k2x3_s1_p1", simple(lambda: nn.AvgPool2d((2, 3), stride=1, padding=1), (1, 2, 5, 4))),
    ("AdaptiveAvgPool2d", "gap", simple(lambda: nn.AdaptiveAvgPool2d(1), (2, 3, 5, 7))),
    # bilinear resize
    ("Upsample", "size_up_odd", simple(lambda: nn.Upsample(size=(7, 9)), (2, 2, 4, 5))),
    ("Upsample", "size_down_odd", simple(lambda: nn.Upsample(size=(3, 5)), (1, 2, 8, 11))),
    ("Upsample", "scale_up_2.5", simple(lambda: nn.Upsample(scale_factor=2.5), (1, 2, 3, 4))),
    ("Upsample", "scale_down_0.6", simple(lambda: nn.Upsample(scale_factor=0.6), (1, 2, 9, 7))),
    ("Upsample", "scale_pair", simple(lambda: nn.Upsample(scale_factor=(1.7, 0.45)), (1, 2, 5, 11))),
    ("Upsample", "align_up_odd", simple(lambda: nn.Upsample(size=(7, 5), align_corners=True), (1, 2, 4, 3))),
    ("Upsample", "align_down_odd", simple(lambda: nn.Upsample(size=(3, 5), align_corners=True), (1, 2, 8, 11))),
    ("Upsample", "align_scale_up", simple(lambda: nn.Upsample(scale_factor=2, align_corners=True), (1, 2, 3, 5))),
    # joins and containers
    ("Concat", "three_inputs", concat3),
    ("Identity", "identity", simple(nn.Identity, (2, 3, 4, 5))),
    ("Sequential", "conv_bn_relu_maxpool", conv_bn_relu_pool),
]


def build(case_id, make, device):
    """A case's module and inputs on ``device``, seeded by the case id (shared by test_module and
    benchmarks/gradcheck_report.py, so all three check the same tensors)."""
    module, inputs = make(np.random.default_rng(zlib.crc32(case_id.encode())))
    return module.to(device), tuple(to_device(x, device) for x in inputs)


@pytest.mark.parametrize("kind,case_id,make", CASES, ids=[f"{k}-{c}" for k, c, _ in CASES])
def test_gradcheck(kind, case_id, make, device):
    module, inputs = build(case_id, make, device)
    result = check_module(module, inputs, rng=np.random.default_rng(5), **CHECK_OPTIONS)
    names = [row.name for row in result.rows]
    # every parameter and every input was checked
    assert names[:len(inputs)] == (["input"] if len(inputs) == 1 else [f"input{i}" for i in range(len(inputs))])
    assert names[len(inputs):] == [n for n, _ in module.named_parameters()]
    assert all(row.checked == int(np.prod(row.shape)) for row in result.rows), result.table()
    assert result.worst <= 1e-6, result.table()


def test_table_covers_every_layer():
    """The table is the acceptance bar: a layer exported by minideeplab.nn without a case fails here."""
    covered = {kind for kind, _, _ in CASES}
    exported = {name for name in nn.__all__ if isinstance(getattr(nn, name), type)
                and issubclass(getattr(nn, name), nn.Module)}
    assert exported - covered <= {"Module", "ModuleList"}


def test_checker_catches_a_wrong_backward():
    """The checker itself must fail on a backward that is off by a little (else the table proves nothing)."""
    class Leaky(nn.ReLU):
        def backward(self, dout):
            return super().backward(dout) * (1 + 1e-4)

    x = distinct(np.random.default_rng(0), 2, 3, 4)
    with pytest.raises(AssertionError, match="gradient check failed for Leaky"):
        check_module(Leaky(), x)


def test_check_function_passes_and_fails():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))

    def mul(a, b):
        return a * b, lambda d: (d * b, d * a)

    def mul_wrong(a, b):
        return a * b, lambda d: (d * b, d * b)   # wrong gradient for b

    result = check_function(mul, a, b)
    assert [r.name for r in result.rows] == ["input0", "input1"] and result.worst <= 1e-6
    with pytest.raises(AssertionError, match=r"input1 .* NO"):
        check_function(mul_wrong, a, b)
    assert check_function(mul_wrong, a, b, wrt_inputs=(0,)).passed


def test_check_module_restores_state_and_rejects_float32():
    rng = np.random.default_rng(1)
    bn = nn.BatchNorm2d(3, dtype=F64)
    before = {k: v.copy() for k, v in bn.state_dict().items()}
    check_module(bn, rng.standard_normal((2, 3, 4, 4)) + 5)
    for k, v in bn.state_dict().items():   # the many extra forwards did not move the running statistics
        np.testing.assert_array_equal(v, before[k])
    with pytest.raises(TypeError, match="parameter weight is float32; gradient checks run in float64"):
        check_module(nn.BatchNorm2d(3), rng.standard_normal((2, 3, 4, 4)))
    with pytest.raises(TypeError, match="input 0 is float32"):
        check_module(nn.ReLU(), rng.standard_normal((2, 3)).astype(np.float32))


def test_sampled_check_of_large_tensors():
    """Tensors above full_limit are checked on `samples` entries plus the largest analytic entry."""
    rng = np.random.default_rng(2)
    conv = nn.Conv2d(4, 5, 3, padding=1, rng=rng, dtype=F64)
    result = check_module(conv, rng.standard_normal((2, 4, 8, 8)), full_limit=64, samples=10, rng=rng)
    checked = {r.name: r.checked for r in result.rows}
    assert checked["bias"] == 5                      # small: every entry
    assert checked["input"] in (10, 11) and checked["weight"] in (10, 11)
    assert result.passed


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_relu_inplace_overwrites_its_input_and_matches_the_copying_relu(xp, train):
    rng = np.random.default_rng(3)
    x = xp.asarray(rng.standard_normal((2, 3, 4, 5)).astype(np.float32))
    dout = xp.asarray(rng.standard_normal((2, 3, 4, 5)).astype(np.float32))
    copying, inplace = nn.ReLU().train(train), nn.ReLU(inplace=True).train(train)
    expected = copying(x)
    x_before = x.copy()
    out = inplace(x)
    assert out is x                                            # the input array now holds the result
    np.testing.assert_array_equal(to_device(out, "cpu"), to_device(expected, "cpu"))
    assert bool((x_before != expected).any())                  # so the input really was overwritten
    dx = inplace.backward(dout)
    np.testing.assert_array_equal(to_device(dx, "cpu"), to_device(copying.backward(dout), "cpu"))
    np.testing.assert_array_equal(to_device(dx, "cpu"), to_device(dout * (x_before > 0), "cpu"))
    # what each mode keeps for backward: the mask in training, only the output (no mask) in eval
    assert (inplace.mask is not None, inplace.out is None) == (train, train)
    assert repr(inplace) == "ReLU(inplace=True)" and repr(copying) == "ReLU()"


def test_maxpool_eval_keeps_no_argmax_and_routes_ties_like_training(xp):
    """Eval forward computes only the maximum; its backward finds the winners, first one on ties as in training."""
    rng = np.random.default_rng(4)
    x = xp.asarray(rng.integers(0, 3, (2, 3, 7, 6)).astype(np.float32))     # many ties
    dout = xp.asarray(rng.standard_normal((2, 3, 4, 3)).astype(np.float32))
    train_pool, eval_pool = nn.MaxPool2d(3, stride=2, padding=1), nn.MaxPool2d(3, stride=2, padding=1).eval()
    out_train, out_eval = train_pool(x), eval_pool(x)
    assert eval_pool.argmax is None and train_pool.argmax is not None
    np.testing.assert_array_equal(to_device(out_eval, "cpu"), to_device(out_train, "cpu"))
    np.testing.assert_array_equal(to_device(eval_pool.backward(dout), "cpu"),
                                  to_device(train_pool.backward(dout), "cpu"))


def naive_max_pool_backward(x, dout, k, s, p):
    """From the definition, loops over everything: each window's first maximum in row-major order (padding never
    wins) gets that window's dout."""
    N, C, H, W = x.shape
    dx = np.zeros_like(x)
    for n in range(N):
        for c in range(C):
            for oh in range(dout.shape[2]):
                for ow in range(dout.shape[3]):
                    best = None
                    for i in range(k[0]):
                        for j in range(k[1]):
                            h, w = oh * s[0] - p[0] + i, ow * s[1] - p[1] + j
                            if 0 <= h < H and 0 <= w < W and (best is None or x[n, c, h, w] > x[n, c, best[0], best[1]]):
                                best = (h, w)
                    dx[n, c, best[0], best[1]] += dout[n, c, oh, ow]
    return dx


@pytest.mark.parametrize("k, s, p, shape", [((3, 3), (2, 2), (1, 1), (2, 3, 9, 8)), ((2, 3), (1, 2), (1, 1), (1, 2, 5, 7)),
                                            ((12, 12), (3, 3), (0, 0), (1, 2, 16, 15))],
                         ids=["k3_s2_p1", "k2x3_s1x2_p1", "k12_s3_144_taps"])
def test_maxpool_routes_ties_to_the_first_maximum(k, s, p, shape, xp):
    """Integer inputs with many ties: the gradient goes to each window's first maximum in row-major order (as
    PyTorch), for the separable forward (row maxima, then the maximum of rows) and the scatter-add backward;
    144 taps take the int32 labels."""
    rng = np.random.default_rng(5)
    x = rng.integers(0, 3, shape).astype(np.float32)
    pool = nn.MaxPool2d(k, stride=s, padding=p)
    out = pool(xp.asarray(x))
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dx = to_device(pool.backward(xp.asarray(dout)), "cpu")
    np.testing.assert_allclose(dx, naive_max_pool_backward(x, dout, k, s, p), rtol=1e-6, atol=1e-6)
    assert pool.argmax.dtype == (np.int32 if k == (12, 12) else np.int8)
