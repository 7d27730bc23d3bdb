"""From the textbook convolution to each fast path: forward+backward time of one conv layer, path by path.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/conv_paths.py [--repeats 7] [--threads 1] [--json PATH]

Rows, in the order docs/fast_paths.md walks them: the textbook ``Conv2d`` (``minideeplab.textbook``: im2col, one
GEMM, col2im), then the fast ``minideeplab.nn.Conv2d`` forced to each of its paths (``conv.algorithm``): "im2col"
(the same algorithm, its copies made faster), "pointwise" (1x1: no copy at all), "kn2row", "taps", "gather" (the
GPU's path, timed here on the CPU for completeness). Columns: conv shapes of the model, batch 2, float32; "-" where
a path does not apply. The last row is the path the fast layer picks itself ("auto").

Each cell is the median of ``--repeats`` forward+backward calls after two warm-up calls, with the BLAS limited to
``--threads`` (default 1) threads: two tables, the process CPU time (with one thread, what the call costs on a core
of its own, which other processes on a shared machine barely disturb) and the wall-clock time. The paths of one shape are timed interleaved (one call of each in turn), so a
machine whose speed drifts slows them alike. Every path's output is checked against the textbook's first.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from minideeplab import nn
from minideeplab import textbook as tb
from minideeplab.bench import limit_threads, machine_info, write_json

# (name, C_in, C_out, kernel, stride, padding, dilation, H=W)
SHAPES = [
    ("3x3 128->32 @64 (dense layer, block 1)", 128, 32, 3, 1, 1, 1, 64),
    ("1x1 256->128 @64 (transition 1)", 256, 128, 1, 1, 0, 1, 64),
    ("3x3 rate 12, 1024->256 @16 (ASPP)", 1024, 256, 3, 1, 12, 12, 16),
    ("3x3 rate 18, 1024->256 @16 (ASPP)", 1024, 256, 3, 1, 18, 18, 16),
    ("7x7/2 3->64 @256 (stem)", 3, 64, 7, 2, 3, 1, 256),
]
PATHS = ["textbook", "im2col", "pointwise", "kn2row", "taps", "gather"]


def applies(path: str, k: int, s: int, p: int) -> bool:
    return {"textbook": True, "im2col": True, "gather": True, "pointwise": k == 1 and p == 0,
            "kn2row": s == 1, "taps": s == 1}[path]


def make(path: str, shape):
    _, C, F, k, s, p, d, _ = shape
    if path == "textbook":
        return tb.Conv2d(C, F, k, s, p, d, bias=False, rng=np.random.default_rng(0))
    return nn.Conv2d(C, F, k, s, p, d, bias=False, rng=np.random.default_rng(0), algorithm=path)


def measure(shape, repeats: int) -> dict:
    """{path: median seconds of forward+backward}, the paths timed interleaved; plus the path "auto" picks."""
    _, C, F, k, s, p, d, H = shape
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, C, H, H), dtype=np.float32)
    convs = {path: make(path, shape) for path in PATHS if applies(path, k, s, p)}
    reference = convs["textbook"](x)
    dout = rng.standard_normal(reference.shape, dtype=np.float32)
    for path, conv in convs.items():          # the same numbers first (float32: relative to the output's scale)
        err = float(np.abs(conv(x) - reference).max() / np.abs(reference).max())
        if err > 1e-4:
            raise AssertionError(f"{shape[0]}: path {path} differs from the textbook conv by {err:.1e}")

    def step(conv):
        conv(x)
        conv.backward(dout)

    wall, cpu = {path: [] for path in convs}, {path: [] for path in convs}
    for _ in range(2):
        for conv in convs.values():
            step(conv)
    for _ in range(repeats):
        for path, conv in convs.items():
            c, t = time.process_time(), time.perf_counter()
            step(conv)
            wall[path].append(time.perf_counter() - t)
            cpu[path].append(time.process_time() - c)
    auto = nn.Conv2d(C, F, k, s, p, d, bias=False, rng=np.random.default_rng(0))
    auto(x)
    return {"seconds": {path: statistics.median(t) for path, t in wall.items()},
            "cpu_seconds": {path: statistics.median(t) for path, t in cpu.items()}, "auto": auto.path}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    results = []
    with limit_threads(args.threads):
        for shape in SHAPES:
            print(f"  {shape[0]} ...", file=sys.stderr, flush=True)
            results.append((shape[0], measure(shape, args.repeats)))
    names = [name for name, _ in results]
    for key, what in (("cpu_seconds", "process CPU time"), ("seconds", "wall-clock time")):
        print(f"\nforward+backward, batch 2, float32, {args.threads} thread(s), median of {args.repeats} interleaved "
              f"runs, {what} in ms\n")
        print("| path | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for path in PATHS:
            cells = [f"{1e3 * r[key][path]:.1f}" if path in r[key] else "-" for _, r in results]
            print(f"| {path} | " + " | ".join(cells) + " |")
        print("| auto picks | " + " | ".join(r["auto"] for _, r in results) + " |")
    if args.json:
        write_json(args.json, {"args": vars(args), "machine": machine_info(),
                               "results": {name: r for name, r in results}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
