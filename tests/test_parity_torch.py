"""PyTorch parity: forward outputs and every gradient of each layer against ``torch.nn.functional``.

Same weights, same inputs, same upstream gradient. Errors are measured relative to the scale of the
reference tensor: ``max|ours - torch| / max|torch|`` <= 1e-10 in float64 and <= 1e-4 in float32.
Skipped when torch is not installed (CI installs the CPU build).
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_gradcheck_layers import conv_algorithms

from minideeplab import nn
from minideeplab.backend import to_numpy

torch = pytest.importorskip("torch")
F = torch.nn.functional

TOL = {np.float64: 1e-10, np.float32: 1e-4}
DTYPES = [np.float64, np.float32]
DTYPE_IDS = ["f64", "f32"]


def rel_err(ours, ref) -> float:
    ours, ref = to_numpy(ours).astype(np.float64), ref.detach().double().numpy()
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    scale = max(float(np.abs(ref).max(initial=0.0)), 1e-30)
    return float(np.abs(ours - ref).max(initial=0.0)) / scale


def tt(a):
    """A torch leaf tensor (requiring grad) holding a copy of ``a`` (NumPy or CuPy)."""
    return torch.from_numpy(np.array(to_numpy(a))).requires_grad_(True)


def assert_parity(module, inputs, torch_fn, dtype, xp, rng, extra=()):
    """Run ``module`` and ``torch_fn(inputs..., **params)`` and compare output, input and parameter grads.

    ``torch_fn`` receives torch copies of the inputs and a dict of torch copies of the parameters.
    Returns the worst error and the torch output (for follow-up checks).
    """
    tol = TOL[dtype]
    x_np = [np.asarray(x, dtype=dtype) for x in inputs]
    t_in = [tt(x) for x in x_np]
    t_params = {name: tt(p.data) for name, p in module.named_parameters()}
    module.zero_grad()
    out = module(*[xp.asarray(x) for x in x_np])
    t_out = torch_fn(*t_in, **t_params)
    dout = rng.standard_normal(t_out.shape).astype(dtype)
    dxs = module.backward(xp.asarray(dout))
    dxs = dxs if isinstance(dxs, tuple) else (dxs,)
    t_out.backward(torch.from_numpy(dout))
    errors = {"out": rel_err(out, t_out)}
    assert out.dtype == dtype
    for i, (dx, t) in enumerate(zip(dxs, t_in)):
        errors[f"dx{i}"] = rel_err(dx, t.grad)
        assert dx.dtype == dtype
    for name, p in module.named_parameters():
        errors[f"d{name}"] = rel_err(p.grad, t_params[name].grad)
    bad = {k: v for k, v in errors.items() if v > tol}
    assert not bad, f"parity errors above {tol}: {errors}"
    return max(errors.values()), t_out


CONV_CASES = [  # (C, F, k, stride, padding, dilation, bias, input HxW)
    (3, 4, 3, 1, 1, 1, True, (6, 5)),
    (3, 4, 3, 2, 0, 1, True, (9, 7)),
    (2, 3, 3, 2, 1, 1, False, (8, 7)),
    (2, 3, 3, 1, 3, 1, True, (5, 6)),
    (2, 3, 3, 1, 2, 2, True, (7, 8)),
    (2, 3, 3, 1, 6, 6, False, (13, 11)),
    (2, 2, 3, 1, 12, 12, True, (14, 15)),
    (2, 3, (3, 5), (2, 1), (1, 2), (1, 2), True, (9, 10)),
    (3, 4, 7, 2, 3, 1, False, (11, 10)),
    (5, 3, 1, 1, 0, 1, True, (4, 3)),
    (4, 3, 1, 2, 0, 1, False, (7, 5)),
    (3, 2, 1, 1, 1, 1, True, (4, 3)),
]


CONV_PARAMS = [(case, algo) for case in CONV_CASES for algo in ["auto", *conv_algorithms(*case[2:5])]]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case,algo", CONV_PARAMS,
                         ids=[f"conv{CONV_CASES.index(c)}-{a}" for c, a in CONV_PARAMS])
def test_conv2d(case, algo, dtype, xp, device, rng):
    C, Fo, k, s, p, d, bias, hw = case
    kw = {} if algo == "auto" else {"algorithm": algo}
    conv = nn.Conv2d(C, Fo, k, stride=s, padding=p, dilation=d, bias=bias, rng=rng, dtype=dtype, **kw)
    if bias:
        conv.bias.data[...] = rng.standard_normal(Fo)
    conv.to(device)
    x = rng.standard_normal((2, C, *hw))
    assert_parity(conv, [x], lambda x, weight, bias=None: F.conv2d(x, weight, bias, s, p, d), dtype, xp, rng)
    assert algo == "auto" or getattr(conv, "path", algo) == algo   # the forced path really ran


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batchnorm(training, affine, dtype, xp, device, rng):
    bn = nn.BatchNorm2d(4, affine=affine, dtype=dtype)
    bn.running_mean[...] = rng.standard_normal(4)
    bn.running_var[...] = rng.uniform(0.3, 3.0, 4)
    if affine:
        bn.weight.data[...] = rng.uniform(-1.5, 1.5, 4)
        bn.bias.data[...] = rng.standard_normal(4)
    bn.train(training).to(device)
    x = rng.standard_normal((3, 4, 5, 6)) * 3 + 2
    rm0, rv0 = to_numpy(bn.running_mean).copy(), to_numpy(bn.running_var).copy()
    t_rm, t_rv = torch.from_numpy(rm0.copy()), torch.from_numpy(rv0.copy())

    def torch_bn(x, weight=None, bias=None):
        return F.batch_norm(x, t_rm, t_rv, weight, bias, training=training, momentum=bn.momentum, eps=bn.eps)

    assert_parity(bn, [x], torch_bn, dtype, xp, rng)
    # the running statistics moved (train) or stayed (eval) exactly as PyTorch's
    assert rel_err(bn.running_mean, t_rm) <= TOL[dtype]
    assert rel_err(bn.running_var, t_rv) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_batchnorm_running_stats_after_training_steps(dtype, xp, device, rng):
    """Five training steps on different batches (different N, H, W), then eval on a new batch."""
    ours = nn.BatchNorm2d(3, momentum=0.2, dtype=dtype)
    ours.weight.data[...] = rng.uniform(0.5, 1.5, 3)
    ours.bias.data[...] = rng.standard_normal(3)
    theirs = torch.nn.BatchNorm2d(3, momentum=0.2, dtype=torch.float64 if dtype == np.float64 else torch.float32)
    with torch.no_grad():
        theirs.weight.copy_(torch.from_numpy(ours.weight.data))
        theirs.bias.copy_(torch.from_numpy(ours.bias.data))
    ours.to(device).train()
    theirs.train()
    for step, shape in enumerate([(2, 3, 4, 5), (4, 3, 3, 3), (1, 3, 6, 2), (3, 3, 5, 5), (2, 3, 1, 7)]):
        x = (rng.standard_normal(shape) * (1 + step) + step).astype(dtype)
        out = ours(xp.asarray(x))
        ref = theirs(torch.from_numpy(x))
        assert rel_err(out, ref) <= TOL[dtype]
    assert rel_err(ours.running_mean, theirs.running_mean) <= TOL[dtype]
    assert rel_err(ours.running_var, theirs.running_var) <= TOL[dtype]
    assert int(to_numpy(ours.num_batches_tracked)) == int(theirs.num_batches_tracked) == 5
    ours.eval()
    theirs.eval()
    x = (rng.standard_normal((2, 3, 4, 4)) * 2).astype(dtype)
    assert rel_err(ours(xp.asarray(x)), theirs(torch.from_numpy(x))) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_relu(dtype, xp, rng):
    x = rng.standard_normal((2, 3, 4, 5))
    x[0, 0, 0, :2] = 0.0   # PyTorch's gradient at exactly 0 is 0
    assert_parity(nn.ReLU(), [x], F.relu, dtype, xp, rng)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sigmoid(dtype, xp, rng):
    x = rng.standard_normal((2, 3, 4, 5)) * 4
    x[0, 0, 0, :4] = [-80.0, -30.0, 30.0, 80.0]   # saturated ends: no overflow, no NaN
    assert_parity(nn.Sigmoid(), [x], torch.sigmoid, dtype, xp, rng)


POOLS = [(3, 2, 1, (9, 8)), (2, None, 0, (6, 7)), ((3, 2), (1, 2), (1, 0), (5, 7)), (3, 1, 1, (5, 5)),
         (2, 2, 1, (5, 5))]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", POOLS, ids=[f"pool{i}" for i in range(len(POOLS))])
def test_maxpool(case, dtype, xp, rng):
    k, s, p, hw = case
    x = rng.standard_normal((2, 3, *hw))
    assert_parity(nn.MaxPool2d(k, s, p), [x], lambda x: F.max_pool2d(x, k, s, p), dtype, xp, rng)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", POOLS, ids=[f"pool{i}" for i in range(len(POOLS))])
def test_maxpool_ties(case, dtype, xp, rng):
    """Inputs with many equal values: the gradient goes to the same (first) element as in PyTorch."""
    k, s, p, hw = case
    x = rng.integers(0, 3, size=(2, 3, *hw)).astype(np.float64)
    x[0, 0] = 1.0   # a whole plane of ties
    assert_parity(nn.MaxPool2d(k, s, p), [x], lambda x: F.max_pool2d(x, k, s, p), dtype, xp, rng)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", POOLS, ids=[f"pool{i}" for i in range(len(POOLS))])
def test_avgpool(case, dtype, xp, rng):
    k, s, p, hw = case
    x = rng.standard_normal((2, 3, *hw))
    assert_parity(nn.AvgPool2d(k, s, p), [x], lambda x: F.avg_pool2d(x, k, s, p, count_include_pad=True),
                  dtype, xp, rng)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_adaptive_avgpool(dtype, xp, rng):
    x = rng.standard_normal((2, 3, 5, 7))
    assert_parity(nn.AdaptiveAvgPool2d(1), [x], lambda x: F.adaptive_avg_pool2d(x, 1), dtype, xp, rng)


RESIZE = [  # (input HxW, size, scale_factor, align_corners)
    ((4, 5), (7, 9), None, False),
    ((8, 11), (3, 5), None, False),
    ((5, 5), (13, 1), None, False),
    ((3, 4), None, 2.5, False),
    ((9, 7), None, 0.6, False),
    ((5, 11), None, (1.7, 0.45), False),
    ((4, 4), None, 3, False),
    ((7, 9), None, 1 / 3, False),
    ((5, 6), None, (1.1, 2.0), False),   # floor(5 * 1.1) = 5: PyTorch copies that axis, ignoring the scale
    ((2, 2), None, (1.25, 1.6), False),
    ((4, 3), (7, 5), None, True),
    ((8, 11), (3, 5), None, True),
    ((3, 5), None, 2, True),
    ((9, 7), None, 0.55, True),
    ((6, 6), (1, 1), None, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", RESIZE, ids=[f"{c[0]}->{c[1] or c[2]}{'_ac' if c[3] else ''}" for c in RESIZE])
def test_upsample_bilinear(case, dtype, xp, rng):
    hw, size, scale, align = case
    x = rng.standard_normal((2, 3, *hw))
    up = nn.Upsample(size=size, scale_factor=scale, align_corners=align)

    def ref(x):   # recompute_scale_factor=None: PyTorch uses the given scale factor for the coordinates
        return F.interpolate(x, size=size, scale_factor=scale, mode="bilinear", align_corners=align)

    assert_parity(up, [x], ref, dtype, xp, rng)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_concat(dtype, xp, rng):
    xs = [rng.standard_normal((2, c, 3, 4)) for c in (2, 3, 1)]
    assert_parity(nn.Concat(), xs, lambda *t: torch.cat(t, dim=1), dtype, xp, rng)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sequential_conv_bn_relu_pool(dtype, xp, device, rng):
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False, rng=rng, dtype=dtype), nn.BatchNorm2d(4, dtype=dtype),
                        nn.ReLU(), nn.MaxPool2d(3, 2, 1), nn.Upsample(size=(9, 8)))
    net[1].weight.data[...] = rng.uniform(0.5, 1.5, 4)
    net[1].bias.data[...] = rng.standard_normal(4)
    net.to(device).train()

    def ref(x, **p):
        rm, rv = torch.zeros(4, dtype=x.dtype), torch.ones(4, dtype=x.dtype)
        y = F.conv2d(x, p["0.weight"], None, 1, 1)
        y = F.batch_norm(y, rm, rv, p["1.weight"], p["1.bias"], training=True)
        y = F.max_pool2d(F.relu(y), 3, 2, 1)
        return F.interpolate(y, size=(9, 8), mode="bilinear", align_corners=False)

    assert_parity(net, [rng.standard_normal((2, 3, 9, 8))], lambda x, **p: ref(x, **p), dtype, xp, rng)


# -- random geometry (hypothesis): shapes and sizes the hand-picked cases above may have missed --------------


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(0, 3), st.integers(1, 4),
       st.integers(1, 10), st.integers(1, 10), st.booleans(), st.integers(0, 2**31 - 1), st.integers(0, 4))
def test_conv2d_random_geometry(kh, kw, s, p, d, H, W, bias, seed, pick):
    if (H + 2 * p - d * (kh - 1) - 1) < 0 or (W + 2 * p - d * (kw - 1) - 1) < 0:
        return
    rng = np.random.default_rng(seed)
    algos = ["auto", *conv_algorithms((kh, kw), s, p)]
    algo = algos[pick % len(algos)]
    conv = nn.Conv2d(2, 3, (kh, kw), stride=s, padding=p, dilation=d, bias=bias, rng=rng, dtype=np.float64,
                     **({} if algo == "auto" else {"algorithm": algo}))
    if bias:
        conv.bias.data[...] = rng.standard_normal(3)
    x = rng.standard_normal((2, 2, H, W))
    assert_parity(conv, [x], lambda x, weight, bias=None: F.conv2d(x, weight, bias, s, p, d), np.float64, np, rng)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.integers(0, 2), st.integers(1, 9),
       st.integers(1, 9), st.booleans(), st.integers(0, 2**31 - 1))
def test_pools_random_geometry(kh, kw, s, p, H, W, ties, seed):
    p = (min(p, kh // 2), min(p, kw // 2))
    if H + 2 * p[0] < kh or W + 2 * p[1] < kw:
        return
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 3, (2, 2, H, W)).astype(np.float64) if ties else rng.standard_normal((2, 2, H, W))
    assert_parity(nn.MaxPool2d((kh, kw), s, p), [x], lambda x: F.max_pool2d(x, (kh, kw), s, p), np.float64, np, rng)
    assert_parity(nn.AvgPool2d((kh, kw), s, p), [x], lambda x: F.avg_pool2d(x, (kh, kw), s, p), np.float64, np, rng)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.one_of(st.tuples(st.integers(1, 13), st.integers(1, 13)),
                                                       st.tuples(st.floats(0.2, 3.5), st.floats(0.2, 3.5))),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_upsample_random_sizes(H, W, target, align, seed):
    size = target if isinstance(target[0], int) else None
    scale = None if size is not None else target
    if scale is not None and (int(H * scale[0]) < 1 or int(W * scale[1]) < 1):
        return
    rng = np.random.default_rng(seed)
    up = nn.Upsample(size=size, scale_factor=scale, align_corners=align)

    def ref(x):
        return F.interpolate(x, size=size, scale_factor=scale, mode="bilinear", align_corners=align)

    assert_parity(up, [rng.standard_normal((1, 2, H, W))], ref, np.float64, np, rng)
