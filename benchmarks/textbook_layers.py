"""Each textbook layer beside its fast twin: forward+backward time at a shape of the model, same numbers.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/textbook_layers.py [--repeats 7] [--threads 1] [--json PATH]

For every pair (``minideeplab.textbook.X``, its fast twin in ``minideeplab.nn`` / ``models`` / ``losses``) the fast
layer gets the textbook layer's state, both run forward and backward once on the same input and upstream gradient
(checked to agree), then ``--repeats`` timed calls of each, interleaved (one call of each in turn: a machine whose
speed drifts slows both alike), after two warm-up calls. Batch 2, float32, training mode unless said, BLAS limited to
``--threads`` threads (default 1). Printed: median process CPU time (with one thread the cost on a core of its own,
which other processes barely disturb) and wall-clock time, in ms, and the ratio textbook / fast of the CPU times.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from minideeplab import losses, nn
from minideeplab import textbook as tb
from minideeplab.bench import limit_threads, machine_info, write_json
from minideeplab.models import aspp as fast_aspp
from minideeplab.models import densenet as fast_densenet


def _rng():
    return np.random.default_rng(0)


# (name, make textbook, make fast, input shape, mode)
PAIRS = [
    ("Conv2d 3x3 128->32 @64 (kn2row)", lambda: tb.Conv2d(128, 32, 3, padding=1, bias=False, rng=_rng()),
     lambda: nn.Conv2d(128, 32, 3, padding=1, bias=False, rng=_rng()), (2, 128, 64, 64), "train"),
    ("Conv2d 3x3 rate 18 1024->256 @16 (kn2row, 1 tap)",
     lambda: tb.Conv2d(1024, 256, 3, padding=18, dilation=18, bias=False, rng=_rng()),
     lambda: nn.Conv2d(1024, 256, 3, padding=18, dilation=18, bias=False, rng=_rng()), (2, 1024, 16, 16), "train"),
    ("BatchNorm2d 128 @64", lambda: tb.BatchNorm2d(128), lambda: nn.BatchNorm2d(128), (2, 128, 64, 64), "train"),
    ("BatchNorm2d 128 @64, eval", lambda: tb.BatchNorm2d(128), lambda: nn.BatchNorm2d(128), (2, 128, 64, 64),
     "eval"),
    ("ReLU @64x64x128", lambda: tb.ReLU(), lambda: nn.ReLU(), (2, 128, 64, 64), "train"),
    ("MaxPool2d 3/2 pad 1 (stem) @128", lambda: tb.MaxPool2d(3, 2, 1), lambda: nn.MaxPool2d(3, 2, 1),
     (2, 64, 128, 128), "train"),
    ("AvgPool2d 2/2 (transition 1) @64", lambda: tb.AvgPool2d(2, 2), lambda: nn.AvgPool2d(2, 2), (2, 128, 64, 64),
     "train"),
    ("AdaptiveAvgPool2d 1024 @16", lambda: tb.AdaptiveAvgPool2d(1), lambda: nn.AdaptiveAvgPool2d(1),
     (2, 1024, 16, 16), "train"),
    ("Upsample 16 -> 256 (logits)", lambda: tb.Upsample(size=(256, 256)), lambda: nn.Upsample(size=(256, 256)),
     (2, 1, 16, 16), "train"),
    ("Dropout 0.1 @16x16x256", lambda: tb.Dropout(0.1, rng=_rng()), lambda: nn.Dropout(0.1, rng=_rng()),
     (2, 256, 16, 16), "train"),
    ("DenseLayer 224->32 @64", lambda: tb.DenseLayer(224, 32, 4, rng=_rng()),
     lambda: fast_densenet.DenseLayer(224, 32, 4, rng=_rng()), (2, 224, 64, 64), "train"),
    ("DenseBlock 1 of densenet121 @64", lambda: tb.DenseBlock(6, 64, 4, 32, rng=_rng()),
     lambda: fast_densenet.DenseBlock(6, 64, 4, 32, rng=_rng()), (2, 64, 64, 64), "train"),
    ("DenseBlock 1 of densenet121 @64, eval", lambda: tb.DenseBlock(6, 64, 4, 32, rng=_rng()),
     lambda: fast_densenet.DenseBlock(6, 64, 4, 32, rng=_rng()), (2, 64, 64, 64), "eval"),
    ("Transition 1 256->128 @64", lambda: tb.Transition(256, 128, rng=_rng()),
     lambda: fast_densenet.Transition(256, 128, rng=_rng()), (2, 256, 64, 64), "train"),
    ("ASPP 1024->256 @16 (OS 16)", lambda: tb.ASPP(1024, 256, rng=_rng()),
     lambda: fast_aspp.ASPP(1024, 256, rng=_rng()), (2, 1024, 16, 16), "train"),
]
LOSS_PAIRS = [
    ("BCEWithLogitsLoss @256", tb.BCEWithLogitsLoss, losses.BCEWithLogitsLoss),
    ("DiceLoss @256", tb.DiceLoss, losses.DiceLoss),
]


def time_pair(ours, fast, call, repeats: int) -> dict:
    """Median CPU and wall seconds of ``call(module)`` for the two modules, interleaved."""
    cpu, wall = {"textbook": [], "fast": []}, {"textbook": [], "fast": []}
    for _ in range(2):
        call(ours)
        call(fast)
    for _ in range(repeats):
        for key, m in (("textbook", ours), ("fast", fast)):
            c, t = time.process_time(), time.perf_counter()
            call(m)
            wall[key].append(time.perf_counter() - t)
            cpu[key].append(time.process_time() - c)
    return {"cpu_s": {k: statistics.median(v) for k, v in cpu.items()},
            "wall_s": {k: statistics.median(v) for k, v in wall.items()}}


def _check(name, a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
    if err > 1e-3:
        raise AssertionError(f"{name}: the textbook layer and its fast twin differ by {err:.1e}")


def measure_layer(name, make_ours, make_fast, shape, mode, repeats):
    ours, fast = make_ours().train(mode == "train"), make_fast().train(mode == "train")
    if ours.state_dict():
        fast.load_state_dict(ours.state_dict())
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape, dtype=np.float32)
    dout = rng.standard_normal(ours(x).shape, dtype=np.float32)
    for m in (*ours.modules(), *fast.modules()):       # dropout: the same masks
        if isinstance(getattr(m, "rng", None), np.random.Generator):
            m.rng = np.random.default_rng(2)
    _check(name, ours(x), fast(x))
    _check(name + " dx", ours.backward(dout), fast.backward(dout))

    def call(m):
        m.zero_grad()
        m(x)
        m.backward(dout)
    return time_pair(ours, fast, call, repeats)


def measure_loss(name, make_ours, make_fast, repeats):
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, 1, 256, 256), dtype=np.float32)
    target = (rng.random(logits.shape) < 0.3).astype(np.float32)
    ours, fast = make_ours(), make_fast()
    _check(name, ours(logits, target), fast(logits, target))
    _check(name + " dx", ours.backward(), fast.backward())

    def call(m):
        m(logits, target)
        m.backward()
    return time_pair(ours, fast, call, repeats)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    rows = []
    with limit_threads(args.threads):
        for name, make_ours, make_fast, shape, mode in PAIRS:
            print(f"  {name} ...", file=sys.stderr, flush=True)
            rows.append((name, measure_layer(name, make_ours, make_fast, shape, mode, args.repeats)))
        for name, make_ours, make_fast in LOSS_PAIRS:
            rows.append((name, measure_loss(name, make_ours, make_fast, args.repeats)))
    print(f"forward+backward, batch 2, float32, {args.threads} thread(s), median of {args.repeats} interleaved runs "
          f"(ms)\n")
    print("| layer | textbook CPU | fast CPU | textbook / fast | textbook wall | fast wall |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        c, w = r["cpu_s"], r["wall_s"]
        print(f"| {name} | {1e3 * c['textbook']:.1f} | {1e3 * c['fast']:.1f} | {c['textbook'] / c['fast']:.2f} | "
              f"{1e3 * w['textbook']:.1f} | {1e3 * w['fast']:.1f} |")
    if args.json:
        write_json(args.json, {"args": vars(args), "machine": machine_info(), "rows": dict(rows)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
