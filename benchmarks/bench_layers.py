"""Forward+backward time of single conv layers at DenseNet/ASPP shapes, ours against torch.nn.functional.conv2d.

    .venv/bin/python benchmarks/bench_layers.py [--repeats 10] [--threads N] [--json PATH] [--no-torch]

Batch 2, float32. Our phase runs first, then (when torch is installed) PyTorch's in a *separate* phase of the
same run: interleaving the OpenBLAS and OpenMP thread pools distorts both. Both use the same number of threads
(threadpoolctl for the BLAS, torch.set_num_threads). Each time is the median of ``--repeats`` runs after two
warm-up runs. The "im2col" column forces our general im2col/col2im path on the same layer, to show what the
layer's automatic choice (column "path") gains. Writes a JSON file (default benchmarks/results/layers.json).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from minideeplab.bench import conv_flops, limit_threads, machine_info, median_time, write_json
from minideeplab.nn import Conv2d

# (name, C_in, C_out, kernel, stride, padding, dilation, H=W): issue 2's shapes, then other model shapes
SHAPES = [
    ("3x3 128->32 @64 (denseblock1)", 128, 32, 3, 1, 1, 1, 64),
    ("1x1 256->128 @64 (transition1)", 256, 128, 1, 1, 0, 1, 64),
    ("3x3 d12 1024->256 @16 (ASPP)", 1024, 256, 3, 1, 12, 12, 16),
    ("7x7/2 3->64 @256 (stem)", 3, 64, 7, 2, 3, 1, 256),
    ("3x3 d2 128->32 @16 (denseblock4 OS16)", 128, 32, 3, 1, 2, 2, 16),
    ("3x3 d6 1024->256 @16 (ASPP)", 1024, 256, 3, 1, 6, 6, 16),
    ("3x3 d18 1024->256 @16 (ASPP)", 1024, 256, 3, 1, 18, 18, 16),
]
N_ISSUE_SHAPES = 4


def time_ours(shape, repeats, algorithm="auto"):
    _, C, F, k, s, p, d, H = shape
    rng = np.random.default_rng(0)
    conv = Conv2d(C, F, k, s, p, d, bias=False, rng=rng, algorithm=algorithm)
    x = rng.standard_normal((2, C, H, H), dtype=np.float32)
    dout = rng.standard_normal(conv.output_shape(x.shape), dtype=np.float32)

    def step():
        conv(x)
        conv.backward(dout)
    return median_time(lambda: conv(x), repeats), median_time(step, repeats), conv.path


def time_torch(shape, repeats):
    import torch
    import torch.nn.functional as tF
    _, C, F, k, s, p, d, H = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, C, H, H, generator=g, requires_grad=True)
    w = torch.randn(F, C, k, k, generator=g, requires_grad=True)
    dout = torch.randn_like(tF.conv2d(x, w, None, s, p, d))

    def fwd():
        with torch.no_grad():
            tF.conv2d(x, w, None, s, p, d)

    def step():
        x.grad = w.grad = None
        tF.conv2d(x, w, None, s, p, d).backward(dout)
    return median_time(fwd, repeats), median_time(step, repeats)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "layers.json"))
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch phase")
    ap.add_argument("--issue-shapes", action="store_true", help="only the four shapes of issue 2")
    args = ap.parse_args(argv)
    shapes = SHAPES[:N_ISSUE_SHAPES] if args.issue_shapes else SHAPES
    rows = [{"layer": s[0], "gflop_fwd_bwd": 3 * conv_flops(2, *s[1:]) / 1e9} for s in shapes]
    with limit_threads(args.threads):
        for row, shape in zip(rows, shapes):                      # phase 1: ours
            row["ours_fwd_s"], row["ours_fwd_bwd_s"], row["path"] = time_ours(shape, args.repeats)
            row["im2col_fwd_bwd_s"] = time_ours(shape, args.repeats, "im2col")[1]
    torch_ok = False
    if not args.no_torch:
        try:
            import torch
            torch.set_num_threads(args.threads)
            torch_ok = True
        except ImportError:
            print("torch not installed: PyTorch phase skipped", file=sys.stderr)
    if torch_ok:
        for row, shape in zip(rows, shapes):                      # phase 2: PyTorch
            row["torch_fwd_s"], row["torch_fwd_bwd_s"] = time_torch(shape, args.repeats)
            row["ratio"] = row["ours_fwd_bwd_s"] / row["torch_fwd_bwd_s"]
    print(f"conv forward+backward, batch 2, float32, {args.threads} threads, median of {args.repeats} (ms)")
    head = f"{'layer':40s} {'path':>9s} {'fwd':>7s} {'fwd+bwd':>8s} {'im2col':>8s} {'GFLOP/s':>8s}"
    print(head + (f" {'torch fwd':>9s} {'torch f+b':>9s} {'ratio':>6s}" if torch_ok else ""))
    for r in rows:
        line = (f"{r['layer']:40s} {r['path']:>9s} {1e3 * r['ours_fwd_s']:7.2f} {1e3 * r['ours_fwd_bwd_s']:8.2f} "
                f"{1e3 * r['im2col_fwd_bwd_s']:8.2f} {r['gflop_fwd_bwd'] / r['ours_fwd_bwd_s']:8.1f}")
        if torch_ok:
            line += f" {1e3 * r['torch_fwd_s']:9.2f} {1e3 * r['torch_fwd_bwd_s']:9.2f} {r['ratio']:6.2f}"
        print(line)
    write_json(args.json, {"benchmark": "layers", "threads": args.threads, "repeats": args.repeats,
                           "machine": machine_info(), "rows": rows})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
