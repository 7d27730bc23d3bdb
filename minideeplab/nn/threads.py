"""A forward (and its backward) with the batch split over threads, so that every pass uses every core.

On the CPU, OpenBLAS spreads each GEMM over its threads, but NumPy runs each elementwise pass (a batch norm's
affine map, a ReLU, kn2row's shifted adds, pooling) on one thread: a DenseNet forward spends about a third of its
time in such passes, a training step about 30 %, and the second core waits meanwhile. Split by image instead,
each of T threads runs the model on N/T of the images with a one-thread BLAS: every pass and every GEMM keeps one
core busy. NumPy and OpenBLAS release the GIL while they compute; only the Python between the array operations (a
few ms per forward) takes turns.

- Inference (``no_grad``, every module in eval mode): the images never meet, and no forward reads back what it
  wrote to its module (each keeps its intermediates in local variables), so the threads run the same modules.
- With gradients (training): each part runs on its own *replica* of the module tree (``replicate``: the same
  ``Parameter`` objects and buffers, its own caches for backward), and ``split_backward`` runs each part's backward
  on the replica that did its forward. Where the images meet, the parts meet: a training batch norm's mean and
  variance, and the two per-channel sums of its backward, are summed over the parts (``batch_sum``, one barrier
  each); the running statistics are updated once (part 0); a dropout mask is drawn once for the whole batch
  (``broadcast``); parameter gradients are added into ``grad`` under a lock (``Parameter.accumulate``). Only with two
  parts (a BLAS of two threads): a sum of two partial gradients is the same in either order, so the step is
  deterministic.

The numbers are those of the plain forward and backward up to float rounding (partial sums over the parts, a GEMM
on one BLAS thread). Measured on DeepLabV3-DenseNet121 (``DeepLabV3.forward`` splits), 2x3x256x256, 2 threads, on
the shared 2-core machine: see benchmarks/README.md (thirteenth round); eval at OS 16, fastest / median of 9:
0.240 / 0.286 s split against 0.284 / 0.320 not split.
"""
from __future__ import annotations

import os
import threading
import types
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

from .module import _state, is_grad_enabled, no_grad

split_inference = True  # switches (``minideeplab bench --no-split`` turns both off, to compare)
split_training = True
_pool = None            # the worker threads, made on first use (in this process)
_pool_size = _pool_pid = 0
_blas = None            # threadpoolctl's controller of the BLAS libraries NumPy loaded (False: not available)
_lock = threading.Lock()
_inside = _state        # .split, .rank: the split this thread computes a part of (module._ThreadState)


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


def split_parts(model, x) -> int:
    """Into how many parts ``split_forward`` splits ``x`` (1: run it as it is).

    Only a plain NumPy array of at least as many images as the BLAS may use threads (T >= 2), outside a split:
    T parts under ``no_grad`` with every module of ``model`` in eval mode; with gradients, 2 parts if T is 2 (more
    parts would add partial gradients in a varying order). Never under ``no_grad`` in training mode.
    """
    if type(x) is not np.ndarray or x.ndim == 0 or x.shape[0] < 2 or _inside.split is not None:
        return 1
    threads = blas_threads()
    if threads < 2 or x.shape[0] < threads:
        return 1
    if is_grad_enabled():
        return 2 if threads == 2 and split_training else 1
    return 1 if not split_inference or _any_training(model) else threads


class _Split:
    """What the parts of one split forward or backward share: their rows of the batch and an exchange."""

    def __init__(self, rows):
        self.rows, self.batch = rows, rows[-1].stop
        self.barrier = threading.Barrier(len(rows))
        self.slots = ([None] * len(rows), [None] * len(rows))
        self.calls = [0] * len(rows)

    def exchange(self, rank: int, value) -> list:
        """Every part's ``value``, in part order, once all parts have given theirs. Two sets of slots in turn: a
        part cannot give its next value before every part has passed this call's barrier, and so read this one."""
        slots = self.slots[self.calls[rank] % 2]
        self.calls[rank] += 1
        slots[rank] = value
        self.barrier.wait()
        return list(slots)


def in_split() -> bool:
    return _inside.split is not None


def batch_size(local: int) -> int:
    """The whole batch's size inside a part of a split, else ``local`` (for checks that need it)."""
    split = _inside.split
    return local if split is None else split.batch


def is_first_part() -> bool:
    """True outside a split and in its part 0 (which updates what must be updated once: running statistics)."""
    return _inside.rank == 0


def batch_sum(*arrays):
    """Each array summed over the parts of the split this thread computes (the same totals, summed in part order,
    in every part); the arrays themselves outside a split."""
    split = _inside.split
    if split is None:
        return arrays
    parts = split.exchange(_inside.rank, arrays)
    totals = tuple(a.copy() for a in parts[0])
    for other in parts[1:]:
        for total, a in zip(totals, other):
            total += a
    return totals


