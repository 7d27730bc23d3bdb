"""The Conv2d speed paths agree with each other, also on the inputs the model feeds them (channel-prefix views)."""
import numpy as np
import pytest
from test_gradcheck_layers import conv_algorithms

from minideeplab import nn
from minideeplab.backend import to_numpy
from minideeplab.nn.functional import stack_shifted, sum_shifted

F64 = np.float64

# (C, F, kernel, stride, padding, dilation, (H, W)): model-like geometries, scaled down
CASES = [
    (6, 4, 3, 1, 1, 1, (9, 8)),      # dense layer 3x3
    (6, 4, 3, 1, 2, 2, (6, 7)),      # atrous dense layer (OS 16)
    (8, 5, 3, 1, 6, 6, (5, 6)),      # ASPP, rate larger than the map: most taps partly in padding
    (8, 5, 3, 1, 7, 7, (5, 5)),      # only the centre tap reads data
    (3, 4, 7, 2, 3, 1, (11, 10)),    # stem
    (5, 3, 1, 1, 0, 1, (4, 6)),      # 1x1
    (3, 2, (3, 5), 1, (0, 2), (2, 1), (9, 8)),  # non-square everything, no vertical padding
]


def run(conv, x, dout):
    out = conv(x)
    dx = conv.backward(dout)
    return out, dx, conv.weight.grad.copy(), conv.bias.grad.copy()


@pytest.mark.parametrize("case", CASES, ids=[f"k{c[2]}_s{c[3]}_p{c[4]}_d{c[5]}" for c in CASES])
def test_all_paths_agree_on_a_prefix_view(case, xp, device, rng):
    C, F, k, s, p, d, (H, W) = case
    buf = xp.asarray(rng.standard_normal((2, C + 3, H, W)))
    x = buf[:, :C]                                   # what a dense layer reads: a non-contiguous view
    weight = rng.standard_normal((F, C, *((k, k) if isinstance(k, int) else k)))
    results = {}
    for algo in conv_algorithms(k, s, p):
        conv = nn.Conv2d(C, F, k, s, p, d, rng=rng, dtype=F64, algorithm=algo).to(device)
        conv.weight.data[...] = xp.asarray(weight)
        conv.bias.data[...] = xp.asarray(np.arange(F, dtype=F64))
        dout = xp.asarray(np.random.default_rng(7).standard_normal(conv.output_shape(x.shape)))
        results[algo] = run(conv, x, dout)
        assert conv.path == algo
    ref = results["im2col"]
    for algo, got in results.items():
        for name, a, b in zip(("out", "dx", "dW", "db"), got, ref):
            np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-11, atol=1e-11, err_msg=f"{algo} {name}")


def test_auto_choice_per_model_layer():
    """The rule: pointwise for 1x1, im2col when strided; at stride 1 kn2row when the taps that read any data read
    it at >= 70 % of the pixels, else taps (one GEMM per tap over its own rectangle)."""
    cases = [((1, 0, 1, 1), 64, "pointwise"), ((7, 3, 1, 2), 256, "im2col"), ((3, 1, 1, 1), 64, "kn2row"),
             ((3, 2, 2, 1), 16, "kn2row"), ((3, 6, 6, 1), 16, "taps"), ((3, 12, 12, 1), 16, "taps"),
             ((3, 18, 18, 1), 16, "kn2row"),   # only the centre tap reads data: one GEMM, a 1x1 conv
             ((3, 4, 4, 1), 32, "kn2row"), ((3, 12, 12, 1), 32, "taps")]
    for (k, p, d, s), size, expected in cases:
        conv = nn.Conv2d(2, 2, k, s, p, d, dtype=F64)
        conv(np.zeros((1, 2, size, size)))
        assert conv.path == expected, (k, p, d, s, size)


