"""Inference with the batch split over threads, so that every pass uses every core, not only the GEMMs.

On the CPU, OpenBLAS spreads each GEMM over its threads, but NumPy runs each elementwise pass (a batch norm's
affine map, a ReLU, kn2row's shifted adds, pooling) on one thread, and a DenseNet forward spends about a third
of its time in such passes: the second core waits. In eval mode the images of a batch never meet (a batch norm
uses its running statistics), so a forward over N images can run as T forwards over N/T images at once, one per
thread, each with a one-thread BLAS: every pass and every GEMM keeps one core busy. NumPy and OpenBLAS release
the GIL while they compute; only the Python between the array operations (a few ms per forward) takes turns.

Used under ``no_grad`` only (``inference_threads``): then no layer keeps anything for a backward, and the threads
may run the same modules at once because no forward reads back what it wrote to its module (each keeps its
intermediates in local variables; ``tests/test_threads.py`` runs the model this way against the plain forward).
The numbers are those of the plain forward up to float rounding (a GEMM on one BLAS thread may sum in another
order than on two).

Measured on DeepLabV3-DenseNet121 (``DeepLabV3.forward`` splits), eval under no_grad, 2x3x256x256, 2 threads, on
the 2-core machine (one process, split / not split / PyTorch rotating, fastest / median): quiet, OS 16, 8 rounds:
0.181 / 0.190 s split against 0.209 / 0.215 not split (PyTorch 0.232 / 0.241); loaded (nice -20), 7-9 rounds: OS
32 0.181 against 0.194, OS 16 0.240 against 0.284, OS 8 0.450 against 0.504. In CPU time the split costs 15-18 %
more than one thread running the whole batch (0.40 against 0.34 s at OS 16): the two cores share the memory
bandwidth and the L3, and each part prepares the folded and tap-major weights itself (benchmarks/README.md,
thirteenth round, also for the training step's split, tried and dropped: each part streams every weight itself).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

from .module import is_grad_enabled, no_grad

enabled = True          # the switch (``minideeplab bench --no-split`` turns it off, to compare)
_pool = None            # the worker threads, made on first use (in this process)
_pool_size = _pool_pid = 0
_blas = None            # threadpoolctl's controller of the BLAS libraries NumPy loaded (False: not available)
_lock = threading.Lock()
_inside = threading.local()   # set while this thread runs one part of a split forward: no split inside it


def _blas_controller():
    global _blas
    if _blas is None:
        with _lock:
            if _blas is None:
                try:
                    from threadpoolctl import ThreadpoolController
                    blas = ThreadpoolController().select(user_api="blas")
                    _blas = blas if blas.lib_controllers else False
                except Exception:     # not installed, or a library it cannot query: no split
                    _blas = False
    return _blas


def blas_threads() -> int:
    """How many threads the BLAS may use now (threadpoolctl; 1 when it cannot tell)."""
    blas = _blas_controller()
    return max(lib.num_threads for lib in blas.lib_controllers) if blas else 1


def _any_training(model) -> bool:
    stack = [model]
    while stack:
        m = stack.pop()
        if m.training:
            return True
        stack.extend(m._modules.values())
    return False


def inference_threads(model, x) -> int:
    """Into how many parts ``split_forward`` would split ``x`` (1: run it as it is).

    More than 1 only for a plain NumPy array, under ``no_grad``, with every module of ``model`` in eval mode (a
    training batch norm needs the whole batch; a dropout in training would draw its masks from two threads), not
    inside a part of a split already, with a BLAS that may use T >= 2 threads and at least T images: then T parts.
    (With fewer images than threads the BLAS keeps its threads: parts holding several BLAS threads each would
    queue for OpenBLAS's one thread pool.)
    """
    if not enabled or type(x) is not np.ndarray or x.ndim == 0 or x.shape[0] < 2 or is_grad_enabled():
        return 1
    threads = blas_threads()
    if threads < 2 or x.shape[0] < threads or getattr(_inside, "active", False) or _any_training(model):
        return 1
    return threads


def split_forward(model, x, parts: int):
    """``model(x)`` as ``parts`` forwards over consecutive slices of the batch, at once, one per thread, with the BLAS
    held at one thread while they run; the outputs joined along the batch axis.

    Shapes: x: (N, ...) -> model(x): (N, ...).
    """
    global _pool, _pool_size, _pool_pid
    chunks = np.array_split(x, parts)
    with _lock:
        if _pool_size < parts - 1 or _pool_pid != os.getpid():     # (a forked child has none of the threads)
            _pool, _pool_size = ThreadPoolExecutor(parts - 1, thread_name_prefix="minideeplab-inference"), parts - 1
            _pool_pid = os.getpid()
        pool = _pool
    with _blas_controller().limit(limits=1):
        futures = [pool.submit(_run_part, model, chunk) for chunk in chunks[1:]]
        try:
            first = _run_part(model, chunks[0])       # this thread computes the first part meanwhile
        finally:
            wait(futures)                              # no part still running once this returns or raises
        outs = [first] + [f.result() for f in futures]
    return np.concatenate(outs)


def _run_part(model, chunk):
    _inside.active = True
    try:
        with no_grad():
            return model(chunk)
    finally:
        _inside.active = False