def broadcast(make):
    """``make()`` computed in part 0 and handed to every part (``make()`` itself outside a split)."""
    split = _inside.split
    if split is None:
        return make()
    return split.exchange(_inside.rank, make() if _inside.rank == 0 else None)[0]


def part_rows() -> slice:
    """This part's rows of the whole batch (everything outside a split)."""
    split = _inside.split
    return slice(None) if split is None else split.rows[_inside.rank]


def replicate(module):
    """A copy of the module tree that shares its ``Parameter`` objects, buffers and settings but keeps its own
    caches: each attribute copied by reference, the children replicated, then ``Module._rebind`` (helpers that refer
    to children are rebuilt, caches a forward reads are dropped). Methods replaced on the instance (a profiler's wrappers
    around the original's methods, which would compute with the original) are left out."""
    r = object.__new__(type(module))
    own = r.__dict__
    own.update(module.__dict__)
    for name in own.keys() & _METHODS:
        if isinstance(own[name], (types.FunctionType, types.MethodType)):
            del own[name]
    children = OrderedDict((name, replicate(child)) for name, child in module._modules.items())
    own.update(children)
    own["_modules"] = children
    r._rebind()
    return r


_METHODS = {"forward", "backward", "backward_terms", "__call__"}    # the ones a profiler wraps per instance


def split_forward(model, x, parts: int):
    """``model(x)`` as ``parts`` forwards over consecutive rows of the batch, at once, one per thread, with the BLAS
    held at one thread; the outputs joined along the batch axis. With gradients, part k > 0 runs on a fresh
    ``replicate(model)``, and ``model.split_run`` keeps the replicas for ``split_backward``.

    Shapes: x: (N, ...) -> model(x): (N, ...).
    """
    bounds = np.cumsum([0] + [len(c) for c in np.array_split(np.empty(x.shape[0]), parts)])
    rows = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    if not is_grad_enabled():
        return np.concatenate(_run([model] * parts, [x[r] for r in rows], rows, lambda m, chunk: m(chunk)))
    model.split_run = None                           # (not copied into the replicas)
    models = [model] * parts

    def forward(m, chunk):      # each part k > 0 replicates the model in its own thread, while part 0 computes
        if _inside.rank > 0:
            m = models[_inside.rank] = replicate(m)
        return m(chunk)
    outs = _run(models, [x[r] for r in rows], rows, forward)
    model.split_run = (models, rows)
    return np.concatenate(outs)


def split_backward(model, dout, backward):
    """``backward(replica, dout rows)`` of each part of ``model``'s last split forward, at once on its replica;
    the results joined along the batch axis (None if the parts return None)."""
    models, rows = model.split_run
    outs = _run(models, [dout[r] for r in rows], rows, backward)
    return None if outs[0] is None else np.concatenate(outs)


def _run(models, chunks, rows, call):
    """``call(models[k], chunks[k])`` for every part k, part 0 in this thread, the others in the pool."""
    global _pool, _pool_size, _pool_pid
    split, parts = _Split(rows), len(rows)
    with _lock:
        if _pool_size < parts - 1 or _pool_pid != os.getpid():     # (a forked child has none of the threads)
            _pool, _pool_size = ThreadPoolExecutor(parts - 1, thread_name_prefix="minideeplab-split"), parts - 1
            _pool_pid = os.getpid()
        pool = _pool
    grad = is_grad_enabled()
    with _blas_controller().limit(limits=1):
        futures = [pool.submit(_run_part, split, k, grad, call, models[k], chunks[k]) for k in range(1, parts)]
        try:
            first, errors = _run_part(split, 0, grad, call, models[0], chunks[0]), []   # part 0 here, meanwhile
        except BaseException as e:
            first, errors = None, [e]
        try:
            wait(futures)                            # no part still running once this returns or raises
        except BaseException:                        # (Ctrl-C while waiting): the other parts stop at a barrier
            split.barrier.abort()
            raise
        errors += [f.exception() for f in futures if f.exception() is not None]
        if errors:                                   # the first real error, not a part's broken barrier
            raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return [first] + [f.result() for f in futures]


def _run_part(split, rank, grad, call, model, chunk):
    _inside.split, _inside.rank = split, rank
    try:
        if grad:
            return call(model, chunk)
        with no_grad():
            return call(model, chunk)
    except BaseException:
        split.barrier.abort()                        # a part waiting for this one raises instead of waiting forever
        raise
    finally:
        _inside.split, _inside.rank = None, 0
