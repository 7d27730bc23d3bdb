"""What two reliability checks cost: FolderDataset's check of every file, and Parameter.data as a property.

    PYTHONPATH=. .venv/bin/python benchmarks/reliability_costs.py [--pairs 200] [--size 256] [--rounds 5]

1. The dataset check (``FolderDataset.verify``: read, CRC-32 and decode every image and mask, check sizes and the
   mask rule) on a folder of ``--pairs`` PNG pairs of ``--size`` pixels, against building the dataset without it
   (``verify=False``: the layout only) and against one pass of reading the items as training does (``raw``).
2. ``Parameter.data`` is a property (it keeps ``grad`` consistent when assigned): the time of one read, property
   against a plain attribute, times the number of reads one training step makes (counted), against the step.

Rounds alternate the variants (the machine is shared: medians of interleaved runs).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import timeit
from pathlib import Path

import numpy as np


def make_folder(root: Path, pairs: int, size: int) -> None:
    """Photo-like PNGs (smooth gradients + noise, which compress as photos do) and 0/255 disc masks."""
    from PIL import Image
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[:size, :size] / size
    for i in range(pairs):
        base = np.stack([xx, yy, (xx + yy) / 2], axis=2) * 200 + rng.normal(0, 12, (size, size, 3))
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(root / "images" / f"{i:04d}.png")
        cx, cy, r = rng.uniform(0.3, 0.7, 2).tolist() + [rng.uniform(0.1, 0.3)]
        mask = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r).astype(np.uint8) * 255
        Image.fromarray(mask).save(root / "masks" / f"{i:04d}.png")


def dataset_check(pairs: int, size: int, rounds: int) -> None:
    from minideeplab.data import FolderDataset
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        make_folder(root, pairs, size)
        megabytes = sum(p.stat().st_size for p in root.rglob("*.png")) / 1e6
        times = {"verify": [], "layout only": [], "one pass of items": []}
        for _ in range(rounds):
            t = time.perf_counter()
            FolderDataset(root, progress=False)
            times["verify"].append(time.perf_counter() - t)
            t = time.perf_counter()
            ds = FolderDataset(root, verify=False)
            times["layout only"].append(time.perf_counter() - t)
            t = time.perf_counter()
            for i in range(len(ds)):
                ds.raw(i)
            times["one pass of items"].append(time.perf_counter() - t)
    print(f"dataset check: {pairs} pairs of {size}x{size} PNGs ({megabytes:.1f} MB), median of {rounds} rounds")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:<18} {med:7.3f} s  ({1e3 * med / pairs:.2f} ms per pair; min {min(ts):.3f} s)")


class _Plain:
    def __init__(self, a):
        self.data = a


def _training_step(config, size: int):
    """The benchmark's training step (forward, BCE, backward without the image's gradient, SGD) at 2x3xSIZExSIZE."""
    from minideeplab.losses import BCEWithLogitsLoss
    from minideeplab.models import build_deeplab
    from minideeplab.optim import SGD
    model = build_deeplab(config, rng=np.random.default_rng(0))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, size, size)).astype(np.float32)
    t = (rng.random((2, 1, size, size)) < 0.3).astype(np.float32)
    loss, opt = BCEWithLogitsLoss(), SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad()
        loss(model(x), t)
        model.backward(loss.backward(), input_grad=False)
        opt.step()
    return step


def parameter_access(rounds: int) -> None:
    from minideeplab import nn
    from minideeplab.models import DeepLabConfig

    a = np.zeros(3, np.float32)
    p, plain = nn.Parameter(a), _Plain(a)
    n = 2_000_000
    prop, attr = [], []
    for _ in range(rounds):
        prop.append(min(timeit.repeat(lambda: p.data, number=n, repeat=3)) / n)
        attr.append(min(timeit.repeat(lambda: plain.data, number=n, repeat=3)) / n)
    extra = statistics.median(prop) - statistics.median(attr)
    print(f"Parameter.data read: property {1e9 * statistics.median(prop):.0f} ns, plain attribute "
          f"{1e9 * statistics.median(attr):.0f} ns (both with the lambda call): {1e9 * extra:.0f} ns more per read")

    reads = [0]
    original = nn.Parameter.data
    getter = original.fget

    def counting(self):
        reads[0] += 1
        return getter(self)
    for name, config, size in (("small", DeepLabConfig.small(), 64), ("densenet121", DeepLabConfig(), 96)):
        step = _training_step(config, size)
        step()
        nn.Parameter.data = property(counting, original.fset)
        reads[0] = 0
        try:
            step()
        finally:
            nn.Parameter.data = original
        seconds = statistics.median(timeit.repeat(step, number=1, repeat=rounds))
        print(f"  {name} training step at 2x3x{size}x{size}: {reads[0]} reads of .data, {1e6 * reads[0] * extra:.0f} "
              f"us more, of a {1e3 * seconds:.0f} ms step ({100 * reads[0] * extra / seconds:.4f} %)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    dataset_check(args.pairs, args.size, args.rounds)
    parameter_access(args.rounds)


if __name__ == "__main__":
    main()
