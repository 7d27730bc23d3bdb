"""Matrix products through cuBLAS itself (ctypes), for GPU work that is being captured as a CUDA graph.

CuPy 14 refuses every cuBLAS call while the current stream is being captured ("NotImplementedError: calling cuBLAS
API during stream capture is currently unsupported", seen on an H200), though cuBLAS itself supports capture (CUDA
graphs of PyTorch capture its GEMMs). ``backend.matmul`` comes here while a step is captured, and in the warm-up
steps before the capture, so that the capture meets nothing new. It uses the very library CuPy loaded, a handle of
its own with a fixed workspace (no allocation during a capture) and the current stream, set before every call.

Row-major ``C = A @ B`` is column-major ``C^T = B^T A^T``, so cuBLAS gets B first. Each operand goes as it lies in
memory: a row-major matrix is, read column-major, its own transpose (op N), a transposed view is the matrix itself
(op T). A stack of matrices is one strided-batched call, with stride 0 for an operand that broadcasts. No module
imports CuPy but ``backend``, which passes it in (``xp``).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

import numpy as np

_OP_N, _OP_T = 0, 1
# dtype -> (cudaDataType, cublasComputeType: pure float32/float64 arithmetic, no TF32, the host scalar type)
_TYPES = {np.dtype(np.float32): (0, 68, ctypes.c_float), np.dtype(np.float64): (1, 70, ctypes.c_double)}
_GEMM_DEFAULT = -1
_WORKSPACE_BYTES = 32 * 2**20
_lib = None
_handles: dict = {}           # device id -> (cublasHandle_t, its workspace, kept alive here)


def _library(xp):
    """The cuBLAS that CuPy loaded (found in this process's memory map), with the prototypes used here."""
    global _lib
    if _lib is not None:
        return _lib
    xp.cuda.device.get_cublas_handle()           # makes CuPy load its cuBLAS, if it has not yet
    paths = []
    try:
        with open("/proc/self/maps") as maps:
            paths = [p for p in (line.split()[-1] for line in maps) if os.path.basename(p).startswith("libcublas.so")]
    except OSError:
        pass
    names = paths[:1] + [n for n in (ctypes.util.find_library("cublas"), "libcublas.so.13", "libcublas.so.12") if n]
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        raise RuntimeError(f"matmul under CUDA graph capture: cuBLAS not found (tried {names})")
    vp, i, ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
    lib.cublasCreate_v2.argtypes = [ctypes.POINTER(vp)]
    lib.cublasSetStream_v2.argtypes = [vp, vp]
    lib.cublasSetWorkspace_v2.argtypes = [vp, vp, ctypes.c_size_t]
    lib.cublasGemmStridedBatchedEx.argtypes = [vp, i, i, i, i, i, vp, vp, i, i, ll, vp, i, i, ll, vp, vp, i, i, ll,
                                               i, i, i]
    _lib = lib
    return lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"matmul under CUDA graph capture: {what} returned cuBLAS status {status}")


def _handle(xp):
    """This device's handle, its workspace set once (cuBLAS would otherwise allocate one while capturing)."""
    device = xp.cuda.Device().id
    if device not in _handles:
        lib, handle = _library(xp), ctypes.c_void_p()
        _check(lib.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate")
        workspace = xp.cuda.memory.Memory(_WORKSPACE_BYTES)     # cudaMalloc, outside any pool
        _check(lib.cublasSetWorkspace_v2(handle, workspace.ptr, _WORKSPACE_BYTES), "cublasSetWorkspace")
        _handles[device] = (handle, workspace)
    return _handles[device][0]


def _matrix(x, rows: int, cols: int):
    """(op, ld) with which cuBLAS reads the matrices of ``x`` (last two axes: rows x cols) as their transposes,
    or None when they lie in memory neither row- nor column-major (the caller copies)."""
    sr, sc = (s // x.itemsize for s in x.strides[-2:])
    if (cols == 1 or sc == 1) and (rows == 1 or sr >= cols):      # row-major: read column-major it is x^T
        return _OP_N, max(sr if rows > 1 else cols, 1)
    if (rows == 1 or sr == 1) and (cols == 1 or sc >= rows):      # column-major (a transposed view): x itself
        return _OP_T, max(sc if cols > 1 else rows, 1)
    return None


def _batch_stride(x, batch: tuple) -> int | None:
    """The one element stride between the matrices of ``x`` over the broadcast ``batch`` axes (0: broadcast), or
    None when they do not follow each other at one stride."""
    lead = len(batch) - (x.ndim - 2)
    strides = [0] * lead + [s // x.itemsize if n > 1 else 0 for s, n in zip(x.strides[:-2], x.shape[:-2])]
    stride, expect = 0, None
    for n, s in reversed(list(zip(batch, strides))):   # innermost batch axis first
        if n == 1:
            continue
        if expect is None:
            stride, expect = s, s * n
        elif s != expect:
            return None
        else:
            expect = s * n
    return stride


def matmul(xp, a, b, out=None):
    """``a @ b`` of CuPy arrays with NumPy's rules (1-D operands, stacks that broadcast), by cuBLAS called directly;
    into ``out`` (C-contiguous, of the result's shape and dtype) if given."""
    if a.dtype != b.dtype or a.dtype not in _TYPES:
        raise TypeError(f"matmul under CUDA graph capture: needs two float32 or two float64 arrays, got {a.dtype} "
                        f"and {b.dtype}")
    a2 = a[None, :] if a.ndim == 1 else a
    b2 = b[:, None] if b.ndim == 1 else b
    (m, k), (k2, n) = a2.shape[-2:], b2.shape[-2:]
    if k != k2:
        raise ValueError(f"matmul: operands' inner dimensions differ: {a.shape} @ {b.shape}")
    batch = np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
    shape = batch + ((m,) if a.ndim > 1 else ()) + ((n,) if b.ndim > 1 else ())
    if out is None:
        out = xp.empty(shape, dtype=a.dtype)
    elif out.shape != shape or out.dtype != a.dtype or not out.flags.c_contiguous:
        raise ValueError(f"matmul: out must be a C-contiguous {a.dtype} array of shape {shape}, got "
                         f"{out.dtype} {out.shape}")
    count = int(np.prod(batch, dtype=np.int64))
    if out.size == 0:
        return out
    if k == 0:
        out[...] = 0
        return out
    operands = []
    for x, rows, cols in ((a2, m, k), (b2, k, n)):
        layout, stride = _matrix(x, rows, cols), _batch_stride(x, batch)
        if layout is None or stride is None:          # gathered into C order first (one copy kernel)
            x = xp.ascontiguousarray(xp.broadcast_to(x, batch + (rows, cols)))
            layout, stride = _matrix(x, rows, cols), (rows * cols if count > 1 else 0)
        operands.append((x, layout, stride))
    (a2, (op_a, ld_a), s_a), (b2, (op_b, ld_b), s_b) = operands
    dtype, compute, scalar = _TYPES[a.dtype]
    one, zero = scalar(1), scalar(0)
    lib, handle = _library(xp), _handle(xp)
    _check(lib.cublasSetStream_v2(handle, xp.cuda.get_current_stream().ptr), "cublasSetStream")
    _check(lib.cublasGemmStridedBatchedEx(handle, op_b, op_a, n, m, k, ctypes.byref(one), b2.data.ptr, dtype, ld_b,
                                          s_b, a2.data.ptr, dtype, ld_a, s_a, ctypes.byref(zero), out.data.ptr,
                                          dtype, n, m * n, count, compute, _GEMM_DEFAULT), "cublasGemmStridedBatchedEx")
    return out
