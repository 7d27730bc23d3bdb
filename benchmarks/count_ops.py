"""Array operations in one DeepLabV3-DenseNet121 step, by layer type: a GPU's kernel launches, counted on the CPU.

    .venv/bin/python benchmarks/count_ops.py [--os 16] [--size 256] [--conv-algorithm im2col] [--out FILE.md]

On a GPU a step made of many small layers is bound by kernel launches, not by arithmetic (CuPy spends some
10 µs of Python and driver time on each, whatever its size): the number of array operations is what a change for
the GPU has to bring down. This script counts them without a GPU: the model's parameters, buffers and input
become ``profiler.CountingArray`` (a NumPy array that counts every ufunc, reduction, matmul, array function and
copy made on it; ``counting_creation`` makes the arrays the step allocates count too) and ``TypeProfiler``
charges the counts to layer types as it charges time in ``minideeplab bench``. A ``CountingArray`` takes the paths a
GPU's arrays take (``backend.launch_bound``): "auto" convs on the "gather" path, optimizer updates over whole flat
buffers (on the CPU: kn2row and cache-sized chunks; ``--conv-algorithm kn2row`` counts the CPU's convs). Batch
2x3xSIZExSIZE float32, the benchmark's training step (forward, BCE-with-logits, backward without the image's
gradient, SGD with momentum 0.9), then AdamW's step.
"Host syncs" counts the reads of an array value on the host (``bool``, ``float``, ``item``): on a GPU each waits
for the queued kernels, and a step captured as a CUDA graph may have none. The step is counted twice: as it runs
eagerly, and as it runs while ``backend.cuda_graph`` captures it (``CountingArray.capturing``: no host reads, so the
fused heads take their general path).
"""
from __future__ import annotations

import argparse

import numpy as np

from minideeplab import optim
from minideeplab.bench import force_conv_algorithm, write_text
from minideeplab.losses import BCEWithLogitsLoss
from minideeplab.models import DeepLabConfig, build_deeplab
from minideeplab.profiler import CountingArray, TypeProfiler, counting_creation, operations_counted


def counting_model(config: DeepLabConfig, conv_algorithm: str = "auto"):
    """The model of ``config`` with every parameter, gradient and buffer a ``CountingArray``."""
    model = build_deeplab(config, rng=np.random.default_rng(0))
    force_conv_algorithm(model, conv_algorithm)
    return model._apply(lambda a: a.view(CountingArray))   # what .to(device) does, with a view instead of a copy


def count_step(output_stride: int = 16, size: int = 256, batch: int = 2, conv_algorithm: str = "auto",
               capturing: bool = False) -> dict:
    """Operations of one training step (by phase and by layer type), of the eval forward, and of each optimizer;
    ``conv_algorithm``: as ``minideeplab bench --conv-algorithm``; ``capturing``: as captured in a CUDA graph."""
    saved, CountingArray.capturing = CountingArray.capturing, capturing
    try:
        with counting_creation():
            return _count_step(output_stride, size, batch, conv_algorithm)
    finally:
        CountingArray.capturing = saved