def test_taps_path_skips_taps_that_read_only_padding():
    from minideeplab.nn.functional import valid_taps
    taps = list(valid_taps((3, 3), (18, 18), (18, 18), (16, 16), (16, 16)))
    assert [(i, j) for i, j, _, _ in taps] == [(1, 1)]
    # rate 12 on 16x16: every tap reads a 4- or 16-wide band: 16^2 + 4*4*16 + 4*4^2 = 576 of 9*256 products
    taps = list(valid_taps((3, 3), (12, 12), (12, 12), (16, 16), (16, 16)))
    area = sum((o[0].stop - o[0].start) * (o[1].stop - o[1].start) for _, _, o, _ in taps)
    assert len(taps) == 9 and area == 576


def test_auto_takes_gather_on_a_launch_bound_device():
    """On a GPU (``backend.launch_bound``; a CountingArray stands for one here) every k x k conv takes "gather", the
    path with the fewest array operations; 1x1 convs stay pointwise."""
    from minideeplab.profiler import CountingArray
    for (k, p, d, s), expected in [((1, 0, 1, 1), "pointwise"), ((3, 1, 1, 1), "gather"), ((7, 3, 1, 2), "gather"),
                                   ((3, 12, 12, 1), "gather")]:
        conv = nn.Conv2d(2, 2, k, s, p, d, dtype=F64)
        conv(np.zeros((1, 2, 16, 16)).view(CountingArray))
        assert conv.path == expected, (k, p, d, s)
        assert conv.choose_algorithm(16, 16, 16, 16, launch_bound=False) != "gather"


def test_forcing_a_path_that_does_not_apply_is_a_clear_error():
    with pytest.raises(ValueError, match="kn2row"):
        nn.Conv2d(2, 2, 3, stride=2, algorithm="kn2row")(np.zeros((1, 2, 8, 8), np.float32))
    with pytest.raises(ValueError, match="algorithm must be one of"):
        nn.Conv2d(2, 2, 3, algorithm="winograd")


def naive_shift_add(out, y, a, b):
    """The pixel-by-pixel definition: out[..., r, c] += y[..., r + a, c + b] wherever both pixels exist."""
    H, W = out.shape[-2:]
    for r in range(max(0, -a), min(H, H - a)):
        for c in range(max(0, -b), min(W, W - b)):
            out[..., r, c] += y[..., r + a, c + b]


ALL_SHIFTS = {(5, 7): [(a, b) for a in range(-5, 6) for b in range(-7, 8)],
              (6, 3): [(a, b) for a in range(-6, 7) for b in range(-3, 4)], (1, 4): [(0, b) for b in range(-4, 5)]}


@pytest.mark.parametrize("hw", sorted(ALL_SHIFTS))
@pytest.mark.parametrize("channels", [1, 3])
def test_sum_shifted_matches_the_pixel_by_pixel_definition(hw, channels):
    """Every shift, those reaching beyond the map (|a| >= H: nothing added) included, with and without (0, 0)."""
    rng = np.random.default_rng(0)
    shifts = ALL_SHIFTS[hw]
    blocks = rng.standard_normal((2, len(shifts), channels, *hw))
    expected = np.zeros((2, channels, *hw))
    for t, (a, b) in enumerate(shifts):
        naive_shift_add(expected, blocks[:, t], a, b)
    np.testing.assert_allclose(sum_shifted(blocks.copy(), shifts), expected, rtol=1e-13, atol=1e-13)
    no_centre = [t for t, s in enumerate(shifts) if s != (0, 0)]
    expected = np.zeros((2, channels, *hw))
    for t in no_centre:
        naive_shift_add(expected, blocks[:, t], *shifts[t])
    got = sum_shifted(blocks[:, no_centre].copy(), [shifts[t] for t in no_centre])
    np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("hw", sorted(ALL_SHIFTS))
