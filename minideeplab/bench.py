"""``minideeplab bench``: DeepLabV3-DenseNet121 speed and peak memory against PyTorch, in one run.

    minideeplab bench                      # CPU, OS 32/16/8, batch 2x3x256x256 float32, ours vs PyTorch
    minideeplab bench --device cuda        # CuPy vs PyTorch CUDA (TF32 off on both sides)
    minideeplab bench --quick              # tiny config at 64x64: a smoke run in seconds
    minideeplab bench --os 16 --textbook   # also the textbook model (minideeplab.textbook), beside ours
    minideeplab bench --loop               # the training loop end to end, Trainer vs PyTorch, images/s (bench_loop.py)

For every output stride, four phases (ours / PyTorch x eval forward / training step), each in a *fresh
subprocess* so that peak memory does not mix between phases and the two thread pools never interleave. The
training step is forward, BCE-with-logits loss, backward, SGD step (momentum 0.9). PyTorch's model is
``torch_oracle.to_torch(model)``: the same architecture with the same weights. Times are the median of
``--repeats`` runs after ``--warmup`` runs, with BLAS/OpenMP threads fixed to ``--threads`` (default: the
cores this process may use); on CUDA every timed run ends with a device synchronisation. On a shared machine
whose speed drifts, ``--rounds R`` alternates the two frameworks' phases R times and reports the median of
the R back-to-back ratios. Peak RSS is the
phase process's high-water mark, reset (Linux ``/proc/self/clear_refs``) after the model and data are built.
A fifth phase profiles our training step by layer type (``profiler.TypeProfiler``) and measures the conv
GEMM efficiency against ``matmul`` on the same shapes. ``--textbook`` adds a phase per row for the textbook model
(``minideeplab.textbook``: the plain layers a student reads, same weights, same numbers) in each round, after ours
and PyTorch's, and a table of its times beside ours. Results: a JSON file and a Markdown table in ``--out``
(default ``benchmarks/results``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np

from .io import atomic_write
from .nn.functional import conv_output_size

RESULT_TAG = "MINIDEEPLAB-BENCH-RESULT "


# ---- small helpers shared with benchmarks/bench_layers.py -----------------------------------------------
def limit_threads(n: int):
    """Context manager fixing the BLAS/OpenMP pools to ``n`` threads (a no-op without threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext()
    return threadpool_limits(limits=n)


def sample_times(fn, repeats: int, warmup: int = 2, sync=None, cpu_times: list | None = None) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (``sync()`` ends each call).

    ``cpu_times``, when given, receives each call's process CPU time: with one thread a measure that other
    processes on a shared machine barely disturb (with several, it also counts threads spinning idle).
    """
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
        sync()
    times = []
    for _ in range(repeats):
        c, t = time.process_time(), time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
        if cpu_times is not None:
            cpu_times.append(time.process_time() - c)
    return times


def median_time(fn, repeats: int, warmup: int = 2, sync=None) -> float:
    return statistics.median(sample_times(fn, repeats, warmup, sync))


def conv_flops(N, C, F, k, stride, padding, dilation, H, W=None) -> int:
    """Nominal FLOPs (2 per multiply-add) of a square-kernel conv forward, counting taps that read padding."""
    W = H if W is None else W
    Ho, Wo = (conv_output_size(n, k, stride, padding, dilation) for n in (H, W))
    return 2 * N * F * C * k * k * Ho * Wo


def write_json(path: str, obj) -> None:
    """Atomic write (``io.atomic_write`` creates the folder)."""
    write_text(path, json.dumps(obj, indent=1))


def write_text(path: str, text: str) -> None:
    """Atomic write (``io.atomic_write``)."""
    with atomic_write(path, "w") as f:
        f.write(text)


def write_report(report: dict, md: str, out: str, name: str) -> None:
    """Print the Markdown table and write ``out/name.json`` and ``out/name.md`` (atomically)."""
    print("\n" + md)
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, name)
    write_json(stem + ".json", report)
    write_text(stem + ".md", md)
    print(f"wrote {stem}.json and {stem}.md")


def machine_info() -> dict:
    info = {"cpus": len(os.sched_getaffinity(0)), "numpy": np.__version__, "python": sys.version.split()[0]}
    try:
        from threadpoolctl import threadpool_info
        info["blas"] = [f"{p.get('internal_api')} {p.get('version')} {p.get('architecture', '')}".strip()
                        for p in threadpool_info() if p.get("user_api") == "blas"]
    except ImportError:
        pass
    return info


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark to the current RSS (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- one phase, run inside its own subprocess ------------------------------------------------------------
def force_conv_algorithm(model, algorithm: str) -> int:
    """Set ``algorithm`` on every conv of ``model`` with a kernel larger than 1x1 that it applies to: the stride-1
    ones (the dense layers' 3x3, ASPP's atrous 3x3, the head's 3x3), and for "gather" the strided stem too ("auto"
    restores the layers' own choice). Returns how many were set. For comparing the paths on another machine, e.g.
    im2col or gather, with fewer but larger array operations, on a GPU."""
    from .nn import Conv2d
    convs = [m for m in model.modules() if isinstance(m, Conv2d) and m.kernel_size != (1, 1)
             and (m.stride == (1, 1) or algorithm == "gather")]
    for conv in convs:
        conv.algorithm = algorithm
    return len(convs)


def run_phase(spec: dict) -> dict:
    """Build the model and data of ``spec``, time ``spec['mode']`` ("eval", "train" or "profile")."""
    from .backend import synchronize, to_device
    from .losses import BCEWithLogitsLoss
    from .models import DeepLabConfig, build_deeplab
    from .nn import no_grad
    from .optim import SGD

    cuda = spec["device"] == "cuda"
    config = DeepLabConfig(**spec["config"])
    N, S = spec["batch"], spec["size"]
    if spec["framework"] == "textbook":
        return _run_textbook_phase(spec, config)
    rng = np.random.default_rng(0)
    model = build_deeplab(config, rng=np.random.default_rng(0))
    x = rng.standard_normal((N, 3, S, S), dtype=np.float32)
    target = (rng.random((N, config.num_classes, S, S)) < 0.3).astype(np.float32)
    if spec["framework"] == "torch":
        return _run_torch_phase(spec, model, x, target)
    force_conv_algorithm(model, spec.get("conv_algorithm", "auto"))
    if spec.get("no_split"):                 # our eval batch not split over threads (nn.threads): to compare
        from .nn import threads
        threads.enabled = False
    if cuda:
        model.to("cuda")
        x, target = to_device(x, "cuda"), to_device(target, "cuda")
    sync = synchronize if cuda else None
    loss_fn, opt = BCEWithLogitsLoss(), SGD(model.parameters(), lr=0.01, momentum=0.9)
    profiler = None

    def region(name):
        return profiler.region(name) if profiler is not None else nullcontext()

    def train_step():
        opt.zero_grad()
        logits = model(x)
        with region("loss"):
            loss_fn(logits, target)
            dlogits = loss_fn.backward()
        model.backward(dlogits, input_grad=False)    # as in Trainer; PyTorch's image needs no grad either
        with region("optimizer"):
            opt.step()

    def eval_step():
        with no_grad():       # as PyTorch's phase: nothing kept for a backward (nn.no_grad)
            model(x)
    step = _select_step(spec["mode"], model, eval_step, train_step)
    if spec.get("cuda_graph") and spec["mode"] != "profile":
        step = _graphed(step, model)
    if spec["mode"] == "profile":
        from .models import set_fused
        from .profiler import TypeProfiler, conv_gemm_shapes, gemm_reference
        step()                                   # warm-up, unprofiled
        profiler = TypeProfiler(model, sync=cuda).attach()
        best, conv_best = None, {}   # on a shared machine: the fastest profiled step, the fastest call per conv
        for _ in range(spec["repeats"]):         # the step as it runs: fused heads are one category
            profiler.reset()
            total = sample_times(step, 1, warmup=0, sync=sync)[0]
            if best is None or total < best[0]:
                best = (total, profiler.report(total))
        set_fused(model, False)                  # GEMM efficiency: every conv timed as a layer of its own
        for _ in range(spec["repeats"]):
            profiler.reset()
            step()
            for key, (conv, t_fwd, t_bwd) in profiler.per_conv.items():
                conv_best[key] = (conv, min(t_fwd + t_bwd, conv_best.get(key, (None, float("inf")))[1]))
        profiler.detach()
        result = {"step_s": best[0], "profile": best[1]}
        ref = gemm_reference([c for c, _ in conv_best.values()], sync=cuda)
        groups = {}
        for conv, t in conv_best.values():
            g = groups.setdefault(conv.path, {"layers": 0, "gflop": 0.0, "conv_s": 0.0, "matmul_s": 0.0})
            Nn, F, K, P = conv_gemm_shapes(conv)
            g["layers"] += 1
            g["gflop"] += 3 * 2 * Nn * F * K * P / 1e9
            g["conv_s"] += t
            g["matmul_s"] += ref[(Nn, F, K, P)]
        result["gemm"] = groups
        return result
    return _measure(step, spec, sync)     # the threads are limited by _child, around the whole phase


def _graphed(step, model):
    """``step`` captured as a CUDA graph (``backend.cuda_graph``): one launch per step instead of ~10^4. The step
    runs once eagerly first (kernels compiled, shapes cached, the dropout masks' shape known); the dropout masks
    are drawn ahead before every replay, as the eager step draws them (``Dropout.draw_ahead``)."""
    from .backend import cuda_graph
    from .nn import Dropout
    step()
    dropouts = [m for m in model.modules() if isinstance(m, Dropout) and m.training and m.p > 0]

    def draw_masks():
        for m in dropouts:
            m.draw_ahead()
    return cuda_graph(step, prepare=draw_masks)


def _select_step(mode: str, model, eval_step, train_step):
    """The step of ``mode`` ("eval" or "train"/"profile"), with ``model`` put in the matching mode."""
    if mode == "eval":
        model.eval()
        return eval_step
    model.train()
    return train_step


def _measure(step, spec: dict, sync) -> dict:
    """One untimed first run (allocations, before the peak-RSS reset), then the timed runs and the peak RSS."""
    step()
    result = {"rss_before_mib": peak_rss_mib(), "rss_reset": reset_peak_rss(), "cpu_s": []}
    result["times_s"] = sample_times(step, spec["repeats"], spec["warmup"], sync, result["cpu_s"])
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def _run_textbook_phase(spec, config) -> dict:
    """The phase of ``spec`` for the textbook model (``minideeplab.textbook``): the same weights (the same Generator),
    input and target as ours, its own BCE loss, the package's SGD; no fast path anywhere in the model."""
    from .backend import synchronize, to_device
    from .optim import SGD
    from .textbook import BCEWithLogitsLoss, build_deeplab

    N, S = spec["batch"], spec["size"]
    rng = np.random.default_rng(0)
    model = build_deeplab(config, rng=np.random.default_rng(0))
    x = rng.standard_normal((N, 3, S, S), dtype=np.float32)
    target = (rng.random((N, config.num_classes, S, S)) < 0.3).astype(np.float32)
    cuda = spec["device"] == "cuda"
    if cuda:
        model.to("cuda")
        x, target = to_device(x, "cuda"), to_device(target, "cuda")
    loss_fn, opt = BCEWithLogitsLoss(), SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train_step():
        opt.zero_grad()
        loss_fn(model(x), target)
        model.backward(loss_fn.backward(), input_grad=False)
        opt.step()

    step = _select_step(spec["mode"], model, lambda: model(x), train_step)
    return _measure(step, spec, synchronize if cuda else None)


def _run_torch_phase(spec, model, x, target) -> dict:
    import torch

    from .torch_oracle import to_torch
    torch.set_num_threads(spec["threads"])
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = "cuda" if spec["device"] == "cuda" else "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        return {"skipped": f"torch {torch.__version__} has no CUDA support here: PyTorch CUDA phases skipped"}
    tmodel = to_torch(model).to(dev)
    del model
    tx, tt = torch.from_numpy(x).to(dev), torch.from_numpy(target).to(dev)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    opt = torch.optim.SGD(tmodel.parameters(), lr=0.01, momentum=0.9)
    sync = torch.cuda.synchronize if dev == "cuda" else None

    def train_step():
        opt.zero_grad()
        loss_fn(tmodel(tx), tt).backward()
        opt.step()

    def eval_step():
        with torch.no_grad():
            tmodel(tx)
    step = _select_step(spec["mode"], tmodel, eval_step, train_step)
    result = {"torch": torch.__version__, **_measure(step, spec, sync)}
    if dev == "cuda":
        result["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["gpu"] = torch.cuda.get_device_name()
    return result


def _child(spec_json: str) -> int:
    spec = json.loads(spec_json)
    if spec["device"] == "cuda":
        os.environ.setdefault("CUPY_TF32", "0")       # CuPy's default, made explicit: no TF32 in its GEMMs
    with limit_threads(spec["threads"]):
        if spec["mode"] == "loop":                  # minideeplab bench --loop (bench_loop.py)
            from .bench_loop import run_loop_phase
            result = run_loop_phase(spec)
        else:
            result = run_phase(spec)
    if spec["framework"] == "ours":             # fused functions CuPy refused (they ran operation by operation)
        from .backend import fuse
        result["fuse_failures"] = {name: f"{type(e).__name__}: {e}" for name, e in fuse.failures.items()}
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


def spawn_phase(spec: dict, timeout: float | None = None) -> dict:
    """Run one phase in a fresh interpreter; returns its result dict (or {"error": ...})."""
    env = dict(os.environ)
    if spec["device"] == "cuda":
        env["CUPY_TF32"] = "0"
    try:
        proc = subprocess.run([sys.executable, "-m", "minideeplab.bench", "--phase", json.dumps(spec)],
                              capture_output=True, text=True, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"phase {spec['framework']} {spec['mode']} timed out after {timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"phase {spec['framework']} {spec['mode']} failed (exit {proc.returncode}): " + " | ".join(tail)}


# ---- the command ------------------------------------------------------------------------------------------
def _median(result, key="times_s"):
    return statistics.median(result[key]) if result.get(key) else None


def merge_rounds(results: list[dict]) -> dict:
    """One phase's results over several rounds: lists joined (times, CPU times), the largest peak RSS, an error
    if any round failed; other fields from the first round."""
    failed = [r for r in results if "error" in r or "skipped" in r]
    if failed or len(results) == 1:
        return failed[0] if failed else results[0]
    merged = dict(results[0])
    for key, value in results[0].items():
        if isinstance(value, list):
            merged[key] = [v for r in results for v in r[key]]
    peaks = [r["peak_rss_mib"] for r in results if "peak_rss_mib" in r]
    if peaks:
        merged["peak_rss_mib"] = max(peaks)
    return merged


def _textbook_columns(textbook_rounds: list[dict], our_rounds: list[dict]) -> dict:
    """A row's textbook fields: its phase results over the rounds, the median time, and the ratio textbook / ours as
    the median of each round's ratio (the two phases of a round ran back to back)."""
    merged = merge_rounds(textbook_rounds)
    ratios = [_median(t) / _median(o) for t, o in zip(textbook_rounds, our_rounds) if _median(t) and _median(o)]
    return {"textbook": merged, "textbook_s": _median(merged), "textbook_cpu_s": _median(merged, "cpu_s"),
            "textbook_peak_rss_mib": merged.get("peak_rss_mib"), "textbook_round_ratios": ratios,
            "textbook_ratio": statistics.median(ratios) if ratios else None}


def _fmt(v, spec="{:.3f}"):
    return "-" if v is None else spec.format(v)


def markdown(report: dict) -> str:
    a = report["args"]
    where = f"{a['threads']} threads"
    if a["device"] == "cuda":
        where = report["machine"].get("gpu", "GPU")
    rounds = a.get("rounds", 1)
    runs = f"median of {a['repeats']}" + (f" x {rounds} alternating rounds (ratio: median of the rounds' ratios)"
                                          if rounds > 1 else "")
    forced = a.get("conv_algorithm", "auto")
    runs += "" if forced == "auto" else f"; our k x k convs forced to {forced!r}"
    runs += "; our steps replay a CUDA graph (PyTorch's run eagerly)" if a.get("cuda_graph") else ""
    runs += "; our eval batch not split over threads (--no-split)" if a.get("no_split") else ""
    lines = [(f"### DeepLabV3-DenseNet121, batch {a['batch']}x3x{a['size']}x{a['size']} float32, {a['device']}, "
              f"{where}, {runs}"), "",
             ("| OS | phase | ours (s) | PyTorch (s) | ratio | best-of ratio | ours CPU (s) | PyTorch CPU (s) "
              "| CPU ratio | ours peak RSS (MiB) | PyTorch peak RSS (MiB) |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['output_stride']} | {r['mode']} | {_fmt(r['ours_s'])} | {_fmt(r['torch_s'])} | "
                     f"{_fmt(r['ratio'], '{:.2f}')} | {_fmt(r.get('best_ratio'), '{:.2f}')} | "
                     f"{_fmt(r['ours_cpu_s'])} | {_fmt(r['torch_cpu_s'])} | "
                     f"{_fmt(r['cpu_ratio'], '{:.2f}')} | {_fmt(r['ours_peak_rss_mib'], '{:.0f}')} | "
                     f"{_fmt(r['torch_peak_rss_mib'], '{:.0f}')} |")
    textbook_rows = [r for r in report["rows"] if "textbook" in r]
    if textbook_rows:
        lines += ["", ("The textbook model (`minideeplab.textbook`: im2col convs, step-by-step batch norms, a "
                       "concatenation before every dense layer; same weights, same numbers), its phase run after "
                       "ours in each round (ratio: median of the rounds' ratios):"), "",
                  ("| OS | phase | textbook (s) | ours (s) | textbook / ours | textbook CPU (s) | ours CPU (s) | "
                   "CPU ratio | textbook peak RSS (MiB) | ours peak RSS (MiB) |"),
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in textbook_rows:
            cpu_ratio = r["textbook_cpu_s"] / r["ours_cpu_s"] if r["textbook_cpu_s"] and r["ours_cpu_s"] else None
            lines.append(f"| {r['output_stride']} | {r['mode']} | {_fmt(r['textbook_s'])} | {_fmt(r['ours_s'])} | "
                         f"{_fmt(r['textbook_ratio'], '{:.2f}')} | {_fmt(r['textbook_cpu_s'])} | "
                         f"{_fmt(r['ours_cpu_s'])} | {_fmt(cpu_ratio, '{:.2f}')} | "
                         f"{_fmt(r['textbook_peak_rss_mib'], '{:.0f}')} | {_fmt(r['ours_peak_rss_mib'], '{:.0f}')} |")
    refused = report["machine"].get("fuse_failures")
    if refused:                                  # (on a GPU: more kernel launches than the code intends)
        lines += ["", "CuPy did not fuse, so these ran operation by operation: " +
                  "; ".join(f"{name} ({error})" for name, error in sorted(refused.items()))]
    prof = report.get("profile")
    if prof and "profile" in prof:
        lines += ["", (f"Our training step by layer type (OS {prof['output_stride']}, the fastest of the profiled "
                       f"steps, {prof['step_s']:.3f} s; exclusive times):"), "", "| part | ms | share |", "|---|---|---|"]
        lines += [f"| {p['category']} | {1e3 * p['seconds']:.1f} | {100 * p['share']:.1f} % |" for p in prof["profile"]]
        lines += ["", ("Conv GEMM efficiency (nominal FLOPs of fwd+bwd, each conv's fastest call; matmul = best "
                       "time of the 3 im2col GEMMs of the same shapes, no copies):"), "",
                  "| path | layers | GFLOP | conv (s) | GFLOP/s | matmul (s) | matmul GFLOP/s | efficiency |",
                  "|---|---|---|---|---|---|---|---|"]
        for path, g in list(prof["gemm"].items()) + [("all", prof["gemm_total"])]:
            lines.append(f"| {path} | {g['layers']} | {g['gflop']:.2f} | {g['conv_s']:.3f} | "
                         f"{g['gflop'] / g['conv_s']:.0f} | {g['matmul_s']:.3f} | {g['gflop'] / g['matmul_s']:.0f} | "
                         f"{100 * g['matmul_s'] / g['conv_s']:.0f} % |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="minideeplab bench", description="DeepLabV3-DenseNet121 speed and peak "
                                 "memory against PyTorch, in one run (see minideeplab/bench.py)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--os", type=int, nargs="+", choices=(8, 16, 32), default=None, dest="output_strides",
                    help="output strides to run (default 32 16 8; --quick: 16)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=None, help="image side (default 256; --quick: 64)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per phase (default 5; --quick: 2)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate ours/PyTorch phases this many times; the ratio is the median of the rounds' ratios")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--quick", action="store_true", help="tiny config (DeepLabConfig.small) at 64x64: smoke run")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch phases")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-layer-type profile")
    ap.add_argument("--profile-os", type=int, choices=(8, 16, 32), default=16)
    ap.add_argument("--conv-algorithm", choices=("auto", "kn2row", "taps", "im2col", "gather"), default="auto",
                    help="force this path on our stride-1 k x k convs (gather: every k x k conv; default: each "
                         "layer's own choice)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="with --device cuda: our steps replay a captured CUDA graph (the profile stays eager)")
    ap.add_argument("--textbook", action="store_true",
                    help="also time the textbook model (minideeplab.textbook) in each round, reported beside ours")
    ap.add_argument("--no-split", action="store_true",
                    help="run our eval forward without splitting the batch over threads (nn.threads), to compare")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results"), help="folder for the JSON and .md")
    ap.add_argument("--phase-timeout", type=float, default=600, help="seconds before a phase is abandoned")
    ap.add_argument("--loop", action="store_true", help="only the training loop end to end, Trainer against a "
                    "PyTorch loop, in images/s (minideeplab/bench_loop.py; default OS 16)")
    ap.add_argument("--loop-steps", type=int, default=None, help="--loop: steps per side (default 200; --quick: 20)")
    ap.add_argument("--loop-model", choices=("densenet121", "small"), default=None,
                    help="--loop: the model (default densenet121; --quick: small)")
    ap.add_argument("--loop-warmup", type=int, default=None,
                    help="--loop: steps before the timing starts (default 10; --quick: 3)")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.phase:
        return _child(args.phase)
    from importlib.util import find_spec

    from .backend import cuda_available
    from .models import DeepLabConfig
    if args.device == "cuda" and not cuda_available():
        print("minideeplab bench: error: --device cuda needs CuPy and a visible GPU", file=sys.stderr)
        return 1
    if args.cuda_graph and args.device != "cuda":
        print("minideeplab bench: error: --cuda-graph needs --device cuda (a CUDA graph captures GPU work)",
              file=sys.stderr)
        return 1
    with_torch = not args.no_torch and find_spec("torch") is not None
    if args.loop:
        from .bench_loop import main_loop
        return main_loop(args, with_torch)
    oss = args.output_strides or ([16] if args.quick else [32, 16, 8])
    size = args.size or (64 if args.quick else 256)
    repeats = args.repeats or (2 if args.quick else 5)
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    base = {"device": args.device, "batch": args.batch, "size": size, "repeats": repeats, "warmup": args.warmup,
            "threads": args.threads, "conv_algorithm": args.conv_algorithm, "cuda_graph": args.cuda_graph,
            "no_split": args.no_split}
    report = {"args": dict(base, quick=args.quick, rounds=args.rounds), "machine": machine_info(), "rows": []}
    print(f"minideeplab bench: {args.device}, batch {args.batch}x3x{size}x{size}, {args.threads} threads, "
          f"median of {repeats}" + ("" if with_torch else " (torch not installed: ours only)"), flush=True)
    for os_ in oss:
        config = (DeepLabConfig.small(output_stride=os_) if args.quick else DeepLabConfig(output_stride=os_))
        for mode in ("eval", "train"):
            spec = dict(base, config=config.to_dict(), mode=mode)
            rounds, textbook_rounds = [], []      # (ours, torch) phase results, alternating; textbook's
            for _ in range(args.rounds):
                ours = spawn_phase(dict(spec, framework="ours"), args.phase_timeout)
                theirs = spawn_phase(dict(spec, framework="torch"), args.phase_timeout) if with_torch else {}
                rounds.append((ours, theirs))
                if args.textbook:
                    textbook_rounds.append(spawn_phase(dict(spec, framework="textbook"), args.phase_timeout))
                for r in (ours, theirs, *textbook_rounds[-1:]):
                    if "error" in r or "skipped" in r:
                        print("  " + r.get("error", r.get("skipped")), file=sys.stderr)
            ours, theirs = merge_rounds([o for o, _ in rounds]), merge_rounds([t for _, t in rounds])
            row = {"output_stride": os_, "mode": mode, "ours_s": _median(ours), "torch_s": _median(theirs),
                   "ours_peak_rss_mib": ours.get("peak_rss_mib"), "torch_peak_rss_mib": theirs.get("peak_rss_mib"),
                   "ours": ours, "torch": theirs}
            # each round's ratio compares two phases run back to back; their median resists a machine whose
            # speed drifts between phases (a shared VM), which a ratio of pooled medians does not
            round_ratios = [_median(o) / _median(t) for o, t in rounds if _median(o) and _median(t)]
            row["round_ratios"] = round_ratios
            row["ratio"] = statistics.median(round_ratios) if round_ratios else None
            row["best_ratio"] = (min(ours["times_s"]) / min(theirs["times_s"])
                                 if ours.get("times_s") and theirs.get("times_s") else None)
            row["ours_cpu_s"], row["torch_cpu_s"] = _median(ours, "cpu_s"), _median(theirs, "cpu_s")
            row["cpu_ratio"] = (row["ours_cpu_s"] / row["torch_cpu_s"]
                                if row["ours_cpu_s"] and row["torch_cpu_s"] else None)
            if args.textbook:
                row.update(_textbook_columns(textbook_rounds, [o for o, _ in rounds]))
            report["rows"].append(row)
            for o, _ in rounds:
                report["machine"].setdefault("fuse_failures", {}).update(o.get("fuse_failures", {}))
            if "gpu" in theirs:
                report["machine"]["gpu"] = theirs["gpu"]
            print(f"  OS {os_:2d} {mode:5s}  ours {_fmt(row['ours_s'])} s  torch {_fmt(row['torch_s'])} s  "
                  f"ratio {_fmt(row['ratio'], '{:.2f}')} (CPU time {_fmt(row['cpu_ratio'], '{:.2f}')})  peak RSS ours {_fmt(row['ours_peak_rss_mib'], '{:.0f}')} "
                  f"/ torch {_fmt(row['torch_peak_rss_mib'], '{:.0f}')} MiB", flush=True)
            if args.textbook:
                print(f"  OS {os_:2d} {mode:5s}  textbook {_fmt(row['textbook_s'])} s, "
                      f"{_fmt(row['textbook_ratio'], '{:.2f}')}x ours", flush=True)
    if not args.no_profile:
        pos = args.profile_os if not args.quick else oss[0]
        config = DeepLabConfig.small(output_stride=pos) if args.quick else DeepLabConfig(output_stride=pos)
        prof = spawn_phase(dict(base, config=config.to_dict(), mode="profile", framework="ours",
                                repeats=min(repeats, 3)), args.phase_timeout)
        prof["output_stride"] = pos
        if "gemm" in prof:
            prof["gemm_total"] = {k: sum(g[k] for g in prof["gemm"].values())
                                  for k in ("layers", "gflop", "conv_s", "matmul_s")}
        elif "error" in prof:
            print("  " + prof["error"], file=sys.stderr)
        report["profile"] = prof
    write_report(report, markdown(report), args.out, f"bench_{args.device}" + ("_quick" if args.quick else ""))
    failed = [r for r in report["rows"] if "error" in r["ours"] or "error" in r["torch"]
              or "error" in r.get("textbook", {})]
    return 1 if failed or "error" in report.get("profile", {}) else 0


if __name__ == "__main__":
    sys.exit(main())
