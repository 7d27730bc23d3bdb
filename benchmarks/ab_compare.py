"""Paired A/B of our step: the working tree's package against a committed version, side by side in ONE process.

    .venv/bin/python benchmarks/ab_compare.py --base 4ce1f3f [--mode train|eval] [--pairs 20] [--os 16] [--threads 2]
                                              [--clock wall|cpu] [--no-grad]

On a shared machine whose speed drifts by tens of percent within minutes, two runs one after the other say little
about a few percent. Here both versions are imported at once (the base one extracted with ``git archive`` into a
temporary folder and imported under another name), built with the same weights and input, and their steps
alternate (ABBA order), so that the drift hits both alike; the result is the median and quartiles of the paired
ratios new / base. Batch 2x3x256x256 float32 (``--size``, ``--batch``); train = forward, BCE, backward without
the image's gradient, SGD with momentum (as ``minideeplab bench``); eval = forward in eval mode.
"""
from __future__ import annotations

import argparse
import importlib
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BASE_NAME = "minideeplab_base"


def import_base(rev: str, folder: Path):
    """The package as committed at ``rev``, imported as ``minideeplab_base`` (its imports are relative)."""
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev, "minideeplab"],
                         capture_output=True, check=False)
    if tar.returncode != 0:
        raise SystemExit(f"ab_compare: git archive {rev} failed: {tar.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as archive:
        if hasattr(tarfile, "data_filter"):       # Python >= 3.11.4: refuse paths outside the folder
            archive.extractall(folder, filter="data")
        else:
            archive.extractall(folder)
    (folder / "minideeplab").rename(folder / BASE_NAME)
    sys.path.insert(0, str(folder))
    return importlib.import_module(BASE_NAME)


def make_step(pkg, mode: str, output_stride: int, batch: int, size: int, small: bool, no_grad: bool = False):
    """One step of ``pkg``'s DeepLabV3-DenseNet121 (``small``: the tiny config), built from seed 0."""
    models = importlib.import_module(pkg.__name__ + ".models")
    losses = importlib.import_module(pkg.__name__ + ".losses")
    optim = importlib.import_module(pkg.__name__ + ".optim")
    config = (models.DeepLabConfig.small if small else models.DeepLabConfig)(output_stride=output_stride)
    model = models.build_deeplab(config, rng=np.random.default_rng(0))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
    target = (rng.random((batch, 1, size, size)) < 0.3).astype(np.float32)
    loss_fn, opt = losses.BCEWithLogitsLoss(), optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if mode == "eval":
        model.eval()
        inference = getattr(importlib.import_module(pkg.__name__ + ".nn"), "no_grad", None) if no_grad else None
        if inference is None:            # (a version without nn.no_grad runs its plain eval forward)
            return lambda: model(x)

        def eval_step():
            with inference():
                model(x)
        return eval_step

    def train_step():
        opt.zero_grad()
        loss_fn(model(x), target)
        model.backward(loss_fn.backward(), input_grad=False)
        opt.step()
    return train_step


def paired_ratios(new_step, base_step, pairs: int, clock=time.perf_counter) -> list[float]:
    """``pairs`` ratios time(new) / time(base), the two steps run back to back in alternating order."""
    for step in (new_step, base_step, new_step, base_step):      # warm-up: allocations, optimizer state
        step()
    ratios = []
    for i in range(pairs):
        times = {}
        for name, step in ((("new", new_step), ("base", base_step)) if i % 2 == 0
                           else (("base", base_step), ("new", new_step))):
            start = clock()
            step()
            times[name] = clock() - start
        ratios.append(times["new"] / times["base"])
    return ratios


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="the committed version to compare against (any git revision)")
    ap.add_argument("--mode", choices=("train", "eval"), default="train")
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--os", type=int, choices=(8, 16, 32), default=16, dest="output_stride")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="the tiny config (DeepLabConfig.small): a smoke run")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: this thread's CPU time (time.thread_time), which other processes on a busy machine "
                         "barely change; honest with --threads 1 only (BLAS then computes in this thread)")
    ap.add_argument("--no-grad", action="store_true",
                    help="eval: run each version's forward under its nn.no_grad, where it has one (as the benchmark)")
    args = ap.parse_args(argv)
    if args.pairs < 2:
        ap.error(f"--pairs must be at least 2, got {args.pairs}")
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu needs --threads 1 (the CPU time of BLAS's other threads would not be counted)")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    from threadpoolctl import threadpool_limits

    sys.path.insert(0, str(ROOT))
    import minideeplab as new
    with tempfile.TemporaryDirectory() as tmp:
        try:
            base = import_base(args.base, Path(tmp))
            steps = [make_step(pkg, args.mode, args.output_stride, args.batch, args.size, args.small, args.no_grad)
                     for pkg in (new, base)]
            with threadpool_limits(args.threads):
                ratios = paired_ratios(*steps, args.pairs, clock)
        finally:                                    # leave no trace of the base package in this interpreter
            sys.path[:] = [p for p in sys.path if p != tmp]
            for name in [m for m in sys.modules if m == BASE_NAME or m.startswith(BASE_NAME + ".")]:
                del sys.modules[name]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    print(f"{args.mode} step, OS {args.output_stride}, {args.batch}x3x{args.size}x{args.size}, {args.threads} threads: "
          f"{args.clock} time new / {args.base} = {statistics.median(ratios):.3f} (median of {len(ratios)} paired ratios, "
          f"quartiles {q1:.3f}-{q3:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
