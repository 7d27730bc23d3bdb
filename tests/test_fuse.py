"""``backend.fuse``: a function's elementwise chain as one GPU kernel, the same code on NumPy.

Every fused function of the package is run here on the test's backend and compared with the plain function on
NumPy: outputs, their dtypes, and the arguments it updates in place. On NumPy this checks that the decorator passes
the call through; on a GPU it checks CuPy's kernel (and that CuPy fused it at all: ``fuse.failures`` stays empty).
"""
import numpy as np
import pytest

import minideeplab.models.densenet  # noqa: F401  (registers its fused functions)
import minideeplab.nn.fused  # noqa: F401
import minideeplab.nn.norm  # noqa: F401
from minideeplab.backend import fuse, to_numpy
from minideeplab.profiler import CountingArray

C = 5
SCALES = [0.7, -1.3, 0.0, 1e-39, 2.0]       # positive, negative, zero, so small that -shift/scale overflows
SHIFTS = [0.4, -0.2, -0.5, 0.8, 0.0]


def _bounds(scales, shifts, dtype):
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return -np.array(shifts, dtype=dtype) / np.array(scales, dtype=dtype)


def _cases(rng, dtype):
    """name -> (arguments, indices of the arguments it updates in place)."""
    def vec(low=-1.0, high=1.0):
        return rng.uniform(low, high, C).astype(dtype)

    def tensor():
        return rng.standard_normal((2, C + 3, 4, 3)).astype(dtype)[:, :C]    # a channel-prefix view, as in a block

    def col():
        return vec()[:, None, None]

    def mat():
        return rng.standard_normal((4, C)).astype(dtype)

    n = 2 * 4 * 3
    block = vec(), vec()                   # a dense block's two sums, updated through prefix views
    return {
        "minideeplab.nn.norm._train_statistics": ((vec(), vec(0.1, 2), vec(), vec(0.5, 1.5), vec(), 0.9,
                                                   0.1, 0.1 * n / (n - 1), 1e-5), (2, 3)),
        "minideeplab.nn.norm._eval_affine": ((vec(), vec(0.5, 1.5), vec(), vec(), 1e-5), ()),
        "minideeplab.nn.norm._affine": ((tensor(), col(), col()), ()),
        "minideeplab.nn.norm._batch_norm_dx": ((tensor(), tensor(), col(), col(), col()), ()),
        "minideeplab.nn.norm._backward_means": ((vec(), vec(), vec(0.5, 2), float(n)), ()),
        "minideeplab.nn.fused._relu_bound": ((np.array(SCALES, dtype=dtype), np.array(SHIFTS, dtype=dtype)), ()),
        "minideeplab.nn.fused._clip_bounds": ((np.array(SCALES, dtype=dtype), np.array(SHIFTS, dtype=dtype),
                                               _bounds(SCALES, SHIFTS, dtype), np.inf, -np.inf), ()),
        "minideeplab.nn.fused._blocked_correction": ((vec(), vec(), vec(), vec()), ()),
        "minideeplab.nn.fused._weight_grad": ((mat(), mat()[:, :1], vec(), vec(), None), ()),
        "minideeplab.nn.fused._weight_grad/into": ((mat(), mat()[:, :1], vec(), vec(), mat()), (4,)),
        "minideeplab.models.densenet._subtract_terms": ((tensor(), tensor(), col(), col()), (0,)),
        "minideeplab.models.densenet._add_scaled": ((block[0][:3], block[1][:3], vec()[:3], vec()[:3], vec()[:3]),
                                                    (0, 1)),
    }


def _on(xp, a):
    """``a`` on the backend of ``xp``, keeping a view's strides (a copy of its base, viewed alike)."""
    if not isinstance(a, np.ndarray) or xp is np:
        return a.copy() if isinstance(a, np.ndarray) else a
    base = a.base if a.base is not None else a
    offset = (a.__array_interface__["data"][0] - base.__array_interface__["data"][0]) // a.itemsize
    moved = xp.asarray(base).reshape(-1)[offset:]
    return xp.lib.stride_tricks.as_strided(moved, shape=a.shape, strides=a.strides)


def test_every_fused_function_has_a_case():
    assert set(fuse.functions) == {name.split("/")[0] for name in _cases(np.random.default_rng(0), np.float32)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(_cases(np.random.default_rng(0), np.float32)))
def test_fused_function_matches_the_plain_one(xp, name, dtype):
    args, updated = _cases(np.random.default_rng(7), dtype)[name]
    function = fuse.functions[name.split("/")[0]]           # "name/variant": the same function, other arguments
    expected_args = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        expected = function.fn(*expected_args)
        moved = [_on(xp, a) for a in args]
        got = function(*moved)
    assert function.name not in fuse.failures
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = got if isinstance(got, tuple) else (got,)
    # float64: CUDA contracts a * b + c into one fused multiply-add (one rounding instead of two), so a GPU result
    # may differ from NumPy's in the last bits (1.3e-14 relative, 1e-17 absolute, seen on an H200)
    tol = dict(rtol=2e-6, atol=1e-7) if dtype == np.float32 else dict(rtol=1e-13, atol=1e-16)
    for e, g in zip(expected, got, strict=True):
        if e is None:
            assert g is None
            continue
        assert g.dtype == e.dtype and g.shape == e.shape
        np.testing.assert_allclose(to_numpy(g), e, **tol)
    for i in updated:
        np.testing.assert_allclose(to_numpy(moved[i]), expected_args[i], **tol)
        assert not np.array_equal(expected_args[i], args[i])        # it was updated indeed


