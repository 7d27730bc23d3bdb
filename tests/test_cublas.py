"""``_cublas.matmul``: the GEMM a step captured as a CUDA graph uses (CuPy refuses its own cuBLAS calls then).

On the CPU, a stand-in for cuBLAS reads the operands exactly as cuBLAS's documentation defines its arguments
(column-major matrices at a pointer, leading dimension, op N or T, a stride between the matrices of a batch) from
the memory of NumPy arrays, so every layout decision of ``_cublas`` is checked against ``np.matmul`` without a GPU.
On a GPU the real cuBLAS does the same products, eagerly and captured in a graph."""
import ctypes
import types

import numpy as np
import pytest

from minideeplab import _cublas
from minideeplab.backend import as_captured, cuda_available, cuda_graph, matmul, to_numpy


class HostArray(np.ndarray):
    """A NumPy array that shows its address as a CuPy array does (``x.data.ptr``)."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)


def _host_xp():
    """The few CuPy functions ``_cublas.matmul`` calls, on HostArrays."""
    def host(f):
        return lambda *a, **k: np.asarray(f(*a, **k)).view(HostArray)
    return types.SimpleNamespace(empty=host(np.empty), ascontiguousarray=host(np.ascontiguousarray),
                                 broadcast_to=np.broadcast_to,
                                 cuda=types.SimpleNamespace(get_current_stream=lambda: types.SimpleNamespace(ptr=0)))


class FakeCublas:
    """cublasGemmStridedBatchedEx by its definition: C_b = alpha op(A_b) op(B_b) + beta C_b, column-major, element
    (i, j) of a stored matrix at ptr + (i + j * ld) elements, matrix b at b * stride elements further on."""
    calls = 0

    @staticmethod
    def cublasSetStream_v2(handle, stream):
        return 0

    def cublasGemmStridedBatchedEx(self, handle, op_a, op_b, m, n, k, alpha, a, a_type, lda, stride_a, b, b_type,
                                   ldb, stride_b, beta, c, c_type, ldc, stride_c, count, compute, algo):
        FakeCublas.calls += 1
        dtype = {0: np.float32, 1: np.float64}[a_type]
        assert a_type == b_type == c_type and compute == {0: 68, 1: 70}[a_type]
        size = np.dtype(dtype).itemsize

        def stored(ptr, rows, cols, ld, stride, i):        # the stored (rows, cols) matrix number i, as a view
            assert ld >= max(1, rows), "leading dimension below the number of rows"
            extent = (rows - 1) + (cols - 1) * ld + 1
            buf = (ctypes.c_char * (extent * size)).from_address(ptr + i * stride * size)
            flat = np.frombuffer(buf, dtype=dtype)
            return np.lib.stride_tricks.as_strided(flat, (rows, cols), (size, ld * size))

        for i in range(count):
            op_a_mat = stored(a, *((m, k) if op_a == 0 else (k, m)), lda, stride_a, i)
            op_b_mat = stored(b, *((k, n) if op_b == 0 else (n, k)), ldb, stride_b, i)
            op_a_mat = op_a_mat if op_a == 0 else op_a_mat.T
            op_b_mat = op_b_mat if op_b == 0 else op_b_mat.T
            out = stored(c, m, n, ldc, stride_c, i)
            out[...] = alpha._obj.value * (op_a_mat @ op_b_mat) + beta._obj.value * 0
        return 0


@pytest.fixture
def host_cublas(monkeypatch):
    fake = FakeCublas()
    monkeypatch.setattr(_cublas, "_library", lambda xp: fake)
    monkeypatch.setattr(_cublas, "_handle", lambda xp: None)
    FakeCublas.calls = 0
    return _host_xp()


def _cases(rng, dtype):
    """(a, b) pairs in the layouts the package multiplies: weights times stacks, transposed views, 1-D operands,
    channel-prefix views, 4-D stacks (the resize), operands that broadcast or need a copy."""
    def r(*shape):
        return rng.standard_normal(shape).astype(dtype)
    wide = r(2, 7, 12)
    return {
        "2d": (r(5, 7), r(7, 3)),
        "weight @ stack": (r(6, 4), r(3, 4, 9)),
        "stack @ stack^T": (r(3, 5, 9), r(3, 4, 9).transpose(0, 2, 1)),
        "W^T @ stack": (r(4, 6).T, r(2, 4, 10)),
        "prefix view": (r(3, 5), wide[:, :5]),                          # (2, 5, 12) inside (2, 7, 12)
        "column @ 2d": (r(8, 5)[:, 2], r(8, 3)),                          # 1-D, strided
        "2d @ vector": (r(4, 6), r(6)),
        "vector @ vector": (r(6), r(6)),
        "resize 4-D": (r(5, 3), r(2, 3, 3, 4)),
        "4-D @ 2d^T": (r(2, 3, 5, 4), r(6, 4).T),
        "both batched, one broadcast": (r(1, 4, 3), r(5, 3, 2)),
        "batch not one stride": (r(4, 3, 5, 2)[:, :2], r(2, 3)),        # batch strides 30, 10 over (4, 2)
        "strided rows": (r(6, 10)[::2], r(10, 3)),
        "k = 1": (r(4, 1), r(1, 5)),
        "rows of 1": (r(1, 6), r(6, 1)),
        "empty batch": (r(0, 3, 4), r(4, 2)),
    }


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matmul_hands_cublas_the_right_product(host_cublas, dtype):
    rng = np.random.default_rng(5)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)
    for name, (a, b) in _cases(rng, dtype).items():
        got = _cublas.matmul(host_cublas, a.view(HostArray), b.view(HostArray))
        expected = np.matmul(a, b)
        assert got.shape == expected.shape and got.dtype == expected.dtype, name
        np.testing.assert_allclose(np.asarray(got), expected, err_msg=name, **tol)
    assert FakeCublas.calls >= 14


def test_matmul_writes_into_out_and_checks_it(host_cublas):
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((4, 5))
    out = np.full((3, 5), np.nan).view(HostArray)
    assert _cublas.matmul(host_cublas, a.view(HostArray), b.view(HostArray), out=out) is out
    np.testing.assert_allclose(np.asarray(out), a @ b, rtol=1e-12)
    with pytest.raises(ValueError, match="C-contiguous float64 array of shape"):
        _cublas.matmul(host_cublas, a.view(HostArray), b.view(HostArray), out=np.empty((5, 3)).T.view(HostArray))
    with pytest.raises(ValueError, match="inner dimensions"):
        _cublas.matmul(host_cublas, a.view(HostArray), a.view(HostArray))
    with pytest.raises(TypeError, match="two float32 or two float64"):
        _cublas.matmul(host_cublas, a.astype(np.float32).view(HostArray), b.view(HostArray))


def test_matrix_layouts():
    """Row-major matrices go as op N with their row stride, transposed views as op T with their column stride,
    anything else (a broadcast row, negative strides) is copied first (None)."""
    x = np.zeros((6, 10), dtype=np.float32)
    assert _cublas._matrix(x, 6, 10) == (_cublas._OP_N, 10)
    assert _cublas._matrix(x[:, :4], 6, 4) == (_cublas._OP_N, 10)
    assert _cublas._matrix(x.T, 10, 6) == (_cublas._OP_T, 10)
    assert _cublas._matrix(x[::-1], 6, 10) is None
    assert _cublas._matrix(np.broadcast_to(x[:1], (6, 10)), 6, 10) is None
    assert _cublas._batch_stride(np.zeros((2, 3, 4, 5)), (2, 3)) == 20
    assert _cublas._batch_stride(np.zeros((3, 4, 5)), (2, 3)) is None     # broadcast outside, strided inside
    assert _cublas._batch_stride(np.zeros((4, 5)), (2, 3)) == 0
    assert _cublas._batch_stride(np.zeros((2, 3, 4, 5))[:, :2], (2, 2)) is None


def test_backend_matmul_is_numpy_matmul_on_the_cpu(xp):
    rng = np.random.default_rng(7)
    a, b = xp.asarray(rng.standard_normal((2, 3, 4))), xp.asarray(rng.standard_normal((4, 5)))
    np.testing.assert_allclose(to_numpy(matmul(a, b)), to_numpy(a) @ to_numpy(b), rtol=1e-12)


@pytest.mark.skipif(not cuda_available(), reason="needs CuPy and a GPU")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cuda_matmul_through_cublas_directly(dtype):
    """Real cuBLAS, in the path a captured step takes (``as_captured``), against NumPy; then the same products
    captured in a graph and replayed on new data copied into the inputs."""
    import cupy
    rng = np.random.default_rng(8)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)
    cases = _cases(rng, dtype)
    with as_captured():
        for name, (a, b) in cases.items():
            got = matmul(cupy.asarray(a), cupy.asarray(b))
            np.testing.assert_allclose(to_numpy(got), np.matmul(a, b), err_msg=name, **tol)
    a, b = (cupy.asarray(rng.standard_normal(shape).astype(dtype)) for shape in ((3, 6, 5), (5, 4)))
    out = cupy.empty((3, 6, 4), dtype=dtype)
    replay = cuda_graph(lambda: matmul(a, b, out=out))
    a[...] = cupy.asarray(rng.standard_normal(a.shape).astype(dtype))
    replay()
    np.testing.assert_allclose(to_numpy(out), to_numpy(a) @ to_numpy(b), **tol)
