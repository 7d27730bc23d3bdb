"""Cost of BatchNorm2d's finite check on the CPU (issue 25): a training forward sums each batch norm's C batch
variances and reads the sum on the host (``finite.is_finite``), to refuse a non-finite batch before the running
statistics take it.

Interleaved A/B: the same step with the check and with it switched off (``norm.launch_bound`` made to answer True,
which is what skips it on a GPU), alternating the order each round; prints the medians, the paired differences, the
number of checks per forward and the cost of one check alone.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/bn_finite_check.py [--rounds 20] [--dense-rounds 10]``
"""
import argparse
import time

import numpy as np

import minideeplab.nn.norm as norm
from minideeplab.losses import build_loss
from minideeplab.models import DeepLabConfig, build_deeplab

_real = norm.launch_bound


def _check(on: bool) -> None:
    norm.launch_bound = _real if on else (lambda x: True)


def _ab(name, fn, rounds):
    for on in (True, False):
        _check(on)
        fn()
    times = {True: [], False: []}
    for r in range(rounds):
        for on in ((True, False) if r % 2 == 0 else (False, True)):
            _check(on)
            start = time.perf_counter()
            fn()
            times[on].append(time.perf_counter() - start)
    _check(True)
    a, b = np.array(times[True]), np.array(times[False])
    d = a - b
    print(f"{name}: with check {np.median(a) * 1e3:.1f} ms, without {np.median(b) * 1e3:.1f} ms (medians); paired "
          f"difference median {np.median(d) * 1e3:+.2f} ms, mean {d.mean() * 1e3:+.2f} ± "
          f"{d.std(ddof=1) / np.sqrt(len(d)) * 1e3:.2f} ms (s.e.), n = {len(d)}")


def _count_checks(model, x) -> int:
    calls = [0]
    real = norm.is_finite

    def counting(v):
        calls[0] += 1
        return real(v)
    norm.is_finite = counting
    try:
        model.train()(x)
    finally:
        norm.is_finite = real
    return calls[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--dense-rounds", type=int, default=10)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    loss = build_loss("bce+dice")
    small = build_deeplab(DeepLabConfig.small(output_stride=16), rng=rng)
    x = rng.normal(size=(8, 3, 96, 96)).astype(np.float32)
    t = (rng.random((8, 1, 96, 96)) > 0.5).astype(np.float32)

    def small_step():
        for p in small.parameters():
            p.zero_grad()
        logits = small.train()(x)
        float(loss(logits, t))
        small.backward(loss.backward(), input_grad=False)
    print(f"small OS 16: {_count_checks(small, x)} checks per training forward")
    _ab("small OS 16 training step (forward + backward), batch 8 at 96 px", small_step, args.rounds)
    dense = build_deeplab(DeepLabConfig(output_stride=16), rng=rng)
    xd = rng.normal(size=(4, 3, 96, 96)).astype(np.float32)
    print(f"densenet121 OS 16: {_count_checks(dense, xd)} checks per training forward")
    _ab("densenet121 OS 16 training forward, batch 4 at 96 px", lambda: dense.train()(xd), args.dense_rounds)
    for c in (64, 1024):
        var = np.abs(rng.normal(size=c)).astype(np.float32)
        start = time.perf_counter()
        for _ in range(20000):
            norm.is_finite(var)
        print(f"one check over {c} variances: {(time.perf_counter() - start) / 20000 * 1e6:.1f} µs")


if __name__ == "__main__":
    main()