def test_stack_shifted_is_the_adjoint_of_sum_shifted(hw):
    """<sum_shifted(Y), o> == <Y, stack_shifted(o)>, and stack_shifted against its definition."""
    rng = np.random.default_rng(1)
    shifts = ALL_SHIFTS[hw]
    Y, o = rng.standard_normal((2, len(shifts), 3, *hw)), rng.standard_normal((2, 3, *hw))
    D = stack_shifted(o, shifts)
    np.testing.assert_allclose(np.vdot(sum_shifted(Y.copy(), shifts), o), np.vdot(Y, D), rtol=1e-12)
    H, W = hw
    for t, (a, b) in enumerate(shifts):
        expected = np.zeros((2, 3, H, W))
        for r in range(H):
            for c in range(W):
                if 0 <= r - a < H and 0 <= c - b < W:
                    expected[..., r, c] = o[..., r - a, c - b]
        np.testing.assert_array_equal(D[:, t], expected, err_msg=f"shift ({a}, {b})")


def test_stack_shifted_reads_a_channel_slice_of_a_bigger_buffer():
    """kn2row's backward gets dout as a channel slice of a dense block's gradient buffer (not contiguous)."""
    rng = np.random.default_rng(2)
    buf = rng.standard_normal((2, 7, 5, 6))
    shifts = [(a, b) for a in (-1, 0, 1) for b in (-2, 0, 2)]
    np.testing.assert_array_equal(stack_shifted(buf[:, 2:5], shifts), stack_shifted(buf[:, 2:5].copy(), shifts))


@pytest.mark.parametrize("algorithm", ["pointwise", "kn2row", "taps", "im2col"])
def test_input_grad_false_skips_dx_on_every_path(algorithm):
    rng = np.random.default_rng(0)
    k, p = (1, 0) if algorithm == "pointwise" else (3, 2)
    conv = nn.Conv2d(3, 4, k, padding=p, dilation=2 if k == 3 else 1, rng=rng, dtype=F64, algorithm=algorithm)
    x, dout = rng.standard_normal((2, 3, 6, 5)), rng.standard_normal((2, 4, 6, 5))
    _, dx, dw, db = run(conv, x, dout)
    conv.zero_grad()
    conv.input_grad = False
    conv(x)
    assert dx.shape == x.shape and conv.backward(dout) is None
    np.testing.assert_array_equal(conv.weight.grad, dw)
    np.testing.assert_array_equal(conv.bias.grad, db)


def test_im2col_columns_are_reused_by_the_next_forward_of_the_same_shape(xp, rng):
    """The stem's column matrix (19 MB at 256x256) is written into the last call's instead of a fresh array, and
    each forward/backward still computes from its own input."""
    conv = nn.Conv2d(3, 4, 7, stride=2, padding=3, rng=rng, dtype=F64, algorithm="im2col").to(
        "cuda" if xp.__name__ == "cupy" else "cpu")
    fresh = nn.Conv2d(3, 4, 7, stride=2, padding=3, dtype=F64, algorithm="im2col").to(
        "cuda" if xp.__name__ == "cupy" else "cpu")
    fresh.load_state_dict(conv.state_dict())
    x1, x2 = (xp.asarray(rng.standard_normal((2, 3, 11, 10))) for _ in range(2))
    conv(x1)
    first = conv.saved
    out = conv(x2)
    assert conv.saved is first                       # same buffer, now x2's columns
    dout = xp.asarray(rng.standard_normal(out.shape))
    dx = conv.backward(dout)
    ref_out = fresh(x2)
    np.testing.assert_array_equal(to_numpy(out), to_numpy(ref_out))
    np.testing.assert_array_equal(to_numpy(dx), to_numpy(fresh.backward(dout)))
    np.testing.assert_array_equal(to_numpy(conv.weight.grad), to_numpy(fresh.weight.grad))
    conv(xp.asarray(rng.standard_normal((2, 3, 9, 10))))     # another shape: a new array
    assert conv.saved is not first and conv.saved.shape == (2, 3 * 49, 5 * 5)