def _count_step(output_stride, size, batch, conv_algorithm):
    model = counting_model(DeepLabConfig(output_stride=output_stride), conv_algorithm)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, size, size), dtype=np.float32).view(CountingArray)
    target = (rng.random((batch, 1, size, size)) < 0.3).astype(np.float32).view(CountingArray)
    loss_fn = BCEWithLogitsLoss()
    sgd = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    profiler = TypeProfiler(model, clock=operations_counted).attach()   # counts by layer type

    def train_step(opt):
        CountingArray.syncs.clear()
        marks = [operations_counted()]
        opt.zero_grad()
        logits = model(x)
        marks.append(operations_counted())
        with profiler.region("loss"):
            loss_fn(logits, target)
            dlogits = loss_fn.backward()
        marks.append(operations_counted())
        model.backward(dlogits, input_grad=False)
        marks.append(operations_counted())
        with profiler.region("optimizer"):
            opt.step()
        marks.append(operations_counted())
        counts = dict(zip(("forward", "loss", "backward", "optimizer"), np.diff(marks).tolist()))
        return counts, sum(CountingArray.syncs.values())

    model.train()
    train_step(sgd)                             # first step: creates the state (counted from the second on)
    profiler.reset()
    phases, syncs = train_step(sgd)
    by_type = profiler.report(sum(phases.values()))
    adamw = optim.AdamW(model.parameters(), lr=1e-3)
    train_step(adamw)
    adamw_phases, adamw_syncs = train_step(adamw)
    profiler.detach()
    model.eval()
    start = operations_counted()
    CountingArray.syncs.clear()
    model(x)
    eval_ops, eval_syncs = operations_counted() - start, sum(CountingArray.syncs.values())
    return {"output_stride": output_stride, "size": size, "batch": batch, "conv_algorithm": conv_algorithm,
            "train_sgd": phases, "train_adamw": adamw_phases, "eval_forward": eval_ops, "params": len(sgd.params),
            "syncs": {"train_sgd": syncs, "train_adamw": adamw_syncs, "eval_forward": eval_syncs},
            "by_type": [{"category": r["category"], "ops": int(round(r["seconds"])), "share": r["share"]}
                        for r in by_type]}


def markdown(result: dict, captured: dict | None = None) -> str:
    """The table of ``count_step``'s result, with the rows of a ``capturing=True`` count if ``captured`` is given."""
    sgd, adamw = result["train_sgd"], result["train_adamw"]
    forced = "" if result["conv_algorithm"] == "auto" else f", k x k convs forced to {result['conv_algorithm']!r}"
    lines = [f"### Array operations per step (≈ GPU kernel launches), DeepLabV3-DenseNet121 OS {result['output_stride']}, "
             f"batch {result['batch']}x3x{result['size']}x{result['size']}{forced}", "",
             "| step | forward | loss | backward | optimizer | total | host syncs |", "|---|---|---|---|---|---|---|"]
    syncs = result["syncs"]
    for name, key, ph in (("train, SGD momentum", "train_sgd", sgd), ("train, AdamW", "train_adamw", adamw)):
        lines.append(f"| {name} | {ph['forward']} | {ph['loss']} | {ph['backward']} | {ph['optimizer']} | "
                     f"{sum(ph.values())} | {syncs[key]} |")
    lines.append(f"| eval forward | {result['eval_forward']} | | | | {result['eval_forward']} | "
                 f"{syncs['eval_forward']} |")
    if captured is not None:
        ph = captured["train_sgd"]
        lines.append(f"| train, SGD momentum, captured (CUDA graph) | {ph['forward']} | {ph['loss']} | {ph['backward']} | "
                     f"{ph['optimizer']} | {sum(ph.values())} | {captured['syncs']['train_sgd']} |")
        lines.append(f"| eval forward, captured (CUDA graph) | {captured['eval_forward']} | | | | "
                     f"{captured['eval_forward']} | {captured['syncs']['eval_forward']} |")
    lines += ["", "Training step (SGD) by layer type:", "", "| part | operations | share |", "|---|---|---|"]
    lines += [f"| {r['category']} | {r['ops']} | {100 * r['share']:.1f} % |" for r in result["by_type"] if r["ops"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--os", type=int, default=16, choices=(8, 16, 32), help="output stride")
    ap.add_argument("--size", type=int, default=256, help="image size (the benchmark's is 256)")
    ap.add_argument("--conv-algorithm", choices=("auto", "kn2row", "taps", "im2col", "gather"), default="auto",
                    help="force this path on the stride-1 k x k convs (as minideeplab bench --conv-algorithm)")
    ap.add_argument("--out", default=None, help="also write the Markdown table here")
    args = ap.parse_args(argv)
    counts = [count_step(args.os, args.size, conv_algorithm=args.conv_algorithm, capturing=c) for c in (False, True)]
    text = markdown(*counts)
    print(text, end="")
    if args.out:
        write_text(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