@pytest.mark.parametrize("weight", [True, False], ids=["affine", "no_affine"])
def test_batch_norm_tails_without_weight_or_bias(xp, weight):
    """None stands for a missing weight (scale = inv_std) and bias (shift = -running_mean * scale)."""
    rng = np.random.default_rng(3)
    rm, rv = rng.uniform(-1, 1, C), rng.uniform(0.5, 1.5, C)
    w, b = (rng.uniform(0.5, 1.5, C), rng.uniform(-1, 1, C)) if weight else (None, None)
    inv_std, scale, shift = fuse.functions["minideeplab.nn.norm._eval_affine"](
        *[None if a is None else xp.asarray(a) for a in (rm, rv, w, b)], 1e-5)
    want_inv = 1 / np.sqrt(rv + 1e-5)
    want_scale = want_inv * (w if weight else 1)
    np.testing.assert_allclose(to_numpy(inv_std), want_inv, rtol=1e-14)
    np.testing.assert_allclose(to_numpy(scale), want_scale, rtol=1e-14)
    np.testing.assert_allclose(to_numpy(shift), (b if weight else 0) - rm * want_scale, rtol=1e-14, atol=1e-15)


def test_a_fused_call_counts_as_one_operation():
    """CountingArray takes the call (``fused_call``): one operation, what it updates in place is updated, what it
    returns counts again."""
    rng = np.random.default_rng(0)
    a, b, c, d = (rng.standard_normal(C).view(CountingArray) for _ in range(4))
    CountingArray.counts.clear()
    out = fuse.functions["minideeplab.nn.fused._blocked_correction"](a, b, c, d)
    assert dict(CountingArray.counts) == {"fused": 1}
    assert type(out) is CountingArray
    np.testing.assert_allclose(np.asarray(out), np.asarray(a) - np.asarray(b) * (np.asarray(c) - np.asarray(d)))
    sm, sk = np.zeros(C).view(CountingArray), np.zeros(C).view(CountingArray)
    CountingArray.counts.clear()
    assert fuse.functions["minideeplab.models.densenet._add_scaled"](sm[:3], sk[:3], a[:3], b[:3], c[:3]) is None
    assert dict(CountingArray.counts) == {"fused": 1}
    np.testing.assert_allclose(np.asarray(sm[:3]), np.asarray(a[:3] * b[:3]).view(np.ndarray))
    assert not np.any(np.asarray(sm[3:]))


def test_fuse_keeps_the_function_s_name_and_doc():
    f = fuse.functions["minideeplab.nn.norm._affine"]
    assert f.__name__ == "_affine" and "scale" in f.__doc__


class _FakeCupy:
    """Stands for CuPy in ``backend`` (its arrays: a NumPy subclass), with a ``fuse`` that refuses or that records."""

    class ndarray(np.ndarray):
        pass

    def __init__(self, refuse):
        self.refuse, self.calls = refuse, 0

    def fuse(self, fn):
        def kernel(*args):
            if self.refuse:
                raise TypeError("cannot fuse this")
            self.calls += 1
            return fn(*args)
        return kernel

    @staticmethod
    def get_array_module(*arrays):
        return np


@pytest.fixture
def fake_cupy(monkeypatch):
    from minideeplab import backend
    monkeypatch.setattr(fuse, "functions", {})
    monkeypatch.setattr(fuse, "failures", {})

    def install(refuse):
        fake = _FakeCupy(refuse)
        monkeypatch.setattr(backend, "_cupy", fake)
        return fake
    return install


def _double_into(a, b):
    b[...] = 2 * a
    return a + b


def test_a_function_cupy_cannot_fuse_runs_op_by_op_with_a_warning(fake_cupy):
    fake_cupy(refuse=True)
    f = fuse(_double_into)
    a, b = np.ones(3).view(_FakeCupy.ndarray), np.zeros(3).view(_FakeCupy.ndarray)
    with pytest.warns(RuntimeWarning, match="could not fuse"):
        out = f(a, b)
    np.testing.assert_array_equal(out, 3.0)
    np.testing.assert_array_equal(b, 2.0)                   # the plain function ran once, in full
    assert isinstance(fuse.failures[f.name], TypeError) and f.kernel is None
    np.testing.assert_array_equal(f(a, b), 3.0)             # from then on: plain, without another warning


def test_a_fused_function_runs_cupy_s_kernel_on_device_arrays_only(fake_cupy):
    fake = fake_cupy(refuse=False)
    f = fuse(_double_into)
    assert fuse.functions == {f.name: f}
    f(np.ones(3), np.zeros(3))                              # NumPy arrays: the function itself
    assert fake.calls == 0
    f(np.ones(3).view(_FakeCupy.ndarray), np.zeros(3).view(_FakeCupy.ndarray))
    assert fake.calls == 1 and not fuse.failures
