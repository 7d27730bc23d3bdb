"""im2col / col2im against a naive loop, the adjoint identity, and output sizes against the formula."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minideeplab import nn
from minideeplab.backend import to_numpy
from minideeplab.nn.functional import col2im, conv_output_size, im2col, tap_major
from minideeplab.profiler import CountingArray

CONFIGS = [  # kernel, stride, padding, dilation, input (N, C, H, W)
    ((3, 3), (1, 1), (1, 1), (1, 1), (2, 3, 5, 6)),
    ((3, 3), (2, 2), (0, 0), (1, 1), (2, 2, 9, 7)),
    ((3, 3), (1, 1), (3, 3), (1, 1), (1, 2, 4, 5)),
    ((3, 3), (1, 1), (2, 2), (2, 2), (1, 2, 7, 6)),
    ((3, 3), (1, 1), (6, 6), (6, 6), (1, 1, 8, 9)),
    ((3, 3), (2, 3), (12, 12), (12, 12), (1, 1, 10, 13)),
    ((3, 5), (2, 1), (1, 2), (1, 2), (2, 2, 8, 9)),
    ((2, 4), (1, 2), (0, 1), (3, 1), (1, 3, 9, 6)),
    ((1, 1), (2, 2), (0, 0), (1, 1), (2, 3, 5, 4)),
    ((7, 7), (2, 2), (3, 3), (1, 1), (1, 3, 11, 10)),
]
IDS = [f"k{k[0]}x{k[1]}_s{s[0]}x{s[1]}_p{p[0]}x{p[1]}_d{d[0]}x{d[1]}" for k, s, p, d, _ in CONFIGS]


def expected_size(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1   # floor division == floor for the positive numerator here


def naive_pairs(shape, k, s, p, d):
    """Written from the definition, loops over everything: each (column entry, input pixel) pair that
    im2col copies, as ``(n, row, col), (n, c, h, w)`` with row = (c, i, j) and col = (oh, ow) flattened."""
    N, C, H, W = shape
    Ho, Wo = expected_size(H, k[0], s[0], p[0], d[0]), expected_size(W, k[1], s[1], p[1], d[1])
    for n in range(N):
        for c in range(C):
            for i in range(k[0]):
                for j in range(k[1]):
                    row = (c * k[0] + i) * k[1] + j
                    for oh in range(Ho):
                        for ow in range(Wo):
                            h = oh * s[0] - p[0] + i * d[0]   # position in the unpadded input
                            w = ow * s[1] - p[1] + j * d[1]
                            if 0 <= h < H and 0 <= w < W:
                                yield (n, row, oh * Wo + ow), (n, c, h, w)


def naive_cols_shape(shape, k, s, p, d):
    N, C, H, W = shape
    return N, C * k[0] * k[1], expected_size(H, k[0], s[0], p[0], d[0]) * expected_size(W, k[1], s[1], p[1], d[1])


def naive_im2col(x, k, s, p, d):
    """cols[n, (c, i, j), (oh, ow)] = xpad[n, c, ...]: padding reads as zero."""
    cols = np.zeros(naive_cols_shape(x.shape, k, s, p, d))
    for col, pixel in naive_pairs(x.shape, k, s, p, d):
        cols[col] = x[pixel]
    return cols


def naive_col2im(cols, shape, k, s, p, d):
    """Each column entry added back onto the pixel it was read from (entries read from padding dropped)."""
    dx = np.zeros(shape)
    for col, pixel in naive_pairs(shape, k, s, p, d):
        dx[pixel] += cols[col]
    return dx


@pytest.mark.parametrize("k,s,p,d,shape", CONFIGS, ids=IDS)
def test_im2col_matches_naive_loop(k, s, p, d, shape, xp, rng):
    x = rng.standard_normal(shape)
    got = to_numpy(im2col(xp.asarray(x), k, s, p, d))
    want = naive_im2col(x, k, s, p, d)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)   # a pure copy: exact


@pytest.mark.parametrize("k,s,p,d,shape", CONFIGS, ids=IDS)
def test_col2im_matches_naive_loop(k, s, p, d, shape, xp, rng):
    cols = rng.standard_normal(naive_cols_shape(shape, k, s, p, d))
    got = to_numpy(col2im(xp.asarray(cols), shape, k, s, p, d))
    want = naive_col2im(cols, shape, k, s, p, d)
    assert got.shape == tuple(shape)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k,s,p,d,shape", CONFIGS, ids=IDS)
def test_adjoint_identity(k, s, p, d, shape, xp, rng):
    """<im2col(x), c> == <x, col2im(c)>: col2im is exactly the transpose of the linear map im2col."""
    x = xp.asarray(rng.standard_normal(shape))
    cols = im2col(x, k, s, p, d)
    c = xp.asarray(rng.standard_normal(cols.shape))
    lhs = float(xp.sum(cols * c))
    rhs = float(xp.sum(x * col2im(c, shape, k, s, p, d)))
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, float(xp.sum(xp.abs(cols * c))))


def test_im2col_float32_keeps_dtype(xp, rng):
    x = xp.asarray(rng.standard_normal((1, 2, 5, 5)).astype(np.float32))
    assert im2col(x, 3, 1, 1).dtype == np.float32
    assert col2im(im2col(x, 3, 1, 1), x.shape, 3, 1, 1).dtype == np.float32


geometry = st.tuples(st.integers(1, 7), st.integers(1, 4), st.integers(0, 6), st.integers(1, 6),  # k, s, p, d
                     st.integers(1, 7), st.integers(1, 4), st.integers(0, 6), st.integers(1, 6))


@settings(max_examples=60, deadline=None)
@given(geometry, st.integers(1, 30), st.integers(1, 30))
def test_output_size_formula(g, H, W):
    kh, sh, ph, dh, kw, sw, pw, dw = g
    Ho, Wo = expected_size(H, kh, sh, ph, dh), expected_size(W, kw, sw, pw, dw)
    assert conv_output_size(H, kh, sh, ph, dh) == Ho
    assert conv_output_size(W, kw, sw, pw, dw) == Wo
    x = np.zeros((1, 2, H, W))
    conv = nn.Conv2d(2, 3, (kh, kw), stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw), dtype=np.float64,
                     rng=np.random.default_rng(0))
    if Ho < 1 or Wo < 1:   # too small for the (dilated) kernel: a clear error, not an empty array
        with pytest.raises(ValueError, match="Conv2d: input .* too small"):
            conv(x)
        return
    assert im2col(x, (kh, kw), (sh, sw), (ph, pw), (dh, dw)).shape == (1, 2 * kh * kw, Ho * Wo)
    assert conv(x).shape == (1, 3, Ho, Wo)
    assert conv.backward(np.ones((1, 3, Ho, Wo))).shape == x.shape


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(0, 2), st.integers(1, 12), st.integers(1, 12))
def test_pool_output_size_formula(k, s, p, H, W):
    p = min(p, k // 2)   # pooling allows padding up to half the kernel
    Ho, Wo = expected_size(H, k, s, p, 1), expected_size(W, k, s, p, 1)
    x = np.random.default_rng(0).standard_normal((1, 2, H, W))
    for pool in (nn.MaxPool2d(k, s, p), nn.AvgPool2d(k, s, p)):
        if Ho < 1 or Wo < 1:
            with pytest.raises(ValueError, match=type(pool).__name__):
                pool(x)
            continue
        assert pool(x).shape == (1, 2, Ho, Wo)
        assert pool.backward(np.ones((1, 2, Ho, Wo))).shape == x.shape


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(0, 3), st.integers(1, 3),
       st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_random_geometry_matches_naive_and_adjoint(kh, kw, s, p, d, H, W, seed):
    k, s2, p2, d2 = (kh, kw), (s, s), (p, p), (d, d)
    if expected_size(H, kh, s, p, d) < 1 or expected_size(W, kw, s, p, d) < 1:
        return
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 2, H, W))
    cols = im2col(x, k, s2, p2, d2)
    np.testing.assert_array_equal(cols, naive_im2col(x, k, s2, p2, d2))
    c = rng.standard_normal(cols.shape)
    back = col2im(c, x.shape, k, s2, p2, d2)
    np.testing.assert_allclose(back, naive_col2im(c, x.shape, k, s2, p2, d2), rtol=1e-12, atol=1e-12)
    assert abs(np.sum(cols * c) - np.sum(x * back)) <= 1e-12 * max(1.0, np.sum(np.abs(cols * c)))


@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (96, 100, 3, 3), (8193, 1, 3, 3), (5, 7, 2, 4), (3, 2, 1, 1)])
def test_tap_major_is_the_weight_taps_first(shape, xp, rng):
    """Every tap's (F, C) matrix, read straight from the weight: entry [i * kw + j, f, c] is w[f, c, i, j] (shapes
    with F*C below, at and across the 8192-entry blocks of the NumPy copy)."""
    w = rng.standard_normal(shape).astype(np.float32)
    got = tap_major(xp.asarray(w))
    assert got.shape == (shape[2] * shape[3], shape[0], shape[1]) and got.flags.c_contiguous
    F, C, kh, kw = shape
    for i in range(kh):
        for j in range(kw):
            np.testing.assert_array_equal(to_numpy(got[i * kw + j]), w[:, :, i, j])


def test_tap_major_of_a_strided_weight(rng):
    w = rng.standard_normal((6, 8, 3, 3))
    np.testing.assert_array_equal(tap_major(w[::2])[4], w[::2, :, 1, 1])
    counted = w.view(CountingArray)   # launch-bound arrays (a GPU) take one transposing copy instead of blocks
    np.testing.assert_array_equal(np.asarray(tap_major(counted))[5], w[:, :, 1, 2])
