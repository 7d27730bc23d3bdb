"""Winograd F(2x2, 3x3) in NumPy against our kn2row for the dense layers' 3x3 convs (tried in the thirteenth round).

    .venv/bin/python benchmarks/bench_winograd.py

F(2x2, 3x3) computes each 2x2 output tile from a 4x4 input tile with 16 multiplies per (input, output) channel
pair instead of 36 (2.25x fewer): U = G w G^T (the weight, 16 (F, C) matrices), V = B^T d B (the input tiles),
M = U ⊙ V summed over C (16 GEMMs (F, C) @ (C, tiles)), Y = A^T M A. Here the transforms are NumPy passes over
strided views (4 along rows, 16 along columns, 8 for the output), the GEMMs one batched matmul. Prints, for
128 -> 32 channels (the dense layers' conv2) at 64x64, 32x32 and 16x16, batch 1 and 2, one and two BLAS threads,
the fastest of 30 calls of each (one thread: thread CPU time; two: wall time), their ratio, the relative error
against kn2row, and where Winograd's time goes at 64x64 and 16x16.
"""
from __future__ import annotations

import time

import numpy as np
from threadpoolctl import threadpool_limits

from minideeplab.nn import Conv2d, no_grad

G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]])


def weight_transform(w):
    """U = G w G^T per (F, C): (F, C, 3, 3) -> (16, F, C), in float64 then cast."""
    U = np.einsum("ai,fcij,bj->abfc", G, w.astype(np.float64), G)
    return np.ascontiguousarray(U.reshape(16, *w.shape[:2]), dtype=w.dtype)


def input_transform(x):
    """V = B^T d B for every 4x4 tile (stride 2) of x padded by 1: (N, C, H, W) -> (16, N, C, H/2 * W/2)."""
    N, C, H, W = x.shape
    Th, Tw = H // 2, W // 2
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    r = [xp[:, :, k:k + 2 * Th:2] for k in range(4)]                # the tiles' four rows
    u = np.empty((4, N, C, Th, W + 2), x.dtype)                     # B^T along the rows
    np.subtract(r[0], r[2], out=u[0])
    np.add(r[1], r[2], out=u[1])
    np.subtract(r[2], r[1], out=u[2])
    np.subtract(r[1], r[3], out=u[3])
    V = np.empty((4, 4, N, C, Th, Tw), x.dtype)                     # B along the columns
    for a in range(4):
        c = [u[a][..., k:k + 2 * Tw:2] for k in range(4)]
        np.subtract(c[0], c[2], out=V[a, 0])
        np.add(c[1], c[2], out=V[a, 1])
        np.subtract(c[2], c[1], out=V[a, 2])
        np.subtract(c[1], c[3], out=V[a, 3])
    return V.reshape(16, N, C, Th * Tw)


def output_transform(M, N, F, H, W):
    """Y = A^T M A: (16, N, F, tiles) -> (N, F, H, W)."""
    M = M.reshape(4, 4, N, F, H // 2, W // 2)
    s0 = M[0] + M[1]
    s0 += M[2]
    s1 = M[1] - M[2]
    s1 -= M[3]
    out = np.empty((N, F, H, W), M.dtype)
    for i, s in enumerate((s0, s1)):
        o = out[:, :, i::2, 0::2]
        np.add(s[0], s[1], out=o)
        o += s[2]
        o = out[:, :, i::2, 1::2]
        np.subtract(s[1], s[2], out=o)
        o -= s[3]
    return out


def winograd(x, U):
    N, _, H, W = x.shape
    return output_transform(np.matmul(U[:, None], input_transform(x)), N, U.shape[1], H, W)


def fastest(clock, fn, *args, reps=30):
    """The fastest of ``reps`` calls ``fn(*args)`` by ``clock``."""
    best = float("inf")
    for _ in range(reps):
        start = clock()
        fn(*args)
        best = min(best, clock() - start)
    return best


def main() -> None:
    rng = np.random.default_rng(0)
    for threads in (1, 2):
        clock = time.thread_time if threads == 1 else time.perf_counter
        with threadpool_limits(threads), no_grad():
            for N in (1, 2):
                for S in (64, 32, 16):
                    conv = Conv2d(128, 32, 3, padding=1, bias=False, rng=rng)
                    x = rng.standard_normal((N, 128, S, S), dtype=np.float32)
                    U = weight_transform(conv.weight.data)
                    ref = conv(x)
                    err = np.abs(winograd(x, U) - ref).max() / np.abs(ref).max()
                    tk, tw = fastest(clock, conv, x), fastest(clock, winograd, x, U)
                    print(f"{threads} thread(s), batch {N}, {S}x{S}: kn2row {tk * 1e3:.3f} ms, Winograd "
                          f"{tw * 1e3:.3f} ms ({tw / tk:.2f}x), relative error {err:.1e}")
    with threadpool_limits(1):
        for S in (64, 16):
            x = rng.standard_normal((1, 128, S, S), dtype=np.float32)
            U = weight_transform(rng.standard_normal((32, 128, 3, 3), dtype=np.float32))
            V = input_transform(x)
            M = np.matmul(U[:, None], V)
            parts = {"input transform": fastest(time.thread_time, input_transform, x),
                     "16 GEMMs": fastest(time.thread_time, np.matmul, U[:, None], V),
                     "output transform": fastest(time.thread_time, output_transform, M, 1, 32, S, S)}
            print(f"Winograd at {S}x{S}, batch 1, one thread: " +
                  ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in parts.items()))


if __name__ == "__main__":
    main()
